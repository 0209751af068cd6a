"""Differentially private replies: clip each client's reply, add Gaussian noise.

The same mechanism serves every private algorithm: a reply is one row of numbers (the
K x P scalars of a zeroth-order round, or a dense weight change), clipped to L2 norm
``clip``. In ``central`` mode the server noises the sum of the clipped rows; in ``local``
mode each client noises its own row before it leaves the client. Either way the noise
has standard deviation ``noise_multiplier * 2 * clip`` per mechanism
(`fedscalar.privacy.accounting` says why) and is drawn from a generator keyed by a
secret, the round and the client, so a resumed run draws the same noise and its ledger
and weights stay bit-exact. Whoever knows the secret can subtract the noise: it stays
with the party that adds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedscalar.algorithms.base import Client, WrappedClient
from fedscalar.messages import DeltaReply, Message, ScalarReply

_SERVER_STREAM, _CLIENT_STREAM = 0, 1


@dataclass(frozen=True)
class GaussianDP:
    """Clipping and noise of one run."""

    mode: str  # "central" or "local"
    clip: float
    noise_multiplier: float
    secret: int

    @property
    def std(self) -> float:
        """Standard deviation of one mechanism's noise (sensitivity 2 x clip)."""
        return self.noise_multiplier * 2.0 * self.clip

    def clipped(self, row: np.ndarray) -> np.ndarray:
        """``row`` (float64) scaled down to L2 norm ``clip`` if longer."""
        row = np.asarray(row, dtype=np.float64)
        norm = float(np.sqrt(np.dot(row.ravel(), row.ravel())))
        return row * (self.clip / norm) if norm > self.clip else row

    def _noise(self, size: int, *coords: int) -> np.ndarray:
        rng = np.random.default_rng([self.secret, *coords])
        return rng.standard_normal(size) * self.std

    def private_mean(self, rows: np.ndarray, rnd: int) -> np.ndarray:
        """Central mode: the mean of the clipped ``rows`` (clients x values), their sum
        noised once (dividing by the count of replies is post-processing)."""
        rows = np.asarray(rows, dtype=np.float64)
        total = sum((self.clipped(r) for r in rows), np.zeros(rows.shape[1]))
        return (total + self._noise(rows.shape[1], _SERVER_STREAM, rnd)) / rows.shape[0]

    def private_row(self, row: np.ndarray, rnd: int, client: int) -> np.ndarray:
        """Local mode: one client's clipped and noised reply (float64, same shape)."""
        flat = self.clipped(np.asarray(row, dtype=np.float64).ravel())
        return (flat + self._noise(flat.size, _CLIENT_STREAM, rnd, client)).reshape(np.shape(row))


class PrivateClient(WrappedClient):
    """Local mode: each client clips and noises its reply before it leaves the client.
    The reply's loss, which depends on the client's data too, is sent as 0."""

    def __init__(self, inner: Client, dp: GaussianDP):
        super().__init__(inner)
        self.dp = dp

    def changed(self, reply: Message, client_id: int) -> Message:
        if isinstance(reply, ScalarReply):
            values = self.dp.private_row(reply.scalars, reply.round, client_id)
            return dataclasses.replace(reply, loss=0.0, scalars=values.astype(np.float32))
        if isinstance(reply, DeltaReply):
            values = self.dp.private_row(reply.values, reply.round, client_id)
            return dataclasses.replace(reply, loss=0.0, values=values.astype(np.float32))
        raise TypeError(f"no local DP for a {type(reply).__name__}")
