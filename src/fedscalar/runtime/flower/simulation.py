"""`fedscalar run --runtime flower-simulation`: the Flower app in Flower's simulation engine.

One virtual SuperNode per client id (``partition-id`` 0..clients-1), ClientApps on Ray
workers; the ServerApp runs the usual training loop in this process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedscalar.config import RunConfig
from fedscalar.runner import execute
from fedscalar.runtime.flower import QUIET_ENV
from fedscalar.runtime.flower.client import client_app
from fedscalar.runtime.flower.server import FlowerRuntime

STARTUP_PATIENCE = 900.0
"""Seconds the server waits for every virtual node's first answer, asking each once: each
node exists and will answer, only Ray's start on a loaded machine delays them (past two
minutes), and a second query run beside the first could overwrite the node's context."""


def simulate(cfg: RunConfig, *, resume: bool, progress: bool, workers: int | None = None):
    """Run ``cfg`` (already resolved) on the simulation engine; return the `RunResult`."""
    for k, v in {**QUIET_ENV, "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(k, v)
    outcome: dict[str, Any] = {}

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = execute(
                cfg,
                resume=resume,
                progress=progress,
                runtime=lambda r: FlowerRuntime(grid, r, STARTUP_PATIENCE, STARTUP_PATIENCE),
            )
        except BaseException as e:  # re-raised in the caller's thread below
            outcome["error"] = e

    cpus = workers or max(1, min(cfg.clients, os.cpu_count() or 1))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error"},
        },
        verbose_logging=logging.getLogger("fedscalar").isEnabledFor(logging.DEBUG),
    )
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the server app")
    return outcome["result"]
