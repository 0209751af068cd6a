"""FeedSign (arXiv 2501.17610): one bit up and one vote down per direction.

Each round the server's seed gives a direction z; every sampled client measures the ZO
directional derivative of its loss along z (DESIGN.md 2.1) and uploads only its sign.
The server takes the majority vote ``v = sign(sum of signs)`` and every party applies
``x <- x - lr * v * z``. As published, P = 1 and K = 1. The natural generalisations:

- P > 1: one vote per direction, ``x <- x - lr * (1/P) sum_p v_p z_p`` (DeComFL's update
  with each averaged scalar replaced by its vote);
- K > 1: each local step moves the client's copy by its own signs, ``-lr/P sum_p s_kp
  z_kp``, before measuring the next step; the server votes per (step, direction).

A tie (an even number of replies split evenly) is a vote of 0: that direction is not
taken. Votes are ledger scalars in {-1, 0, +1}, so replay, resume and export are those of
DeComFL, bit for bit. The vote is itself the robust rule: one reply moves it by at most
one, whatever its attacker wanted.
"""

from __future__ import annotations

import numpy as np

from fedscalar.algorithms.base import RejectedReply, check_round, check_values
from fedscalar.algorithms.zo import ZOAlgorithm, ZOServer
from fedscalar.messages import (
    GlobalUpdate,
    SignReply,
    TrainRequest,
    VoteCatchUp,
)


def signs(values: np.ndarray) -> np.ndarray:
    """+1 where ``values >= 0``, -1 elsewhere (a zero derivative votes +1)."""
    return np.where(np.asarray(values) >= 0, np.float32(1.0), np.float32(-1.0)).astype(np.float32)


def majority(rows: np.ndarray) -> np.ndarray:
    """The sign of the column sums of +-1 rows: -1, 0 (a tie) or +1."""
    return np.sign(rows.sum(axis=0)).astype(np.float32)


class FeedSignAlgorithm(ZOAlgorithm):
    """DeComFL's estimator and update, with signs for scalars."""

    def __init__(self, settings):
        super().__init__(settings)
        self.name = "feedsign"

    def local_value(self, g: np.ndarray) -> np.ndarray:
        return signs(g)

    def train(self, state, request: TrainRequest, data) -> SignReply:
        loss, scalars = self.local_steps(state, request, data)
        return SignReply(request.round, loss, scalars)


class FeedSignServer(ZOServer):
    """Takes the majority vote of the sign replies; catch-up carries votes at 2 bits."""

    CATCH_UP = VoteCatchUp

    def max_reply_bytes(self, seeds):
        return SignReply.encoded_size(*self._shape(seeds))

    def check_reply(self, rnd, seeds, reply) -> None:
        check_round(SignReply, rnd, reply)
        if reply.signs.shape != self._shape(seeds):
            raise RejectedReply(f"{reply.signs.shape} signs, expected {self._shape(seeds)} (K x P)")
        check_values(reply.loss, reply.signs)

    def aggregate(self, rnd, lr, seeds, replies):
        cids = sorted(replies)
        votes = majority(np.stack([replies[c].signs for c in cids]))
        update = GlobalUpdate(rnd, float(np.float32(lr)), tuple(seeds), votes)
        self._commit(update, cids)
        return update, float(np.mean([replies[c].loss for c in cids]))
