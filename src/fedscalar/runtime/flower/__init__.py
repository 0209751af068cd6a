"""fedscalar on Flower: a ServerApp that runs the training loop, a ClientApp per node.

The Flower messages only carry fedscalar's own encoded messages (`fedscalar.messages`)
and a little control information (see `protocol`); the algorithms run unchanged.
Needs ``pip install 'fedscalar[flower]'`` (``[flower-sim]`` for the simulation engine).
"""

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Environment fedscalar gives Flower: no telemetry, no update checks, no installs."""
