"""Byzantine clients for robustness experiments.

A `ByzantineClient` wraps an honest client: it computes the honest reply, then, if the
client id is one of the attackers, replaces the reply's values before it is sent. The
reply keeps a valid format, so only the aggregator stands between it and the model.

- ``gaussian``: every value is replaced by a draw from N(0, scale^2).
- ``sign-flip``: every value is multiplied by ``-scale``.

For scalar-only methods the values are the uploaded scalars (FeedSign: the signs, so a
sign-flip inverts them and gaussian makes them coin flips); for the FedAvg family they
are the weight change (a quantised one is re-quantised after the attack).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedscalar import schedule
from fedscalar.algorithms.base import Client, WrappedClient
from fedscalar.algorithms.compression import QSGD, dense
from fedscalar.messages import (
    DeltaReply,
    Message,
    QuantizedDeltaReply,
    ScalarReply,
    SeedReply,
    SignReply,
    SparseDeltaReply,
)

ATTACKS = ("none", "gaussian", "sign-flip")


def corrupt_values(values: np.ndarray, attack: str, scale: float, rng) -> np.ndarray:
    if attack == "gaussian":
        return rng.normal(0.0, scale, values.shape).astype(np.float32)
    if attack == "sign-flip":
        return (-scale * values.astype(np.float64)).astype(np.float32)
    raise ValueError(f"unknown attack {attack!r} (choose from gaussian, sign-flip)")


def corrupt(reply: Message, attack: str, scale: float, rng: np.random.Generator) -> Message:
    """The same reply with its values attacked."""
    if isinstance(reply, ScalarReply | SeedReply):
        return dataclasses.replace(reply, scalars=corrupt_values(reply.scalars, attack, scale, rng))
    if isinstance(reply, SignReply):  # the attacked values' signs: one bit is all it has
        bad = corrupt_values(reply.signs, attack, scale, rng)
        return dataclasses.replace(reply, signs=np.where(bad >= 0, 1.0, -1.0).astype(np.float32))
    if isinstance(reply, DeltaReply | SparseDeltaReply):
        return dataclasses.replace(reply, values=corrupt_values(reply.values, attack, scale, rng))
    if isinstance(reply, QuantizedDeltaReply):
        bad = corrupt_values(dense(reply, reply.size), attack, scale, rng)
        return QSGD(reply.bits).compress(reply.round, reply.loss, bad, rng)
    raise TypeError(f"cannot attack a {type(reply).__name__}")


class ByzantineClient(WrappedClient):
    """Honest for every client id except ``attackers``, whose replies are attacked (the
    replica is the wrapped client's: an attacker is as up to date as it is honest)."""

    def __init__(
        self, inner: Client, attackers: frozenset[int], attack: str, scale: float, run_seed: int
    ):
        super().__init__(inner)
        self.attackers, self.attack, self.scale, self.run_seed = attackers, attack, scale, run_seed

    def changed(self, reply: Message, client_id: int) -> Message:
        if client_id not in self.attackers:
            return reply
        rnd = int(getattr(reply, "round", 0))
        rng = schedule.rng_for(self.run_seed, schedule.ATTACK, rnd, client_id)
        return corrupt(reply, self.attack, self.scale, rng)
