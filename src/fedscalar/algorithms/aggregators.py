"""How a server combines its clients' replies: the mean, or a Byzantine-robust rule.

Every rule takes one row per client (the K x P scalars of a ZO reply flattened, or a
dense weight change) and returns one row. Rows come in client-id order, so the result is
deterministic.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")


def default_krum_f(replies: int) -> int:
    """The most faulty replies Krum tolerates among ``replies``: it needs n > 2f + 2."""
    return max(0, (replies - 3) // 2)


class PrivateMean(Protocol):
    def private_mean(self, rows: np.ndarray, rnd: int) -> np.ndarray: ...


def combine(
    rows: np.ndarray,
    rnd: int,
    rule: str,
    trim_fraction: float,
    krum_f: int | None,
    dp: PrivateMean | None = None,
) -> np.ndarray:
    """A server's combined row for round ``rnd``: under central DP (``dp``) the noised
    mean of the clipped rows, else `aggregate` by ``rule``."""
    if dp is not None:
        return dp.private_mean(rows, rnd)
    return aggregate(rows, rule, trim_fraction, krum_f)


def aggregate(rows: np.ndarray, rule: str, trim_fraction: float = 0.2, krum_f: int | None = None):
    """Combine ``rows`` (clients x values, float64) into one float64 row by ``rule``.

    - ``mean``: the average.
    - ``median``: the coordinate-wise median.
    - ``trimmed-mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and
      smallest values and average the rest.
    - ``krum``: the row with the smallest sum of squared distances to its ``n - f - 2``
      nearest other rows (Blanchard et al. 2017); ``f`` defaults to `default_krum_f`.
      With too few rows for that, it falls back to the median.
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {rule!r} (choose from {', '.join(AGGREGATORS)})")
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    if n == 0:
        raise ValueError("nothing to aggregate")
    if rule == "mean" or n == 1:
        return rows.mean(axis=0)
    if rule == "median":
        return np.median(rows, axis=0)
    if rule == "trimmed-mean":
        t = int(np.floor(trim_fraction * n))
        t = min(t, (n - 1) // 2)
        return np.sort(rows, axis=0)[t : n - t].mean(axis=0)
    if rule == "krum":
        f = default_krum_f(n) if krum_f is None else krum_f
        near = n - f - 2
        if near < 1:
            return np.median(rows, axis=0)
        sq = (rows * rows).sum(axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
        np.fill_diagonal(dist, np.inf)
        scores = np.sort(dist, axis=1)[:, :near].sum(axis=1)
        return rows[int(np.argmin(scores))].copy()
    raise ValueError(f"unknown aggregator {rule!r} (choose from {', '.join(AGGREGATORS)})")
