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


Message = (
    TrainRequest | ScalarReply | GlobalUpdate | CatchUp | WeightsMessage | DeltaReply | StateMessage
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
    raise TypeError(f"not a message: {type(msg).__name__}")


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
    else:
        raise MessageError(f"unknown message tag {tag}")
    r.done()
    return msg
