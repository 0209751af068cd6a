"""Typed protocol messages and their one binary encoding (little endian).

Each message class owns its layout: ``HEAD`` (the struct format after the tag byte),
``_write`` (its bytes after the tag) and ``_read`` (the inverse, checking every length
and range); sizes quoted anywhere derive from them. Byte counts reported anywhere in
fedscalar are ``len(encode(message))`` of the real messages a run exchanged. A plug-in
may add a message type with `register_message` (a tag not taken). Decoding checks every
length and value range and raises `MessageError` naming the problem, so malformed input
from the network never reaches an algorithm.

The layouts, with their sizes for the common shapes, are specified in
docs/protocol.md section 5 (``tests/test_messages.py`` holds each class to it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


class MessageError(ValueError):
    """A byte string is not a valid message."""


_U32_MAX = 0xFFFFFFFF


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise MessageError(f"truncated message: {what} needs {n} bytes, {self.left()} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def f32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)

    def u32(self, count: int, what: str) -> tuple[int, ...]:
        return tuple(int(v) for v in np.frombuffer(self.take(4 * count, what), dtype="<u4"))

    def u32_array(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<u4").astype(np.uint32)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MessageError(f"{self.left()} trailing bytes after the message")


def _check_u32(name: str, v: int) -> None:
    if not 0 <= v <= _U32_MAX:
        raise MessageError(f"{name}={v} does not fit in u32")


def _check_kp(k: int, p: int) -> None:
    if not (0 <= k <= 255 and 0 <= p <= 255):
        raise MessageError(f"K={k} and P={p} must each be at most 255")


def _f32(values: Any) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").reshape(-1).tobytes()


def _u32(values: Any, name: str) -> bytes:
    for v in np.asarray(values).reshape(-1):
        _check_u32(name, int(v))
    return np.asarray(values, dtype="<u4").reshape(-1).tobytes()


def _head_size(cls: type) -> int:
    """Tag byte plus the class's fixed header."""
    return 1 + struct.calcsize(cls.HEAD)


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client: train at ``round`` with these local-step seeds and lr."""

    TAG: ClassVar[int] = 1
    HEAD: ClassVar[str] = "<IfB"
    round: int
    lr: float
    seeds: tuple[int, ...]

    def _write(self) -> bytes:
        _check_u32("round", self.round)
        _check_kp(len(self.seeds), 0)
        head = struct.pack(self.HEAD, self.round, self.lr, len(self.seeds))
        return head + _u32(self.seeds, "seed")

    @classmethod
    def _read(cls, r: _Reader) -> TrainRequest:
        rnd, lr, k = r.unpack(cls.HEAD, "header")
        return cls(rnd, lr, r.u32(k, "seeds"))


@dataclass(frozen=True)
class ScalarReply:
    """Client -> server: K x P directional derivatives and the loss at the start point."""

    TAG: ClassVar[int] = 2
    HEAD: ClassVar[str] = "<IBBf"
    round: int
    loss: float
    scalars: np.ndarray  # float32, shape (K, P)

    def _write(self) -> bytes:
        k, p = self.scalars.shape
        _check_kp(k, p)
        _check_u32("round", self.round)
        return struct.pack(self.HEAD, self.round, k, p, self.loss) + _f32(self.scalars)

    @classmethod
    def _read(cls, r: _Reader) -> ScalarReply:
        rnd, k, p, loss = r.unpack(cls.HEAD, "header")
        return cls(rnd, loss, r.f32(k * p, "scalars").reshape(k, p))


@dataclass(frozen=True)
class GlobalUpdate:
    """One round's agreed update: the ledger entry, and the unit of catch-up."""

    TAG: ClassVar[int] = 3
    HEAD: ClassVar[str] = "<IBB"
    BODY: ClassVar[str] = "<f"  # then K seeds (u32) and K x P scalars (f32)
    round: int
    lr: float
    seeds: tuple[int, ...]
    scalars: np.ndarray  # float32, shape (K, P)

    @classmethod
    def body_size(cls, k: int, p: int) -> int:
        """Bytes of one update without its round (a catch-up's per-round entry)."""
        return struct.calcsize(cls.BODY) + 4 * k + 4 * k * p

    def _body(self) -> bytes:
        return struct.pack(self.BODY, self.lr) + _u32(self.seeds, "seed") + _f32(self.scalars)

    @classmethod
    def _read_body(cls, r: _Reader, rnd: int, k: int, p: int) -> GlobalUpdate:
        (lr,) = r.unpack(cls.BODY, "lr")
        seeds = r.u32(k, "seeds")
        return cls(rnd, lr, seeds, r.f32(k * p, "scalars").reshape(k, p))

    def _write(self) -> bytes:
        k, p = self.scalars.shape
        _check_kp(k, p)
        _check_u32("round", self.round)
        if len(self.seeds) != k:
            raise MessageError(f"{len(self.seeds)} seeds for K={k} local steps")
        return struct.pack(self.HEAD, self.round, k, p) + self._body()

    @classmethod
    def _read(cls, r: _Reader) -> GlobalUpdate:
        rnd, k, p = r.unpack(cls.HEAD, "header")
        return cls._read_body(r, rnd, k, p)


@dataclass(frozen=True)
class CatchUp:
    """Server -> client: the global updates of consecutive rounds the client has missed."""

    TAG: ClassVar[int] = 4
    HEAD: ClassVar[str] = "<IIBB"
    updates: tuple[GlobalUpdate, ...]

    @classmethod
    def round_size(cls, k: int, p: int) -> int:
        """Bytes of one round's entry."""
        return GlobalUpdate.body_size(k, p)

    @staticmethod
    def _write_round(u: GlobalUpdate) -> bytes:
        return u._body()

    @staticmethod
    def _read_round(r: _Reader, rnd: int, k: int, p: int) -> GlobalUpdate:
        return GlobalUpdate._read_body(r, rnd, k, p)

    @classmethod
    def size(cls, rounds: int, k: int, p: int) -> int:
        return _head_size(cls) + rounds * cls.round_size(k, p)

    def _write(self) -> bytes:
        if not self.updates:
            raise MessageError("empty catch-up")
        k, p = self.updates[0].scalars.shape
        _check_kp(k, p)
        first = self.updates[0].round
        parts = [struct.pack(self.HEAD, first, len(self.updates), k, p)]
        for i, u in enumerate(self.updates):
            if u.round != first + i or u.scalars.shape != (k, p) or len(u.seeds) != k:
                raise MessageError("catch-up updates must be consecutive rounds of one shape")
            parts.append(self._write_round(u))
        return b"".join(parts)

    @classmethod
    def _read(cls, r: _Reader) -> CatchUp:
        first, count, k, p = r.unpack(cls.HEAD, "header")
        if count == 0:
            raise MessageError("empty catch-up")
        need = count * cls.round_size(k, p)
        if need != r.left():
            raise MessageError(f"catch-up of {count} rounds needs {need} bytes, got {r.left()}")
        return cls(tuple(cls._read_round(r, first + i, k, p) for i in range(count)))


@dataclass(frozen=True)
class WeightsMessage:
    """Server -> client (first-order baselines): the full global weight vector."""

    TAG: ClassVar[int] = 5
    HEAD: ClassVar[str] = "<IfI"
    round: int
    lr: float
    values: np.ndarray  # float32, shape (n,)

    def _write(self) -> bytes:
        values = _f32(self.values)
        return struct.pack(self.HEAD, self.round, self.lr, len(values) // 4) + values

    @classmethod
    def _read(cls, r: _Reader) -> WeightsMessage:
        rnd, lr, n = r.unpack(cls.HEAD, "header")
        return cls(rnd, lr, r.f32(n, "values"))


@dataclass(frozen=True)
class DeltaReply:
    """Client -> server (first-order baselines): the full local weight change."""

    TAG: ClassVar[int] = 6
    HEAD: ClassVar[str] = "<IfI"
    round: int
    loss: float
    values: np.ndarray  # float32, shape (n,)

    @classmethod
    def encoded_size(cls, n: int) -> int:
        return _head_size(cls) + 4 * n

    def _write(self) -> bytes:
        values = _f32(self.values)
        return struct.pack(self.HEAD, self.round, self.loss, len(values) // 4) + values

    @classmethod
    def _read(cls, r: _Reader) -> DeltaReply:
        rnd, loss, n = r.unpack(cls.HEAD, "header")
        return cls(rnd, loss, r.f32(n, "values"))


@dataclass(frozen=True)
class StateMessage:
    """Server -> client: the global state after ``round`` (weights, and H for HiSo).

    The alternative to `CatchUp` for a client so far behind that replaying the missed
    rounds would cost more bytes than the state itself.
    """

    TAG: ClassVar[int] = 7
    HEAD: ClassVar[str] = "<IIB"
    round: int
    weights: np.ndarray  # float32, shape (n,)
    curvature: np.ndarray | None  # float32, shape (n,), HiSo only

    @classmethod
    def size(cls, n: int, curvature: bool) -> int:
        return _head_size(cls) + 4 * n * (2 if curvature else 1)

    def _write(self) -> bytes:
        weights = _f32(self.weights)
        n = len(weights) // 4
        parts = [struct.pack(self.HEAD, self.round, n, self.curvature is not None), weights]
        if self.curvature is not None:
            h = _f32(self.curvature)
            if len(h) != len(weights):
                raise MessageError(f"curvature has {len(h) // 4} values for {n} weights")
            parts.append(h)
        return b"".join(parts)

    @classmethod
    def _read(cls, r: _Reader) -> StateMessage:
        rnd, n, has_h = r.unpack(cls.HEAD, "header")
        if has_h > 1:
            raise MessageError(f"state flag must be 0 or 1, got {has_h}")
        weights = r.f32(n, "weights")
        return cls(rnd, weights, r.f32(n, "curvature") if has_h else None)


@dataclass(frozen=True)
class SparseDeltaReply:
    """Client -> server (top-k FedAvg): the ``values`` of the weight change at ``indices``."""

    TAG: ClassVar[int] = 8
    HEAD: ClassVar[str] = "<IfII"
    round: int
    loss: float
    size: int
    indices: np.ndarray  # uint32, strictly increasing, each < size
    values: np.ndarray  # float32, one per index

    @classmethod
    def max_size(cls, entries: int) -> int:
        return _head_size(cls) + 8 * entries

    def _write(self) -> bytes:
        idx = np.ascontiguousarray(self.indices, dtype="<u4").reshape(-1)
        values = np.ascontiguousarray(self.values, dtype="<f4").reshape(-1)
        if idx.size != values.size:
            raise MessageError(f"{idx.size} indices for {values.size} values")
        _check_u32("size", self.size)
        head = struct.pack(self.HEAD, self.round, self.loss, self.size, idx.size)
        return head + idx.tobytes() + values.tobytes()

    @classmethod
    def _read(cls, r: _Reader) -> SparseDeltaReply:
        rnd, loss, n, count = r.unpack(cls.HEAD, "header")
        if count > n:
            raise MessageError(f"{count} entries for a vector of {n}")
        idx = r.u32_array(count, "indices")
        if count and (int(idx.max()) >= n or not (idx[1:] > idx[:-1]).all()):
            raise MessageError("indices must be strictly increasing and below the size")
        return cls(rnd, loss, n, idx, r.f32(count, "values"))


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits each."""
    return (n * bits + 7) // 8


@dataclass(frozen=True)
class QuantizedDeltaReply:
    """Client -> server (QSGD FedAvg): the weight change as ``bits``-bit codes and a scale.

    Code ``c`` stands for ``(c - L) * scale / L`` with ``L = 2**(bits-1) - 1`` levels.
    """

    TAG: ClassVar[int] = 9
    HEAD: ClassVar[str] = "<IfIBf"
    round: int
    loss: float
    size: int
    bits: int
    scale: float
    codes: bytes  # ceil(size * bits / 8) bytes, little-endian bit order

    @classmethod
    def encoded_size(cls, n: int, bits: int) -> int:
        return _head_size(cls) + packed_size(n, bits)

    def _write(self) -> bytes:
        _check_u32("size", self.size)
        if len(self.codes) != packed_size(self.size, self.bits):
            raise MessageError(f"{len(self.codes)} code bytes for {self.size} x {self.bits} bits")
        head = struct.pack(self.HEAD, self.round, self.loss, self.size, self.bits, self.scale)
        return head + bytes(self.codes)

    @classmethod
    def _read(cls, r: _Reader) -> QuantizedDeltaReply:
        rnd, loss, n, bits, scale = r.unpack(cls.HEAD, "header")
        if not 2 <= bits <= 16:
            raise MessageError(f"bits={bits}: quantisation uses 2 to 16 bits")
        return cls(rnd, loss, n, bits, scale, bytes(r.take(packed_size(n, bits), "codes")))


@dataclass(frozen=True)
class SeedReply:
    """Client -> server (FedKSeed): per local step, a pool index and its P scalars."""

    TAG: ClassVar[int] = 10
    HEAD: ClassVar[str] = "<IfBB"
    round: int
    loss: float
    indices: tuple[int, ...]  # K pool indices
    scalars: np.ndarray  # float32, shape (K, P)

    def _write(self) -> bytes:
        k, p = self.scalars.shape
        _check_kp(k, p)
        if len(self.indices) != k:
            raise MessageError(f"{len(self.indices)} seed indices for K={k} local steps")
        head = struct.pack(self.HEAD, self.round, self.loss, k, p)
        return head + _u32(self.indices, "seed index") + _f32(self.scalars)

    @classmethod
    def _read(cls, r: _Reader) -> SeedReply:
        rnd, loss, k, p = r.unpack(cls.HEAD, "header")
        return cls(rnd, loss, r.u32(k, "seed indices"), r.f32(k * p, "scalars").reshape(k, p))


@dataclass(frozen=True)
class SeedSync:
    """Server -> client (FedKSeed): what changed in the per-seed accumulators.

    ``x += sum_i values[i] * z(pool[keys[i] // P], keys[i] % P)`` brings a client from
    round ``since`` to ``round``, however many rounds it missed: at most one entry per
    pool direction, so never more than the pool's size.
    """

    TAG: ClassVar[int] = 11
    HEAD: ClassVar[str] = "<III"
    round: int
    since: int  # the round the receiver holds: the change covers rounds since+1 .. round
    keys: np.ndarray  # uint32, strictly increasing
    values: np.ndarray  # float32

    def _write(self) -> bytes:
        keys = np.ascontiguousarray(self.keys, dtype="<u4").reshape(-1)
        values = np.ascontiguousarray(self.values, dtype="<f4").reshape(-1)
        if keys.size != values.size:
            raise MessageError(f"{keys.size} keys for {values.size} values")
        if not 0 <= self.since < self.round:
            raise MessageError(f"a seed-sync from round {self.since} to {self.round}")
        head = struct.pack(self.HEAD, self.round, self.since, keys.size)
        return head + keys.tobytes() + values.tobytes()

    @classmethod
    def _read(cls, r: _Reader) -> SeedSync:
        rnd, since, count = r.unpack(cls.HEAD, "header")
        if since >= rnd:
            raise MessageError(f"a seed-sync from round {since} to {rnd}")
        keys = r.u32_array(count, "keys")
        if not (keys[1:] > keys[:-1]).all():
            raise MessageError("seed-sync keys must be strictly increasing")
        return cls(rnd, since, keys, r.f32(count, "values"))


@dataclass(frozen=True)
class SeedProbabilities:
    """Server -> client (FedKSeed-Pro): the sampling probability of each pool seed."""

    TAG: ClassVar[int] = 12
    HEAD: ClassVar[str] = "<II"
    round: int
    probabilities: np.ndarray  # float32, shape (pool size,)

    def _write(self) -> bytes:
        probs = _f32(self.probabilities)
        return struct.pack(self.HEAD, self.round, len(probs) // 4) + probs

    @classmethod
    def _read(cls, r: _Reader) -> SeedProbabilities:
        rnd, n = r.unpack(cls.HEAD, "header")
        probs = r.f32(n, "probabilities")
        if n == 0 or not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise MessageError("probabilities must be finite, non-negative and not all zero")
        return cls(rnd, probs)


def _pack_signs(signs: np.ndarray) -> bytes:
    """One bit per value, 1 for +1 and 0 for -1, least significant bit first."""
    flat = np.asarray(signs).reshape(-1)
    if not np.isin(flat, (-1.0, 1.0)).all():
        raise MessageError("signs must each be +1 or -1")
    return np.packbits(flat > 0, bitorder="little").tobytes()


def _unpack_signs(data: memoryview, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=n, bitorder="little")
    if n % 8 and data[-1] >> (n % 8):
        raise MessageError("padding bits after the signs must be zero")
    return np.where(bits == 1, np.float32(1.0), np.float32(-1.0)).astype(np.float32)


_VOTE_CODE = {0.0: 0, 1.0: 1, -1.0: 2}


def _pack_votes(votes: np.ndarray) -> bytes:
    """Two bits per vote (0 -> 00, +1 -> 01, -1 -> 10), least significant bits first."""
    flat = np.asarray(votes, dtype=np.float32).reshape(-1)
    try:
        codes = [_VOTE_CODE[float(v)] for v in flat]
    except KeyError:
        raise MessageError("votes must each be -1, 0 or +1") from None
    out = bytearray(packed_size(len(codes), 2))
    for i, c in enumerate(codes):
        out[i // 4] |= c << (2 * (i % 4))
    return bytes(out)


def _unpack_votes(data: memoryview, n: int) -> np.ndarray:
    raw = bytes(data)
    codes = [(raw[i // 4] >> (2 * (i % 4))) & 3 for i in range(n)]
    if 3 in codes:
        raise MessageError("vote code 3 is not a vote")
    if n % 4 and raw[-1] >> (2 * (n % 4)):
        raise MessageError("padding bits after the votes must be zero")
    return np.array([(0.0, 1.0, -1.0)[c] for c in codes], dtype=np.float32)


@dataclass(frozen=True)
class SignReply:
    """Client -> server (FeedSign): the sign of each of the K x P directional derivatives,
    one bit each, and the loss at the start point."""

    TAG: ClassVar[int] = 13
    HEAD: ClassVar[str] = "<IfBB"
    round: int
    loss: float
    signs: np.ndarray  # float32 +1/-1, shape (K, P)

    @classmethod
    def encoded_size(cls, k: int, p: int) -> int:
        return _head_size(cls) + packed_size(k * p, 1)

    def _write(self) -> bytes:
        k, p = self.signs.shape
        _check_kp(k, p)
        _check_u32("round", self.round)
        return struct.pack(self.HEAD, self.round, self.loss, k, p) + _pack_signs(self.signs)

    @classmethod
    def _read(cls, r: _Reader) -> SignReply:
        rnd, loss, k, p = r.unpack(cls.HEAD, "header")
        signs = _unpack_signs(r.take(packed_size(k * p, 1), "signs"), k * p)
        return cls(rnd, loss, signs.reshape(k, p))


@dataclass(frozen=True)
class VoteCatchUp(CatchUp):
    """Server -> client (FeedSign): `CatchUp` with each round's K x P majority votes (-1,
    0 for a tie, +1) at two bits per vote after its lr and K seeds."""

    TAG: ClassVar[int] = 14

    @classmethod
    def round_size(cls, k: int, p: int) -> int:
        return 4 + 4 * k + packed_size(k * p, 2)

    @staticmethod
    def _write_round(u: GlobalUpdate) -> bytes:
        return struct.pack("<f", u.lr) + _u32(u.seeds, "seed") + _pack_votes(u.scalars)

    @staticmethod
    def _read_round(r: _Reader, rnd: int, k: int, p: int) -> GlobalUpdate:
        (lr,) = r.unpack("<f", "lr")
        seeds = r.u32(k, "seeds")
        votes = _unpack_votes(r.take(packed_size(k * p, 2), "votes"), k * p)
        return GlobalUpdate(rnd, lr, seeds, votes.reshape(k, p))


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
    | SignReply
    | VoteCatchUp
)

_BY_TAG: dict[int, type] = {}


def register_message(cls: type) -> type:
    """Give ``cls`` (with ``TAG``, ``_write`` and ``_read``) its place in `encode` and
    `decode`; a tag already taken by another class is refused. Usable as a decorator."""
    tag = getattr(cls, "TAG", None)
    if not isinstance(tag, int) or not 0 <= tag <= 255:
        raise ValueError(f"{cls.__name__}: TAG must be an int in 0..255")
    if _BY_TAG.get(tag, cls) is not cls:
        raise ValueError(f"{cls.__name__}: tag {tag} is {_BY_TAG[tag].__name__}'s")
    _BY_TAG[tag] = cls
    return cls


for _cls in (
    TrainRequest,
    ScalarReply,
    GlobalUpdate,
    CatchUp,
    WeightsMessage,
    DeltaReply,
    StateMessage,
    SparseDeltaReply,
    QuantizedDeltaReply,
    SeedReply,
    SeedSync,
    SeedProbabilities,
    SignReply,
    VoteCatchUp,
):
    register_message(_cls)


def catch_up_size(rounds: int, k: int, p: int) -> int:
    """``len(encode(CatchUp(...)))`` for ``rounds`` updates of shape (k, p), without encoding."""
    return CatchUp.size(rounds, k, p)


def state_size(n: int, curvature: bool) -> int:
    """``len(encode(StateMessage(...)))`` for ``n`` weights, without encoding."""
    return StateMessage.size(n, curvature)


def encode(msg: Any) -> bytes:
    """The one binary form of ``msg``: its tag byte, then what its class writes."""
    if _BY_TAG.get(getattr(type(msg), "TAG", -1)) is not type(msg):
        raise TypeError(f"not a message: {type(msg).__name__}")
    return struct.pack("<B", msg.TAG) + msg._write()


def decode(data: bytes) -> Message:
    """Parse one message; raises `MessageError` on anything malformed."""
    if not data:
        raise MessageError("empty message")
    r = _Reader(bytes(data))
    (tag,) = r.unpack("<B", "tag")
    if tag not in _BY_TAG:
        raise MessageError(f"unknown message tag {tag}")
    msg = _BY_TAG[tag]._read(r)
    r.done()
    return msg
