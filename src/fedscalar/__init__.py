"""fedscalar: federated training where clients and server exchange seeds and scalars.

Front doors: `fedscalar.run(config)` and the ``fedscalar`` command.
"""

from fedscalar.config import RunConfig
from fedscalar.runner import RunResult, run

__version__ = "0.1.0"
__all__ = ["RunConfig", "RunResult", "__version__", "run"]
