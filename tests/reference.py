"""Independent re-implementations used as test oracles (plain Python and NumPy only)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix_u32(x: np.ndarray, key: int) -> np.ndarray:
    """The 32-bit mixer in uint32 arithmetic (NumPy wraps modulo 2**32 by definition)."""
    x = x ^ np.uint32(key)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x6B5F5A2D)
    return x ^ (x >> np.uint32(16))


def rademacher(seed: int, perturbation: int, param_index: int, numel: int) -> np.ndarray:
    """Direction entries: bit (j % 32) of word j // 32, 1 -> -1.0 and 0 -> +1.0."""
    h = splitmix64((seed << 32) | (perturbation << 16) | param_index)
    k1, k2 = h & 0xFFFFFFFF, h >> 32
    words = np.arange((numel + 31) // 32, dtype=np.uint32)
    with np.errstate(over="ignore"):
        hashed = _mix_u32(_mix_u32(words, k1), k2)
    bits = (hashed[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return (1.0 - 2.0 * bits.reshape(-1)[:numel]).astype(np.float32)


# --- A NumPy-only replay of a run folder, written from docs/protocol.md -------------------

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """``u64 n``, ``n`` bytes of JSON (name -> dtype, shape, data_offsets), then the data."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], _ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_ledger(path) -> tuple[dict, list[tuple[int, float, list[int], np.ndarray]]]:
    """The header and the ``(round, lr, seeds, scalars[K, P])`` records of ``ledger.bin``."""
    raw = Path(path).read_bytes()
    assert raw[:8] == b"FSLEDGER"
    version, n = struct.unpack_from("<HI", raw, 8)
    assert version in (1, 2)
    header = json.loads(raw[14 : 14 + n])
    records, pos = [], 14 + n
    if version == 2:  # the header's CRC-32 follows it
        assert struct.unpack_from("<I", raw, pos)[0] == zlib.crc32(raw[14 : 14 + n])
        pos += 4
    while pos < len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        body = raw[pos + 4 : pos + 4 + length]
        (crc,) = struct.unpack_from("<I", raw, pos + 4 + length)
        assert zlib.crc32(body) == crc
        tag, rnd, k, p, lr = struct.unpack_from("<BIBBf", body)
        assert tag == 3 and rnd == len(records) + 1 and length == 11 + 4 * k + 4 * k * p
        seeds = list(struct.unpack_from(f"<{k}I", body, 11))
        scalars = np.frombuffer(body[11 + 4 * k :], "<f4").reshape(k, p)
        records.append((rnd, lr, seeds, scalars))
        pos += 8 + length
    return header, records


def replay(run_dir, rounds: int | None = None) -> tuple[dict, dict | None]:
    """Weights (and HiSo's H) after ``rounds`` rounds, from ``base.safetensors`` and
    ``ledger.bin`` alone, with arithmetic v2 in NumPy's IEEE float32/float64 operations."""
    run_dir = Path(run_dir)
    header, records = read_ledger(run_dir / "ledger.bin")
    assert header["generator"] == "rademacher-mix32x2-v1" and header["arithmetic"] == "v2"
    base = read_safetensors(run_dir / "base.safetensors")
    names = [name for name, _ in header["parameters"]]
    x = [base[name].astype(np.float32).reshape(-1).copy() for name in names]
    hiso = header["hiso"]
    h = [np.ones_like(v) for v in x] if hiso else None
    for _, lr, seeds, scalars in records[:rounds]:
        if lr == 0.0:  # a skipped round changes nothing
            continue
        k_steps, p_count = scalars.shape
        for i, xi in enumerate(x):
            r = None
            if hiso:  # sqrt of float32(H + eps), correctly rounded (double rounding is exact)
                s = h[i] + np.float32(hiso["eps"])
                r = np.sqrt(s.astype(np.float64)).astype(np.float32)
            for k in range(k_steps):
                d = np.zeros_like(xi)
                for p in range(p_count):
                    coef = np.float32(scalars[k, p]) / np.float32(p_count)
                    d = d + coef * rademacher(seeds[k], p, i, xi.size)
                if r is not None:
                    d = d / r
                step = np.float64(np.float32(lr)) * d.astype(np.float64)
                xi[:] = (xi.astype(np.float64) - step).astype(np.float32)
                if hiso and (hiso["update"] == "all" or k == k_steps - 1):
                    b = np.float64(np.float32(hiso["beta"]))
                    a = np.float64(np.float32(1.0 - hiso["beta"]))
                    d64 = d.astype(np.float64)
                    h[i] = (b * h[i].astype(np.float64) + a * (d64 * d64)).astype(np.float32)
    shapes = dict(header["parameters"])
    weights = {n: v.reshape(shapes[n]) for n, v in zip(names, x, strict=True)}
    curvature = {n: v for n, v in zip(names, h, strict=True)} if hiso else None
    return weights, curvature
