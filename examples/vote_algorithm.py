"""A new algorithm in one module: ``decomfl-vote``, DeComFL whose server averages the
*signs* of the clients' scalars (a majority vote per seed and perturbation) instead of
the scalars themselves.

    fedscalar run --plugins examples.vote_algorithm --algorithm decomfl-vote --options margin=0.1

Importing the module registers the algorithm. Everything else comes with the
registration: the ledger records each round's voted update, so replay, resume, export
and catch-up work as for DeComFL; `compare` can put it beside the built-ins.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedscalar.algorithms import zo_settings
from fedscalar.algorithms.zo import ZOAlgorithm, ZOClient, ZOServer, ZOState
from fedscalar.registry import AlgorithmSpec, register_algorithm


class VoteServer(ZOServer):
    """DeComFL's server, aggregating the signs of the replies' scalars; a scalar within
    ``margin`` of zero abstains."""

    def __init__(self, *args, margin: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def aggregate(self, rnd, lr, seeds, replies):
        def vote(g):
            return np.where(np.abs(g) > self.margin, np.sign(g), 0).astype(np.float32)

        votes = {
            cid: dataclasses.replace(reply, scalars=vote(reply.scalars))
            for cid, reply in replies.items()
        }
        update, _ = super().aggregate(rnd, lr, seeds, votes)
        return update, float(np.mean([reply.loss for reply in replies.values()]))


def make_server(cfg, space, history):
    algo = ZOAlgorithm(zo_settings(cfg))
    state = ZOState(space, hiso=False)
    return VoteServer(algo, state, history, cfg.catch_up, margin=cfg.option("margin"))


def make_client(cfg, space, server):
    if isinstance(server, VoteServer):  # the simulator: share the server's model
        return ZOClient(server.algo, server.state)
    algo = ZOAlgorithm(zo_settings(cfg))
    return ZOClient(algo, ZOState(space, hiso=False))


register_algorithm(
    AlgorithmSpec(
        "decomfl-vote",
        "DeComFL with a majority vote of the scalars' signs",
        make_server,
        make_client,
        lr={"digits": 0.01},  # the default on digits; other tasks need --lr
        options={"margin": 0.0},  # its own setting: --options margin=0.1
    ),
    replace=True,  # importing the module twice is harmless
)
