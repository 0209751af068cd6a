"""Typed protocol messages and their one binary encoding (little endian).

Byte counts reported anywhere in fedscalar are ``len(encode(message))`` of the real
messages a run exchanged. Decoding checks every length and value range and raises
`MessageError` naming the problem, so malformed input from the network never reaches an
algorithm.

Layouts (``u8``/``u32`` unsigned ints, ``f32`` IEEE floats):

- `TrainRequest`   ``u8 tag, u32 round, f32 lr, u8 K, K*u32 seeds``         (14 B for K=1)
- `ScalarReply`    ``u8 tag, u32 round, u8 K, u8 P, f32 loss, K*P*f32``     (31 B for K=1, P=5)
- `GlobalUpdate`   ``u8 tag, u32 round, u8 K, u8 P, f32 lr, K*u32, K*P*f32`` (35 B for K=1, P=5)
- `CatchUp`        ``u8 tag, u32 first_round, u32 count, u8 K, u8 P`` then per round
                   ``f32 lr, K*u32 seeds, K*P*f32 scalars``                 (11 + 28/round)
- `StateMessage`   ``u8 tag, u32 round, u32 n, u8 has_h, n*f32 weights[, n*f32 H]``
- `WeightsMessage` ``u8 tag, u32 round, f32 lr, u32 n, n*f32``
- `DeltaReply`     ``u8 tag, u32 round, f32 loss, u32 n, n*f32``
- `SparseDeltaReply` ``u8 tag, u32 round, f32 loss, u32 n, u32 c, c*u32 index, c*f32``
- `QuantizedDeltaReply` ``u8 tag, u32 round, f32 loss, u32 n, u8 bits, f32 scale,``
                   ``ceil(n*bits/8)`` bytes of codes (``bits`` per value, LSB first)
- `SeedReply`      ``u8 tag, u32 round, f32 loss, u8 K, u8 P, K*u32 index, K*P*f32``
- `SeedSync`       ``u8 tag, u32 round, u32 c, c*u32 key, c*f32``  (9 + 8 per changed key)
- `SeedProbabilities` ``u8 tag, u32 round, u32 n, n*f32``
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np


class MessageError(ValueError):
    """A byte string is not a valid message."""


_U32_MAX = 0xFFFFFFFF


def _f32(values, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape != shape:
        raise MessageError(f"expected scalars of shape {shape}, got {arr.shape}")
    return arr


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client: train at ``round`` with these local-step seeds and lr."""

    TAG = 1
    round: int
    lr: float
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class ScalarReply:
    """Client -> server: K x P directional derivatives and the loss at the start point."""

    TAG = 2
    round: int
    loss: float
    scalars: np.ndarray  # float32, shape (K, P)


@dataclass(frozen=True)
class GlobalUpdate:
    """One round's agreed update: the ledger entry, and the unit of catch-up."""

    TAG = 3
    round: int
    lr: float
    seeds: tuple[int, ...]
    scalars: np.ndarray  # float32, shape (K, P)


@dataclass(frozen=True)
class CatchUp:
    """Server -> client: the global updates of consecutive rounds the client has missed."""

    TAG = 4
    updates: tuple[GlobalUpdate, ...]


@dataclass(frozen=True)
class WeightsMessage:
    """Server -> client (first-order baselines): the full global weight vector."""

    TAG = 5
    round: int
    lr: float
    values: np.ndarray  # float32, shape (n,)


@dataclass(frozen=True)
class DeltaReply:
    """Client -> server (first-order baselines): the full local weight change."""

    TAG = 6
    round: int
    loss: float
    values: np.ndarray  # float32, shape (n,)


@dataclass(frozen=True)
class StateMessage:
    """Server -> client: the global state after ``round`` (weights, and H for HiSo).

    The alternative to `CatchUp` for a client so far behind that replaying the missed
    rounds would cost more bytes than the state itself.
    """

    TAG = 7
    round: int
    weights: np.ndarray  # float32, shape (n,)
    curvature: np.ndarray | None  # float32, shape (n,), HiSo only


@dataclass(frozen=True)
class SparseDeltaReply:
    """Client -> server (top-k FedAvg): the ``values`` of the weight change at ``indices``."""

    TAG = 8
    round: int
    loss: float
    size: int
    indices: np.ndarray  # uint32, strictly increasing, each < size
    values: np.ndarray  # float32, one per index


@dataclass(frozen=True)
class QuantizedDeltaReply:
    """Client -> server (QSGD FedAvg): the weight change as ``bits``-bit codes and a scale.

    Code ``c`` stands for ``(c - L) * scale / L`` with ``L = 2**(bits-1) - 1`` levels.
    """

    TAG = 9
    round: int
    loss: float
    size: int
    bits: int
    scale: float
    codes: bytes  # ceil(size * bits / 8) bytes, little-endian bit order


@dataclass(frozen=True)
class SeedReply:
    """Client -> server (FedKSeed): per local step, a pool index and its P scalars."""

    TAG = 10
    round: int
    loss: float
    indices: tuple[int, ...]  # K pool indices
    scalars: np.ndarray  # float32, shape (K, P)


@dataclass(frozen=True)
class SeedSync:
    """Server -> client (FedKSeed): what changed in the per-seed accumulators.

    ``x += sum_i values[i] * z(pool[keys[i] // P], keys[i] % P)`` brings a client from
    its last round to ``round``, however many rounds it missed: at most one entry per
    pool direction, so never more than the pool's size.
    """

    TAG = 11
    round: int
    keys: np.ndarray  # uint32, strictly increasing
    values: np.ndarray  # float32


@dataclass(frozen=True)
class SeedProbabilities:
    """Server -> client (FedKSeed-Pro): the sampling probability of each pool seed."""

    TAG = 12
    round: int
    probabilities: np.ndarray  # float32, shape (pool size,)


Message = (
    TrainRequest
    | ScalarReply
    | GlobalUpdate
    | CatchUp
    | WeightsMessage
    | DeltaReply
    | StateMessage
    | SparseDeltaReply
    | QuantizedDeltaReply
    | SeedReply
    | SeedSync
    | SeedProbabilities
)


def _check_u32(name: str, v: int) -> None:
    if not 0 <= v <= _U32_MAX:
        raise MessageError(f"{name}={v} does not fit in u32")


def _check_kp(k: int, p: int) -> None:
    if not (0 <= k <= 255 and 0 <= p <= 255):
        raise MessageError(f"K={k} and P={p} must each be at most 255")


def _update_body(u: GlobalUpdate) -> bytes:
    for s in u.seeds:
        _check_u32("seed", s)
    return (
        struct.pack("<f", u.lr)
        + np.asarray(u.seeds, dtype="<u4").tobytes()
        + np.ascontiguousarray(u.scalars, dtype="<f4").tobytes()
    )


def catch_up_size(rounds: int, k: int, p: int) -> int:
    """``len(encode(CatchUp(...)))`` for ``rounds`` updates of shape (k, p), without encoding."""
    return 11 + rounds * (4 + 4 * k + 4 * k * p)


def state_size(n: int, curvature: bool) -> int:
    """``len(encode(StateMessage(...)))`` for ``n`` weights, without encoding."""
    return 10 + 4 * n * (2 if curvature else 1)


def encode(msg: Message) -> bytes:
    """The one binary form of ``msg``."""
    if isinstance(msg, TrainRequest):
        _check_u32("round", msg.round)
        _check_kp(len(msg.seeds), 0)
        for s in msg.seeds:
            _check_u32("seed", s)
        return (
            struct.pack("<BIfB", msg.TAG, msg.round, msg.lr, len(msg.seeds))
            + np.asarray(msg.seeds, dtype="<u4").tobytes()
        )
    if isinstance(msg, ScalarReply):
        k, p = msg.scalars.shape
        _check_kp(k, p)
        _check_u32("round", msg.round)
        return (
            struct.pack("<BIBBf", msg.TAG, msg.round, k, p, msg.loss)
            + np.ascontiguousarray(msg.scalars, dtype="<f4").tobytes()
        )
    if isinstance(msg, GlobalUpdate):
        k, p = msg.scalars.shape
        _check_kp(k, p)
        _check_u32("round", msg.round)
        if len(msg.seeds) != k:
            raise MessageError(f"{len(msg.seeds)} seeds for K={k} local steps")
        return struct.pack("<BIBB", msg.TAG, msg.round, k, p) + _update_body(msg)
    if isinstance(msg, CatchUp):
        if not msg.updates:
            raise MessageError("empty catch-up")
        k, p = msg.updates[0].scalars.shape
        _check_kp(k, p)
        first = msg.updates[0].round
        parts = [struct.pack("<BIIBB", msg.TAG, first, len(msg.updates), k, p)]
        for i, u in enumerate(msg.updates):
            if u.round != first + i or u.scalars.shape != (k, p) or len(u.seeds) != k:
                raise MessageError("catch-up updates must be consecutive rounds of one shape")
            parts.append(_update_body(u))
        return b"".join(parts)
    if isinstance(msg, StateMessage):
        weights = np.ascontiguousarray(msg.weights, dtype="<f4").reshape(-1)
        parts = [struct.pack("<BIIB", msg.TAG, msg.round, weights.size, msg.curvature is not None)]
        parts.append(weights.tobytes())
        if msg.curvature is not None:
            h = np.ascontiguousarray(msg.curvature, dtype="<f4").reshape(-1)
            if h.size != weights.size:
                raise MessageError(f"curvature has {h.size} values for {weights.size} weights")
            parts.append(h.tobytes())
        return b"".join(parts)
    if isinstance(msg, WeightsMessage | DeltaReply):
        values = np.ascontiguousarray(msg.values, dtype="<f4").reshape(-1)
        second = msg.lr if isinstance(msg, WeightsMessage) else msg.loss
        return struct.pack("<BIfI", msg.TAG, msg.round, second, values.size) + values.tobytes()
    if isinstance(msg, SparseDeltaReply):
        idx = np.ascontiguousarray(msg.indices, dtype="<u4").reshape(-1)
        values = np.ascontiguousarray(msg.values, dtype="<f4").reshape(-1)
        if idx.size != values.size:
            raise MessageError(f"{idx.size} indices for {values.size} values")
        _check_u32("size", msg.size)
        head = struct.pack("<BIfII", msg.TAG, msg.round, msg.loss, msg.size, idx.size)
        return head + idx.tobytes() + values.tobytes()
    if isinstance(msg, QuantizedDeltaReply):
        _check_u32("size", msg.size)
        if len(msg.codes) != packed_size(msg.size, msg.bits):
            raise MessageError(f"{len(msg.codes)} code bytes for {msg.size} x {msg.bits} bits")
        head = struct.pack("<BIfIBf", msg.TAG, msg.round, msg.loss, msg.size, msg.bits, msg.scale)
        return head + bytes(msg.codes)
    if isinstance(msg, SeedReply):
        k, p = msg.scalars.shape
        _check_kp(k, p)
        if len(msg.indices) != k:
            raise MessageError(f"{len(msg.indices)} seed indices for K={k} local steps")
        for i in msg.indices:
            _check_u32("seed index", i)
        return (
            struct.pack("<BIfBB", msg.TAG, msg.round, msg.loss, k, p)
            + np.asarray(msg.indices, dtype="<u4").tobytes()
            + np.ascontiguousarray(msg.scalars, dtype="<f4").tobytes()
        )
    if isinstance(msg, SeedSync):
        keys = np.ascontiguousarray(msg.keys, dtype="<u4").reshape(-1)
        values = np.ascontiguousarray(msg.values, dtype="<f4").reshape(-1)
        if keys.size != values.size:
            raise MessageError(f"{keys.size} keys for {values.size} values")
        return (
            struct.pack("<BII", msg.TAG, msg.round, keys.size) + keys.tobytes() + values.tobytes()
        )
    if isinstance(msg, SeedProbabilities):
        probs = np.ascontiguousarray(msg.probabilities, dtype="<f4").reshape(-1)
        return struct.pack("<BII", msg.TAG, msg.round, probs.size) + probs.tobytes()
    raise TypeError(f"not a message: {type(msg).__name__}")


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits each."""
    return (n * bits + 7) // 8


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise MessageError(
                f"truncated message: {what} needs {n} bytes, {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def f32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)

    def u32(self, count: int, what: str) -> tuple[int, ...]:
        return tuple(int(v) for v in np.frombuffer(self.take(4 * count, what), dtype="<u4"))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MessageError(f"{len(self.data) - self.pos} trailing bytes after the message")


def _read_update_body(r: _Reader, rnd: int, k: int, p: int) -> GlobalUpdate:
    (lr,) = r.unpack("<f", "lr")
    seeds = r.u32(k, "seeds")
    scalars = r.f32(k * p, "scalars").reshape(k, p)
    return GlobalUpdate(rnd, lr, seeds, scalars)


def decode(data: bytes) -> Message:
    """Parse one message; raises `MessageError` on anything malformed."""
    if not data:
        raise MessageError("empty message")
    r = _Reader(bytes(data))
    (tag,) = r.unpack("<B", "tag")
    if tag == TrainRequest.TAG:
        rnd, lr, k = r.unpack("<IfB", "header")
        msg: Message = TrainRequest(rnd, lr, r.u32(k, "seeds"))
    elif tag == ScalarReply.TAG:
        rnd, k, p, loss = r.unpack("<IBBf", "header")
        msg = ScalarReply(rnd, loss, r.f32(k * p, "scalars").reshape(k, p))
    elif tag == GlobalUpdate.TAG:
        rnd, k, p = r.unpack("<IBB", "header")
        msg = _read_update_body(r, rnd, k, p)
    elif tag == CatchUp.TAG:
        first, count, k, p = r.unpack("<IIBB", "header")
        if count == 0:
            raise MessageError("empty catch-up")
        per_round = 4 + 4 * k + 4 * k * p
        if count * per_round != len(r.data) - r.pos:
            raise MessageError(
                f"catch-up of {count} rounds needs {count * per_round} bytes, "
                f"got {len(r.data) - r.pos}"
            )
        msg = CatchUp(tuple(_read_update_body(r, first + i, k, p) for i in range(count)))
    elif tag == StateMessage.TAG:
        rnd, n, has_h = r.unpack("<IIB", "header")
        if has_h > 1:
            raise MessageError(f"state flag must be 0 or 1, got {has_h}")
        weights = r.f32(n, "weights")
        msg = StateMessage(rnd, weights, r.f32(n, "curvature") if has_h else None)
    elif tag in (WeightsMessage.TAG, DeltaReply.TAG):
        rnd, second, n = r.unpack("<IfI", "header")
        values = r.f32(n, "values")
        msg = (
            WeightsMessage(rnd, second, values)
            if tag == WeightsMessage.TAG
            else DeltaReply(rnd, second, values)
        )
    elif tag == SparseDeltaReply.TAG:
        rnd, loss, n, count = r.unpack("<IfII", "header")
        if count > n:
            raise MessageError(f"{count} entries for a vector of {n}")
        idx = np.frombuffer(r.take(4 * count, "indices"), dtype="<u4").astype(np.uint32)
        if count and (int(idx.max()) >= n or not (idx[1:] > idx[:-1]).all()):
            raise MessageError("indices must be strictly increasing and below the size")
        msg = SparseDeltaReply(rnd, loss, n, idx, r.f32(count, "values"))
    elif tag == QuantizedDeltaReply.TAG:
        rnd, loss, n, bits, scale = r.unpack("<IfIBf", "header")
        if not 2 <= bits <= 16:
            raise MessageError(f"bits={bits}: quantisation uses 2 to 16 bits")
        msg = QuantizedDeltaReply(
            rnd, loss, n, bits, scale, bytes(r.take(packed_size(n, bits), "codes"))
        )
    elif tag == SeedReply.TAG:
        rnd, loss, k, p = r.unpack("<IfBB", "header")
        msg = SeedReply(rnd, loss, r.u32(k, "seed indices"), r.f32(k * p, "scalars").reshape(k, p))
    elif tag == SeedSync.TAG:
        rnd, count = r.unpack("<II", "header")
        keys = np.frombuffer(r.take(4 * count, "keys"), dtype="<u4").astype(np.uint32)
        if not (keys[1:] > keys[:-1]).all():
            raise MessageError("seed-sync keys must be strictly increasing")
        msg = SeedSync(rnd, keys, r.f32(count, "values"))
    elif tag == SeedProbabilities.TAG:
        rnd, n = r.unpack("<II", "header")
        probs = r.f32(n, "probabilities")
        if n == 0 or not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise MessageError("probabilities must be finite, non-negative and not all zero")
        msg = SeedProbabilities(rnd, probs)
    else:
        raise MessageError(f"unknown message tag {tag}")
    r.done()
    return msg
