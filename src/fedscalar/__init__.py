"""fedscalar: federated training where clients and server exchange seeds and scalars.

Front doors: `fedscalar.run(config)` and the ``fedscalar`` command. The names below are
imported on first use, so ``import fedscalar`` (and ``fedscalar --help``) stays light:
torch, datasets and Flower load only when a run needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunConfig", "RunResult", "__version__", "run"]

_LAZY = {
    "RunConfig": "fedscalar.config",
    "RunResult": "fedscalar.runner",
    "run": "fedscalar.api",
}

if TYPE_CHECKING:
    from fedscalar.api import run
    from fedscalar.config import RunConfig
    from fedscalar.runner import RunResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedscalar' has no attribute {name!r}")
