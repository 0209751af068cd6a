"""fedscalar on Flower: a ServerApp that runs the training loop, a ClientApp per node.

The Flower messages only carry fedscalar's own encoded messages (`fedscalar.messages`)
and a little control information (see `protocol`); the algorithms run unchanged.
Needs ``pip install 'fedscalar[flower]'`` (``[flower-sim]`` for the simulation engine).
"""
