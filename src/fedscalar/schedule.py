"""Deterministic schedules: which clients, which seeds, which minibatches.

Each draw is a pure function of the run seed and its coordinates (round, client, local
step), never of a generator's running state, so a resumed run makes exactly the draws
an uninterrupted run makes, and any party can recompute them.
"""

from __future__ import annotations

import numpy as np

_CLIENTS, _SEEDS, _BATCH, _PARTITION = 0, 1, 2, 3


def _rng(*coords: int) -> np.random.Generator:
    return np.random.default_rng(list(coords))


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
