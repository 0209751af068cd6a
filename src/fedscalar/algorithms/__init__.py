"""Algorithms by name: each gives a `Server` and a `Client` over a `ParamSpace`."""

from __future__ import annotations

import secrets

from fedscalar import schedule
from fedscalar.algorithms.attacks import ByzantineClient
from fedscalar.algorithms.base import Client, ClientData, Diverged, RejectedReply, Server
from fedscalar.algorithms.compression import make_compressor
from fedscalar.algorithms.fedavg import FedAvgClient, FedAvgServer
from fedscalar.algorithms.fedkseed import FedKSeedClient, FedKSeedServer
from fedscalar.algorithms.feedsign import FeedSignAlgorithm, FeedSignServer
from fedscalar.algorithms.ferret import FerretAlgorithm, FerretServer
from fedscalar.algorithms.zo import ZOAlgorithm, ZOClient, ZOServer, ZOSettings, ZOState
from fedscalar.config import RunConfig
from fedscalar.messages import GlobalUpdate
from fedscalar.params import ParamSpace
from fedscalar.privacy.dp import GaussianDP, PrivateClient

SCALAR = ("decomfl", "hiso", "mezo")
"""Built-in algorithms whose replies are the K x P scalars of one shared set of seeds."""
SEED_POOL = ("fedkseed", "fedkseed-pro")


def zo_settings(cfg: RunConfig) -> ZOSettings:
    return ZOSettings(
        perturbations=cfg.projections if cfg.algorithm == "ferret" else cfg.perturbations,
        mu=cfg.mu,
        difference=cfg.difference,
        hiso=cfg.algorithm == "hiso",
        beta=cfg.hiso_beta,
        eps=cfg.hiso_eps,
        curvature_update=cfg.hiso_curvature_update,
        arithmetic=cfg.arithmetic,
    )


def _robust(cfg: RunConfig) -> dict:
    return {"aggregator": cfg.aggregator, "trim_fraction": cfg.trim_fraction, "krum_f": cfg.krum_f}


def privacy(cfg: RunConfig) -> GaussianDP | None:
    """The run's DP mechanism (None without DP). Its secret is ``dp_seed`` (the runner
    sets it from the run folder's secret); a party given none draws its own."""
    if not cfg.private:
        return None
    noise = cfg.dp_noise_multiplier
    if noise is None:  # a config not resolved yet
        noise = cfg.resolved().dp_noise_multiplier
    assert noise is not None
    secret = cfg.dp_seed if cfg.dp_seed is not None else secrets.randbits(63)
    return GaussianDP(cfg.dp_mode, cfg.dp_clip, noise, secret)


def _central(cfg: RunConfig) -> dict:
    """The server's DP mechanism, in central mode."""
    return {"dp": privacy(cfg)} if cfg.private and cfg.dp_mode == "central" else {}


def make_server(cfg: RunConfig, space: ParamSpace, history: list[GlobalUpdate]) -> Server:
    """The server half of ``cfg.algorithm`` (its registry entry's) holding the global
    state in ``space``."""
    return cfg.spec.make_server(cfg, space, history)


def builtin_server(cfg: RunConfig, space: ParamSpace, history: list[GlobalUpdate]) -> Server:
    """The built-in algorithms' servers."""
    if cfg.algorithm in SCALAR:
        algo = ZOAlgorithm(zo_settings(cfg))
        return ZOServer(
            algo,
            ZOState(space, algo.s.hiso),
            history,
            cfg.catch_up,
            **_robust(cfg),
            **_central(cfg),
        )
    if cfg.algorithm == "feedsign":
        sign = FeedSignAlgorithm(zo_settings(cfg))
        return FeedSignServer(sign, ZOState(space, False), history, cfg.catch_up)
    if cfg.algorithm == "ferret":
        ferret = FerretAlgorithm(zo_settings(cfg), cfg.local_steps)
        state = ZOState(space, False)
        return FerretServer(
            ferret, state, history, cfg.server_lr, catch_up_mode=cfg.catch_up, **_robust(cfg)
        )
    if cfg.algorithm in SEED_POOL:
        algo = ZOAlgorithm(zo_settings(cfg))
        pool = schedule.seed_pool(cfg.seed, cfg.seed_pool)
        return FedKSeedServer(
            algo, ZOState(space, False), history, pool, cfg.algorithm == "fedkseed-pro"
        )
    compressor = make_compressor(cfg.algorithm, cfg.topk_fraction, cfg.qsgd_bits)
    return FedAvgServer(space, compressor, **_robust(cfg), **_central(cfg))


def builtin_client(cfg: RunConfig, space: ParamSpace, server: Server | None) -> Client:
    """The built-in algorithms' (honest) clients."""
    if cfg.algorithm in SCALAR:
        if isinstance(server, ZOServer):
            return ZOClient(server.algo, server.state)
        algo = ZOAlgorithm(zo_settings(cfg))
        return ZOClient(algo, ZOState(space, algo.s.hiso))
    if cfg.algorithm in ("feedsign", "ferret"):
        if isinstance(server, ZOServer):
            return ZOClient(server.algo, server.state)
        algo = (
            FeedSignAlgorithm(zo_settings(cfg))
            if cfg.algorithm == "feedsign"
            else FerretAlgorithm(zo_settings(cfg), cfg.local_steps)
        )
        return ZOClient(algo, ZOState(space, False))
    if cfg.algorithm in SEED_POOL:
        pool = schedule.seed_pool(cfg.seed, cfg.seed_pool)
        if isinstance(server, FedKSeedServer):
            return FedKSeedClient(server.algo, server.state, pool)
        return FedKSeedClient(ZOAlgorithm(zo_settings(cfg)), ZOState(space, False), pool)
    compressor = make_compressor(cfg.algorithm, cfg.topk_fraction, cfg.qsgd_bits)
    zo = ZOAlgorithm(zo_settings(cfg)) if cfg.algorithm == "fedzo" else None
    return FedAvgClient(space, cfg.local_steps, compressor, zo, cfg.seed)


def make_client(cfg: RunConfig, space: ParamSpace, server: Server | None = None) -> Client:
    """A client over ``space``. Given the simulator's ``server``, it shares its state.

    With ``cfg.attackers``, the clients with the ids `schedule.attackers` picks attack.
    """
    client = cfg.spec.make_client(cfg, space, server)
    if cfg.private and cfg.dp_mode == "local":
        dp = privacy(cfg)
        assert dp is not None
        client = PrivateClient(client, dp)
    if cfg.attackers:
        bad = schedule.attackers(cfg.seed, cfg.clients, cfg.attackers)
        client = ByzantineClient(client, bad, cfg.attack, cfg.attack_scale, cfg.seed)
    return client


__all__ = [
    "SCALAR",
    "SEED_POOL",
    "Client",
    "ClientData",
    "Diverged",
    "RejectedReply",
    "Server",
    "builtin_client",
    "builtin_server",
    "make_client",
    "make_server",
]
