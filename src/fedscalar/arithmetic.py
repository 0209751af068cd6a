"""How a global update changes the weights (and HiSo's curvature H), bit for bit.

Every party applies every global update with the functions here, so its result must not
depend on the device or on the CPU's instruction set. Two versions exist; the ledger
header names the one a run uses (``arithmetic``; a header without it is ``v1``):

``v2`` (runs started by this version on): only operations whose result IEEE 754 fixes,
in a fixed order, so any IEEE-754 device computes the same bits (docs/protocol.md is the
normative description; ``tests/reference.py`` replays it in NumPy):

- a step's direction sum ``d = sum_p c_p z_p`` adds the terms ``+-c_p`` (exact) one at
  a time in float32, in perturbation order;
- HiSo: ``r = sqrt(H + eps)`` is the correctly rounded float32 square root of the
  float32 sum ``H + eps``, and ``d <- d / r`` is one float32 division;
- ``x <- f32(f64(x) - f64(lr) * f64(d))``: the product is exact in float64, the
  difference is rounded to float64, the result to float32 (no fused multiply-add);
- HiSo: ``H <- f32(f64(b) * f64(H) + f64(a) * (f64(d) * f64(d)))`` with ``b = f32(beta)``
  and ``a = f32(1 - beta)`` (``1 - beta`` computed in float64), the operations in that
  order, each rounded to float64.

``v1`` (runs written before): float32 operations as PyTorch's kernels do them (one fused
multiply-add for ``x - lr d`` on most CPUs, PyTorch's float32 square root), which differ
between instruction sets and devices. It is kept, unchanged, so that older ledgers
replay exactly on the kind of machine that wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedscalar import directions

ARITHMETIC = ("v1", "v2")
CURRENT = "v2"

Steps = Sequence[Sequence[tuple[int, int, float]]]
"""Per local step, the ``(seed, perturbation, coefficient)`` terms of its direction sum."""


def correctly_rounded_sqrt(v: torch.Tensor) -> torch.Tensor:
    """The IEEE (correctly rounded) float32 square root of the float32 tensor ``v >= 0``.

    PyTorch's float32 (and float64) ``sqrt`` kernels on x86 CPUs are not correctly
    rounded. On the CPU, NumPy's float32 square root is the instruction set's IEEE one;
    elsewhere `_corrected_sqrt` makes any square root within one float32 unit exact.
    """
    if v.device.type == "cpu":
        return torch.from_numpy(np.sqrt(v.contiguous().numpy()))
    return _corrected_sqrt(v)


def _corrected_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``r = f32(sqrt(f64(v)))`` is within one float32 unit of the correctly rounded root
    whatever the device's square root; one exact check in float64 makes it that root:
    ``r`` is right iff ``(r - u/2)^2 <= v < (r + u/2)^2`` with ``u`` its unit in the last
    place (the bounds have 25 significant bits, their squares 50: exact in float64)."""
    return _nearest_root(v, torch.sqrt(v.double()).float())


def _nearest_root(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of ``v``, given ``r`` within one unit of it."""
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.zeros_like(r))
    r64, v64 = r.double(), v.double()
    low = (r64 + down.double()) * 0.5  # midpoints: exact in float64
    high = (r64 + up.double()) * 0.5
    r = torch.where(v64 < low * low, down, r)
    return torch.where(v64 > high * high, up, r)


def apply_(
    params: Sequence[torch.Tensor],
    curvature: Sequence[torch.Tensor] | None,
    steps: Steps,
    lr: float,
    *,
    eps: float = 1e-8,
    beta: float = 0.95,
    update_all: bool = False,
    version: str = CURRENT,
) -> None:
    """``x <- x - lr d_k`` for each step k, in place; HiSo (``curvature`` given) divides
    each ``d_k`` by ``sqrt(H + eps)`` of the round-start H and then updates H from the
    last step's ``d`` (or from each step in turn, ``update_all``)."""
    if version not in ARITHMETIC:
        raise ValueError(f"arithmetic: unknown version {version!r} (known: {ARITHMETIC})")
    last = len(steps) - 1
    buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for i, param in enumerate(params):
            flat = param.data.view(-1)
            h = curvature[i] if curvature is not None else None
            for start, stop in directions.chunks(param.numel()):
                x = flat[start:stop]
                hc = h[start:stop] if h is not None else None
                if version == "v1":
                    _chunk_v1(x, hc, steps, i, start, stop, lr, eps, beta, update_all)
                    continue
                if x.device not in buffers:  # float64 scratch, reused: no allocation per chunk
                    size = min(directions.CHUNK, max(p.numel() for p in params))
                    scratch = torch.empty(2, size, dtype=torch.float64, device=x.device)
                    buffers[x.device] = (scratch[0], scratch[1])
                x64, d64 = (b[: stop - start] for b in buffers[x.device])
                _chunk_v2(x, hc, x64, d64, steps, i, start, stop, lr, eps, beta, update_all, last)


def _chunk_v2(x, h, x64, d64, steps, index, start, stop, lr, eps, beta, update_all, last):
    r = correctly_rounded_sqrt(h + float(np.float32(eps))) if h is not None else None
    lr64 = float(np.float32(lr))  # the ledger's float32 rate, exactly
    b64, a64 = float(np.float32(beta)), float(np.float32(1.0 - beta))
    for k, terms in enumerate(steps):
        d = directions.combination(terms, index, start, stop, device=x.device)
        if r is not None:
            d.div_(r)
        d64.copy_(d)
        # lr * d is exact in float64, so a fused multiply-add rounds exactly as the
        # separate subtraction does: one rounding to float64, then one to float32
        x64.copy_(x).sub_(d64, alpha=lr64)
        x.copy_(x64 if x.dtype == torch.float32 else x64.float())
        if h is not None and (update_all or k == last):
            d64.mul_(d64).mul_(a64)  # d * d exact, times a rounded
            h.copy_(d64.add_(x64.copy_(h), alpha=b64))  # b * H exact: one rounding either way


def _chunk_v1(x, h, steps, index, start, stop, lr, eps, beta, update_all) -> None:
    """The update of runs written before version 2, operation for operation."""
    from fedscalar.params import work_dtype

    wd = work_dtype(x)
    denom = torch.sqrt(h + eps).to(wd) if h is not None else None
    for k, terms in enumerate(steps):
        d = directions.combination(terms, index, start, stop, device=x.device, dtype=wd)
        if denom is not None:
            d.div_(denom)
        x.add_(d.to(x.dtype), alpha=-lr)
        if h is not None and (update_all or k == len(steps) - 1):
            h.mul_(beta).add_((d * d).to(h.dtype), alpha=1 - beta)
