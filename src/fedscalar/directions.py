"""Deterministic random directions: a pure function of (seed, perturbation, parameter, position).

Every party derives the same direction from the same seed, on any device and in any
process, without communicating it. The generator is counter based: element ``j`` of
parameter tensor ``i`` for ``(seed, p)`` is bit ``j % 32`` of a 32-bit hash of the word
index ``j // 32`` under a key derived from ``(seed, p, i)``. The hash uses only integer
additions, xors, shifts and multiplications by constants below 2**31 on int64 values
kept below 2**32, so no operation overflows and the result is exact on CPU and GPU.

Directions are Rademacher (entries +1 or -1): ``E[z z^T] = I`` as for Gaussian
directions, exact in float arithmetic everywhere, and about eight times cheaper to
generate on CPU than ``torch.randn``.
"""

from __future__ import annotations

import torch

GENERATOR_ID = "rademacher-mix32x2-v1"
"""Recorded in every ledger: a ledger can only be replayed by the generator that wrote it."""

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x6B5F5A2D
CHUNK = 1 << 20
"""Elements generated at a time: bounds temporary memory to a few MB per call."""

_BYTE_SHIFTS = (0, 8, 16, 24)
_SIGN_TABLE = 1.0 - 2.0 * ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float()
"""Row b holds the 8 signs encoded by byte b, least significant bit first."""

_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def stream_key(seed: int, perturbation: int, param_index: int) -> tuple[int, int]:
    """Two 32-bit keys naming the direction stream of one parameter tensor."""
    if not (0 <= seed <= MASK32 and 0 <= perturbation < 1 << 16 and 0 <= param_index < 1 << 16):
        raise ValueError(
            f"direction key out of range: seed={seed}, perturbation={perturbation}, "
            f"param_index={param_index}"
        )
    h = _splitmix64((seed << 32) | (perturbation << 16) | param_index)
    return h & MASK32, h >> 32


def _mix(x: torch.Tensor, key: int) -> torch.Tensor:
    x = x ^ key
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


def hash_words(start_word: int, num_words: int, keys: tuple[int, int], device) -> torch.Tensor:
    """32-bit hashes (as int64) of word indices ``start_word .. start_word + num_words - 1``."""
    w = torch.arange(start_word, start_word + num_words, dtype=torch.int64, device=device)
    return _mix(_mix(w, keys[0]), keys[1])


def _tables_for(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, dtype)
    if key not in _tables:
        _tables[key] = (
            _SIGN_TABLE.to(device=device, dtype=dtype),
            torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=device),
        )
    return _tables[key]


def _byte_index(seed: int, perturbation: int, param_index: int, start: int, n: int, device):
    if start % 32:
        raise ValueError(f"start must be a multiple of 32, got {start}")
    keys = stream_key(seed, perturbation, param_index)
    return _bytes(hash_words(start // 32, (n + 31) // 32, keys, device))


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """The four bytes of each 32-bit word, least significant first (sign-table rows)."""
    _, shifts = _tables_for(words.device, torch.float32)
    return ((words[:, None] >> shifts) & 255).reshape(-1)


def rademacher(
    seed: int,
    perturbation: int,
    param_index: int,
    start: int,
    stop: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``start:stop`` (flat positions) of the direction for one parameter tensor.

    ``start`` must be a multiple of 32; the values do not depend on how a tensor is chunked.
    """
    device = torch.device(device)
    table, _ = _tables_for(device, dtype)
    idx = _byte_index(seed, perturbation, param_index, start, stop - start, device)
    return torch.index_select(table, 0, idx).reshape(-1)[: stop - start]


def rademacher_rows(
    seed: int,
    perturbations: int,
    param_index: int,
    start: int,
    stop: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`rademacher` for perturbations ``0 .. perturbations - 1`` at once, one per row
    (``perturbations x (stop - start)``): the same values, one vectorised pass."""
    if start % 32:
        raise ValueError(f"start must be a multiple of 32, got {start}")
    device = torch.device(device)
    table, _ = _tables_for(device, dtype)
    keys = [stream_key(seed, p, param_index) for p in range(perturbations)]
    k1 = torch.tensor([k[0] for k in keys], dtype=torch.int64, device=device)[:, None]
    k2 = torch.tensor([k[1] for k in keys], dtype=torch.int64, device=device)[:, None]
    n = stop - start
    words = torch.arange(start // 32, start // 32 + (n + 31) // 32, device=device)
    hashed = _mix(_mix(words.expand(perturbations, -1).clone(), k1), k2)
    idx = _bytes(hashed.reshape(-1)).reshape(perturbations, -1)
    return table[idx].reshape(perturbations, -1)[:, :n]


def add_combination_(
    out: torch.Tensor,
    terms: list[tuple[int, int, float]],
    param_index: int,
    start: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = (base or out) + sum_t coef_t * z(seed_t, p_t)`` over positions ``start:``.

    Terms are added one at a time in order, each as ``+-float(coef)`` (exact), so every
    party evaluating the same terms gets bit-identical values. ``base`` lets the first
    term be fused with a copy (``out = base + c z``), saving one pass over memory.
    """
    n = out.numel()
    table, _ = _tables_for(out.device, out.dtype)
    for k, (seed, p, coef) in enumerate(terms):
        idx = _byte_index(seed, p, param_index, start, n, out.device)
        scaled = torch.index_select(table * coef, 0, idx).reshape(-1)[:n]
        if k == 0 and base is not None:
            torch.add(base, scaled, out=out)
        else:
            out.add_(scaled)
    if not terms and base is not None:
        out.copy_(base)
    return out


def combination(
    terms: list[tuple[int, int, float]],
    param_index: int,
    start: int,
    stop: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``sum_t coef_t * z(seed_t, p_t)`` over ``start:stop`` of one parameter, in term order.

    ``terms`` holds ``(seed, perturbation, coef)``.
    """
    acc = torch.zeros(stop - start, device=device, dtype=dtype)
    return add_combination_(acc, terms, param_index, start)


def combination_segments(
    terms: list[tuple[int, int, float]],
    segments: list[tuple[int, int]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`combination` over whole parameters ``(param_index, numel)``, concatenated.

    One vectorised pass for many small tensors (biases, norms), whose per-call overhead
    would otherwise dominate; values equal `combination` on each parameter.
    """
    device = torch.device(device)
    table, _ = _tables_for(device, dtype)
    counts = torch.tensor([(n + 31) // 32 for _, n in segments], device=device)
    first_word = torch.cumsum(counts, 0) - counts
    word_index = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
        first_word, counts
    )
    keep = torch.cat(  # drop each segment's padding up to a whole word
        [
            torch.arange(n, device=device) + 32 * int(w)
            for (_, n), w in zip(segments, first_word, strict=True)
        ]
    )
    acc = torch.zeros(sum(n for _, n in segments), device=device, dtype=dtype)
    for seed, p, coef in terms:
        keys = [stream_key(seed, p, i) for i, _ in segments]
        k1 = torch.repeat_interleave(torch.tensor([k[0] for k in keys], device=device), counts)
        k2 = torch.repeat_interleave(torch.tensor([k[1] for k in keys], device=device), counts)
        idx = _bytes(_mix(_mix(word_index.clone(), k1), k2))
        signs = torch.index_select(table * coef, 0, idx).reshape(-1)
        acc.add_(signs[keep])
    return acc


def chunks(numel: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """Word-aligned ``(start, stop)`` ranges covering ``numel`` elements."""
    assert size % 32 == 0
    return [(s, min(s + size, numel)) for s in range(0, numel, size)]
