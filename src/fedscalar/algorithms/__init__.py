"""Algorithms by name: each gives a `Server` and a `Client` over a `ParamSpace`."""

from __future__ import annotations

from fedscalar.algorithms.base import Client, ClientData, Diverged, RejectedReply, Server
from fedscalar.algorithms.fedavg import FedAvgClient, FedAvgServer
from fedscalar.algorithms.zo import ZOAlgorithm, ZOClient, ZOServer, ZOSettings, ZOState
from fedscalar.config import RunConfig
from fedscalar.messages import GlobalUpdate
from fedscalar.params import ParamSpace

REPLAYABLE = ("decomfl", "hiso")
"""Algorithms whose weights are a pure function of the base weights and the ledger."""


def zo_settings(cfg: RunConfig) -> ZOSettings:
    return ZOSettings(
        perturbations=cfg.perturbations,
        mu=cfg.mu,
        difference=cfg.difference,
        hiso=cfg.algorithm == "hiso",
        beta=cfg.hiso_beta,
        eps=cfg.hiso_eps,
        curvature_update=cfg.hiso_curvature_update,
    )


def make_server(cfg: RunConfig, space: ParamSpace, history: list[GlobalUpdate]) -> Server:
    """The server half of ``cfg.algorithm`` holding the global state in ``space``."""
    if cfg.algorithm in REPLAYABLE:
        algo = ZOAlgorithm(zo_settings(cfg))
        return ZOServer(algo, ZOState(space, algo.s.hiso), history, cfg.catch_up)
    return FedAvgServer(space)


def make_client(cfg: RunConfig, space: ParamSpace, server: Server | None = None) -> Client:
    """A client over ``space``. Given the simulator's ``server``, it shares its state."""
    if cfg.algorithm in REPLAYABLE:
        if isinstance(server, ZOServer):
            return ZOClient(server.algo, server.state)
        algo = ZOAlgorithm(zo_settings(cfg))
        return ZOClient(algo, ZOState(space, algo.s.hiso))
    return FedAvgClient(space, cfg.local_steps)


__all__ = [
    "REPLAYABLE",
    "Client",
    "ClientData",
    "Diverged",
    "RejectedReply",
    "Server",
    "make_client",
    "make_server",
]
