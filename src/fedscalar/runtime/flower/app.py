"""The fedscalar Flower app: ``server_app`` and ``client_app`` for `flwr run`.

The ServerApp runs fedscalar's own training loop with a `FlowerRuntime`; its run
configuration (``flwr run --run-config``) takes:

- ``config``: path (on the SuperLink's machine) of a TOML file with `fedscalar run`
  options; empty: the defaults.
- ``out``: the run folder (overrides the file's ``out``).
- ``resume``: continue the run in ``out``.

The ClientApp needs no configuration of its own: the server sends each node the run's
config, and the node's ``partition-id`` (``--node-config``) says which client it is.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedscalar.api import run
from fedscalar.config import build_config
from fedscalar.runtime.flower.client import client_app
from fedscalar.runtime.flower.server import FlowerRuntime

__all__ = ["client_app", "server_app"]

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    path = str(settings.get("config", "") or "") or None
    out = str(settings.get("out", "") or "") or None

    def runtime(r):
        return FlowerRuntime(grid, r)

    if settings.get("resume", False):
        run(resume=True, resume_overrides={"out": out, "runtime": "flower"}, runtime=runtime)
    else:
        run(build_config(path, out=out, runtime="flower"), runtime=runtime)
