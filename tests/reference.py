"""Independent re-implementations used as test oracles (plain Python and NumPy only)."""

from __future__ import annotations

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
