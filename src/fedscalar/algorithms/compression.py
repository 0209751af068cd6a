"""Upload compression for the FedAvg family: top-k sparsification and QSGD quantisation.

Both are used with error feedback: a client adds what its earlier compressions dropped
(its residual) to the new weight change before compressing, and keeps what this
compression drops for next time, so nothing is lost, only delayed.
"""

from __future__ import annotations

import math

import numpy as np

from fedscalar.messages import (
    DeltaReply,
    Message,
    QuantizedDeltaReply,
    SparseDeltaReply,
)


class Compressor:
    """No compression: the dense delta (plain FedAvg, FedZO)."""

    name = "none"

    def compress(self, rnd: int, loss: float, v: np.ndarray, rng: np.random.Generator) -> Message:
        return DeltaReply(rnd, loss, v.astype(np.float32))

    def max_bytes(self, n: int) -> int:
        return DeltaReply.encoded_size(n)

    def reply_type(self) -> type:
        return DeltaReply


class TopK(Compressor):
    """Keep the ``ceil(fraction * n)`` entries of largest magnitude."""

    name = "topk"

    def __init__(self, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def count(self, n: int) -> int:
        return max(1, math.ceil(self.fraction * n))

    def compress(self, rnd, loss, v, rng) -> Message:
        k = self.count(v.size)
        idx = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k :]).astype(np.uint32)
        return SparseDeltaReply(rnd, loss, v.size, idx, v[idx].astype(np.float32))

    def max_bytes(self, n: int) -> int:
        return SparseDeltaReply.max_size(self.count(n))

    def reply_type(self) -> type:
        return SparseDeltaReply


def levels(bits: int) -> int:
    """Magnitude levels of a signed ``bits``-bit code: codes 0..2L stand for -L..L."""
    return 2 ** (bits - 1) - 1


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``bits`` bits per code, least significant bit first, padded to whole bytes."""
    planes = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, n: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, np.uint8), count=n * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return flat.reshape(n, bits).astype(np.uint32) @ weights


class QSGD(Compressor):
    """Stochastic rounding to ``2L + 1`` levels of ``max|v|`` (unbiased; QSGD with the
    infinity norm, which has lower variance than QSGD's 2-norm at few bits)."""

    name = "qsgd"

    def __init__(self, bits: int):
        if not 2 <= bits <= 16:
            raise ValueError(f"qsgd bits must be 2 to 16, got {bits}")
        self.bits = bits

    def compress(self, rnd, loss, v, rng) -> Message:
        L = levels(self.bits)
        scale = float(np.float32(np.abs(v).max())) if v.size else 0.0
        if scale == 0.0 or not np.isfinite(scale):
            codes = np.full(v.size, L, np.uint32)
            scale = scale if np.isfinite(scale) else float("nan")
        else:
            level = np.abs(v.astype(np.float64)) / scale * L
            low = np.floor(level)
            q = low + (rng.random(v.size) < level - low)
            codes = (L + np.sign(v) * np.minimum(q, L)).astype(np.uint32)
        return QuantizedDeltaReply(
            rnd, loss, v.size, self.bits, scale, pack_codes(codes, self.bits)
        )

    def max_bytes(self, n: int) -> int:
        return QuantizedDeltaReply.encoded_size(n, self.bits)

    def reply_type(self) -> type:
        return QuantizedDeltaReply


def dense(reply: Message, n: int) -> np.ndarray:
    """The float32 weight change a delta reply stands for; ValueError if it is invalid."""
    if isinstance(reply, DeltaReply):
        if reply.values.size != n:
            raise ValueError(f"a delta of {reply.values.size} values for {n}")
        return reply.values
    if isinstance(reply, SparseDeltaReply):
        if reply.size != n:
            raise ValueError(f"a sparse delta over {reply.size} values for {n}")
        out = np.zeros(n, np.float32)
        out[reply.indices] = reply.values
        return out
    if isinstance(reply, QuantizedDeltaReply):
        if reply.size != n:
            raise ValueError(f"a quantised delta of {reply.size} values for {n}")
        L = levels(reply.bits)
        codes = unpack_codes(reply.codes, n, reply.bits)
        if n and int(codes.max()) > 2 * L:
            raise ValueError(f"a {reply.bits}-bit code above {2 * L}")
        return ((codes.astype(np.float64) - L) / L * reply.scale).astype(np.float32)
    raise TypeError(f"not a delta reply: {type(reply).__name__}")


def make_compressor(algorithm: str, topk_fraction: float, qsgd_bits: int) -> Compressor:
    if algorithm == "fedavg-topk":
        return TopK(topk_fraction)
    if algorithm == "fedavg-qsgd":
        return QSGD(qsgd_bits)
    return Compressor()
