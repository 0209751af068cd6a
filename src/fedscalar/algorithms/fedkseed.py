"""FedKSeed and FedKSeed-Pro (arXiv 2312.06353): ZO steps along a finite pool of seeds.

A pool of ``Kc`` candidate seeds is fixed for the run (`fedscalar.schedule.seed_pool`).
At each local step a client picks one pool seed (uniformly, or for FedKSeed-Pro with
the probabilities the server sends), measures P directional derivatives along
``z(seed, p)`` at its locally updated point, and uploads (pool index, P scalars) per
step. The server's global update is the mean over clients of their local steps:

    x <- x - lr * (1/m) sum_i sum_k (1/P) sum_p g_ikp z(pool[j_ik], p)

recorded in the ledger as one `GlobalUpdate` with m*K entries, so the run replays and
exports like DeComFL's. Because every direction comes from the pool, the whole history
collapses to ``Kc * P`` per-direction accumulators: a client that missed rounds gets
one `SeedSync` with the change of the accumulators it has not applied (at most
``Kc * P`` entries however long it was away) instead of a replay of every round.

Exactness: a client applying a `SeedSync` adds the summed coefficients in one pass, the
server added them round by round, so their weights agree to float32 rounding (tested
to a stated tolerance), not bit for bit. In the in-process simulator the clients share
the server's state and nothing is re-applied.
"""

from __future__ import annotations

import numpy as np
import torch

from fedscalar import directions, schedule
from fedscalar.algorithms.base import (
    ClientData,
    RejectedReply,
    check_round,
    check_values,
)
from fedscalar.algorithms.zo import ProtocolError, ReplayServer, ZOAlgorithm, ZOClient, ZOState
from fedscalar.messages import (
    GlobalUpdate,
    Message,
    SeedProbabilities,
    SeedReply,
    SeedSync,
    TrainRequest,
    encode,
)
from fedscalar.params import Term, work_dtype


def add_terms_(state: ZOState, terms: list[Term]) -> None:
    """``x += sum_t c_t z_t`` in place, chunk by chunk."""
    with torch.no_grad():
        for i, param in enumerate(state.space.params):
            flat = param.data.view(-1)
            for start, stop in directions.chunks(param.numel()):
                d = directions.combination(
                    terms, i, start, stop, device=param.device, dtype=work_dtype(param)
                )
                flat[start:stop].add_(d.to(param.dtype))


def probabilities(amp_sum: np.ndarray, amp_count: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro's sampling distribution over the pool.

    A seed's score is the mean magnitude of the aggregated scalars measured along it
    (seeds never used get the highest score seen, so they keep being explored); scores
    are min-max normalised to [0, 1] and passed through a softmax.
    """
    seen = amp_count > 0
    if not seen.any():
        return np.full(amp_sum.size, 1.0 / amp_sum.size, np.float32)
    score = np.where(seen, amp_sum / np.maximum(amp_count, 1), 0.0)
    score[~seen] = score[seen].max()
    span = score.max() - score.min()
    norm = (score - score.min()) / span if span > 0 else np.zeros_like(score)
    e = np.exp(norm - norm.max())
    return (e / e.sum()).astype(np.float32)


class FedKSeedClient(ZOClient):
    """A ZO client whose replica is kept up to date by `SeedSync` (or replayed exactly
    from the ledger, as `ZOClient` does)."""

    def __init__(self, algo: ZOAlgorithm, state: ZOState, pool: tuple[int, ...]):
        super().__init__(algo, state)
        self.pool = pool
        self.probabilities: np.ndarray | None = None

    def sync(self, msg: SeedSync) -> None:
        """Apply the accumulated change the server sent (skipped if already there)."""
        if msg.round <= self.state.round:
            return
        if msg.since != self.state.round:
            raise ProtocolError(
                f"a seed-sync from round {msg.since} for a client at round {self.state.round}"
            )
        p_count = self.algo.s.perturbations
        if msg.keys.size and int(msg.keys[-1]) >= len(self.pool) * p_count:
            raise ProtocolError("a seed-sync key outside the pool")
        terms = [
            (self.pool[int(k) // p_count], int(k) % p_count, float(v))
            for k, v in zip(msg.keys, msg.values, strict=True)
        ]
        add_terms_(self.state, terms)
        self.state.round = msg.round

    def train(self, request: TrainRequest, data: ClientData) -> SeedReply:
        """DeComFL's local steps, each along a pool seed the round's seed picks."""
        indices: list[int] = []

        def pool_seed(k: int, round_seed: int) -> int:
            j = schedule.pool_index(
                round_seed, data.client_id, k, self.probabilities, len(self.pool)
            )
            indices.append(j)
            return self.pool[j]

        loss, scalars = self.algo.local_steps(self.state, request, data, pool_seed, "sync")
        return SeedReply(request.round, loss, tuple(indices), scalars)

    def handle(self, messages: list[Message], data: ClientData) -> Message:
        reply: Message | None = None
        for msg in messages:
            if isinstance(msg, SeedSync):
                self.sync(msg)
            elif isinstance(msg, SeedProbabilities):
                if msg.probabilities.size != len(self.pool):
                    raise ProtocolError("probabilities for a pool of another size")
                self.probabilities = msg.probabilities
            elif isinstance(msg, TrainRequest):
                reply = self.train(msg, data)
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} for a FedKSeed client")
        if reply is None:
            raise ProtocolError("no TrainRequest in the round's messages")
        return reply


class FedKSeedServer(ReplayServer):
    def __init__(
        self,
        algo: ZOAlgorithm,
        state: ZOState,
        history: list[GlobalUpdate],
        pool: tuple[int, ...],
        pro: bool,
    ):
        super().__init__(algo, state, history)
        self.pool, self.pro = pool, pro
        self.index = {s: j for j, s in enumerate(pool)}
        self.amp_sum = np.zeros(len(pool))
        self.amp_count = np.zeros(len(pool))
        self._stats_upto = 0  # rounds of the history counted in the amplitude statistics

    def sync_message(self, have: int, now: int) -> SeedSync:
        """The change of the per-direction accumulators over rounds ``have+1..now``."""
        p_count = self.algo.s.perturbations
        acc: dict[int, float] = {}
        for u in self.history[have:now]:
            if u.lr == 0:
                continue
            coef = -float(u.lr) / p_count
            for e, seed in enumerate(u.seeds):
                base = self.index[seed] * p_count
                for p in range(p_count):
                    acc[base + p] = acc.get(base + p, 0.0) + coef * float(u.scalars[e, p])
        keys = np.array(sorted(acc), dtype=np.uint32)
        values = np.array([acc[int(k)] for k in keys], dtype=np.float32)
        return SeedSync(now, have, keys, values)

    def current_probabilities(self) -> np.ndarray:
        rnd = self.state.round
        for u in self.history[self._stats_upto : rnd]:
            for e, seed in enumerate(u.seeds):
                j = self.index[seed]
                self.amp_sum[j] += float(np.abs(u.scalars[e]).mean())
                self.amp_count[j] += 1
        self._stats_upto = rnd
        return probabilities(self.amp_sum, self.amp_count)

    def messages_for(self, client_id, rnd, lr, seeds) -> list[Message]:
        have = self.synced.get(client_id, 0)
        msgs: list[Message] = []
        if have < rnd - 1:
            msgs.append(self.sync_message(have, rnd - 1))
        if self.pro:
            msgs.append(SeedProbabilities(rnd, self.current_probabilities()))
        msgs.append(TrainRequest(rnd, lr, tuple(seeds)))
        return msgs

    def max_reply_bytes(self, seeds):
        k, p = len(seeds), self.algo.s.perturbations
        return len(encode(SeedReply(0, 0.0, (0,) * k, np.zeros((k, p), np.float32))))

    def check_reply(self, rnd, seeds, reply) -> None:
        check_round(SeedReply, rnd, reply)
        shape = (len(seeds), self.algo.s.perturbations)
        if reply.scalars.shape != shape:
            raise RejectedReply(f"{reply.scalars.shape} scalars, expected {shape} (K x P)")
        if any(j >= len(self.pool) for j in reply.indices):
            raise RejectedReply(f"a seed index outside the pool of {len(self.pool)}")
        check_values(reply.loss, reply.scalars)

    def aggregate(self, rnd, lr, seeds, replies):
        cids = sorted(replies)
        m = len(cids)
        entry_seeds = tuple(self.pool[j] for c in cids for j in replies[c].indices)
        scalars = np.concatenate([replies[c].scalars.astype(np.float64) for c in cids]) / m
        update = GlobalUpdate(rnd, float(np.float32(lr)), entry_seeds, scalars.astype(np.float32))
        self._commit(update, cids)
        return update, float(np.mean([replies[c].loss for c in cids]))

    def skip(self, rnd, seeds) -> GlobalUpdate:
        p = self.algo.s.perturbations
        update = GlobalUpdate(rnd, 0.0, (), np.zeros((0, p), np.float32))
        self.apply(update)
        return update
