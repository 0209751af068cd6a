"""Deterministic schedules: which clients, which seeds, which minibatches.

Each draw is a pure function of the run seed and its coordinates (round, client, local
step), never of a generator's running state, so a resumed run makes exactly the draws
an uninterrupted run makes, and any party can recompute them.
"""

from __future__ import annotations

import math

import numpy as np

_CLIENTS, _SEEDS, _BATCH, _PARTITION = 0, 1, 2, 3
ATTACK, POOL, CLIENT_SEEDS, COMPRESS, ATTACKERS, POOL_DRAW = 4, 5, 6, 7, 8, 9
"""Stream ids for the draws of the baselines and robustness experiments."""


def _rng(*coords: int) -> np.random.Generator:
    return np.random.default_rng(list(coords))


def rng_for(run_seed: int, stream: int, *coords: int) -> np.random.Generator:
    """A generator for one draw of ``stream`` at the given coordinates."""
    return _rng(run_seed, stream, *coords)


def sample_clients(run_seed: int, rnd: int, clients: int, sampled: int) -> list[int]:
    """The ``sampled`` client ids (sorted) taking part in round ``rnd``."""
    pick = _rng(run_seed, _CLIENTS, rnd).choice(clients, size=sampled, replace=False)
    return sorted(int(c) for c in pick)


def round_seeds(run_seed: int, rnd: int, local_steps: int) -> tuple[int, ...]:
    """The K direction seeds shared by every client in round ``rnd`` (32-bit each)."""
    return tuple(int(s) for s in _rng(run_seed, _SEEDS, rnd).integers(0, 2**32, local_steps))


def batch_positions(
    run_seed: int, rnd: int, client: int, step: int, size: int, n: int
) -> np.ndarray:
    """Positions (into a client's ``n`` examples) of its minibatch at (round, local step)."""
    return _rng(run_seed, _BATCH, rnd, client, step).choice(n, size=min(size, n), replace=False)


def partition_seed(run_seed: int) -> int:
    return int(_rng(run_seed, _PARTITION).integers(0, 2**31))


def client_seeds(run_seed: int, rnd: int, client: int, local_steps: int) -> tuple[int, ...]:
    """Direction seeds private to one client in one round (FedZO: each client explores
    its own directions, as it uploads the whole vector anyway)."""
    rng = _rng(run_seed, CLIENT_SEEDS, rnd, client)
    return tuple(int(s) for s in rng.integers(0, 2**32, local_steps))


def seed_pool(run_seed: int, size: int) -> tuple[int, ...]:
    """FedKSeed's ``size`` distinct candidate seeds, fixed for the whole run."""
    rng = _rng(run_seed, POOL)
    seen: dict[int, None] = {}
    while len(seen) < size:
        for s in rng.integers(0, 2**32, size):
            seen.setdefault(int(s))
            if len(seen) == size:
                break
    return tuple(seen)


def pool_index(
    round_seed: int, client: int, step: int, probabilities: np.ndarray | None, size: int
) -> int:
    """The pool seed a FedKSeed client uses at a local step: uniform, or by probability."""
    rng = _rng(round_seed, POOL_DRAW, client, step)
    if probabilities is None:
        return int(rng.integers(0, size))
    p = probabilities.astype(np.float64)
    return int(rng.choice(size, p=p / p.sum()))


def attackers(run_seed: int, clients: int, count: int) -> frozenset[int]:
    """Which ``count`` client ids are Byzantine in a robustness experiment."""
    if count == 0:
        return frozenset()
    return frozenset(int(c) for c in _rng(run_seed, ATTACKERS).choice(clients, count, False))


def learning_rate(
    lr: float,
    rnd: int,
    *,
    kind: str = "constant",
    warmup: int = 0,
    decay_rounds: int = 0,
    decay_to: float = 0.1,
) -> float:
    """The learning rate of round ``rnd`` (1-based): a pure function of its arguments.

    A linear warm-up from ``lr / warmup`` to ``lr`` over the first ``warmup`` rounds,
    then ``constant``, or a ``cosine`` or ``linear`` decay from ``lr`` to
    ``decay_to * lr`` at round ``decay_rounds``, after which it stays there.
    """
    if warmup and rnd <= warmup:
        return lr * rnd / warmup
    if kind == "constant" or decay_rounds <= warmup:
        return lr
    t = min(1.0, (rnd - warmup) / (decay_rounds - warmup))
    low = lr * decay_to
    if kind == "cosine":
        return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "linear":
        return lr - (lr - low) * t
    raise ValueError(f"lr_schedule: unknown schedule {kind!r}")
