"""Secure aggregation of scalar replies: the server learns only the sum.

The protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), semi-honest version, for one round's sampled
clients, on fixed-point vectors in the ring of integers modulo 2**64:

1. **Advertise keys.** Each client makes two X25519 key pairs (one to encrypt the shares
   it sends, one to agree pairwise masks) and sends the public keys; the server
   broadcasts the roster.
2. **Share keys.** Each client draws a self-mask seed ``b`` and splits ``b`` and its
   mask private key into Shamir shares (threshold ``t`` of the ``n`` clients), and sends
   each other client its two shares encrypted with AES-GCM under a key agreed with that
   client (the server routes the ciphertexts and cannot read or alter them undetected).
3. **Masked input.** Each client uploads ``x + PRG(b) + sum_{v>u} PRG(s_uv) - sum_{v<u}
   PRG(s_uv)``, where ``s_uv`` is the key both ``u`` and ``v`` agree on; the pairwise
   masks cancel in the sum.
4. **Unmask.** The server names the clients whose masked input arrived (survivors) and
   the rest (dropped after step 2). Each survivor returns its share of every survivor's
   ``b`` and of every dropped client's mask key; with ``t`` of them the server removes the
   survivors' self-masks and the dropped clients' pairwise masks, and has the survivors'
   sum, nothing else. A share that fails decryption (tampered or misrouted) stops the
   round with `SecAggError`.

Every message is encoded to bytes as it would go on the wire; their lengths are the
byte counts. Values are encoded with `FRACTION_BITS` fractional bits, so the unmasked
sum equals the plain sum to within ``n * 2**-(FRACTION_BITS + 1)``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 24
"""Fractional bits of the fixed-point encoding (resolution 2**-24, about 6e-8)."""
LIMIT = 2.0**30
"""Largest magnitude of one value: sums of up to 512 of them stay below the ring's 2**39."""
PRIME = 2**521 - 1
"""Field of the Shamir shares (a Mersenne prime above every 32-byte secret)."""
_SHARE = 66  # bytes of one share value
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggError(RuntimeError):
    """The round cannot complete securely (a tampered share, too few survivors)."""


# -- fixed point ---------------------------------------------------------------------------
def encode(values: np.ndarray) -> np.ndarray:
    """Float values as ring elements (uint64, two's complement, `FRACTION_BITS`)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) >= LIMIT):
        raise ValueError(f"secure aggregation encodes finite values below {LIMIT:g} only")
    return np.round(values * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """Ring elements back to floats (float64)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / (
        2.0**FRACTION_BITS
    )


# -- Shamir secret sharing -----------------------------------------------------------------
def split(secret: bytes, holders: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for each holder (evaluated at ``holder + 1``)."""
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(os.urandom(65), "big") % PRIME for _ in range(threshold - 1)]
    shares = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[h] = y
    return shares


def combine(shares: dict[int, int], threshold: int, size: int = 32) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed to rebuild a secret")
    points = [(h + 1, y) for h, y in sorted(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * size):
        raise SecAggError("the shares do not rebuild a secret (a share is wrong)")
    return secret.to_bytes(size, "big")


# -- keys and masks ------------------------------------------------------------------------
def _agree(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"fedscalar secagg " + purpose).derive(shared)


def _prg(seed: bytes, rnd: int, size: int) -> np.ndarray:
    """``size`` ring elements from a 32-byte seed (ChaCha20 keystream), per round."""
    nonce = struct.pack("<QQ", 0, rnd)
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype=np.uint64).copy()


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


# -- wire formats ----------------------------------------------------------------------------
def _ids(values) -> bytes:
    return struct.pack(f"<I{len(values)}I", len(values), *values)


def _read_ids(data: bytes, at: int = 0) -> tuple[list[int], int]:
    (n,) = struct.unpack_from("<I", data, at)
    return list(struct.unpack_from(f"<{n}I", data, at + 4)), at + 4 + 4 * n


def _shares_bytes(shares: dict[int, int]) -> bytes:
    return _ids(list(shares)) + b"".join(y.to_bytes(_SHARE, "big") for y in shares.values())


def _read_shares(data: bytes, at: int = 0) -> tuple[dict[int, int], int]:
    ids, at = _read_ids(data, at)
    values = {}
    for i in ids:
        values[i] = int.from_bytes(data[at : at + _SHARE], "big")
        at += _SHARE
    return values, at


# -- the parties ---------------------------------------------------------------------------
@dataclass
class SecAggClient:
    """One sampled client's side of one round."""

    cid: int
    rnd: int
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def state(self) -> dict[str, int | bytes]:
        """What the client keeps between the round's messages (its secrets included:
        it stays on the client, e.g. in a Flower node's own context)."""
        roster = [
            struct.pack("<I", v) + c_pub + s_pub for v, (c_pub, s_pub) in self._roster.items()
        ]
        return {
            "cid": self.cid,
            "rnd": self.rnd,
            "c": _private_bytes(self._c),
            "s": _private_bytes(self._s),
            "b": self._b,
            "roster": roster_bytes(roster),
            "held_s": _shares_bytes({u: v[0] for u, v in self._held.items()}),
            "held_b": _shares_bytes({u: v[1] for u, v in self._held.items()}),
        }

    @classmethod
    def from_state(cls, state: dict[str, int | bytes]) -> SecAggClient:
        held_s, _ = _read_shares(bytes(state["held_s"]))  # type: ignore[arg-type]
        held_b, _ = _read_shares(bytes(state["held_b"]))  # type: ignore[arg-type]
        return cls(
            int(state["cid"]),
            int(state["rnd"]),
            X25519PrivateKey.from_private_bytes(bytes(state["c"])),  # type: ignore[arg-type]
            X25519PrivateKey.from_private_bytes(bytes(state["s"])),  # type: ignore[arg-type]
            bytes(state["b"]),  # type: ignore[arg-type]
            read_roster(bytes(state["roster"])),  # type: ignore[arg-type]
            {u: (held_s[u], held_b[u]) for u in held_s},
        )

    def advertise(self) -> bytes:
        """Step 1: the two public keys."""
        return struct.pack("<I", self.cid) + _public(self._c) + _public(self._s)

    def share_keys(self, roster: bytes, threshold: int) -> bytes:
        """Step 2: from the roster, the encrypted shares for each other client."""
        self._roster = read_roster(roster)
        others = [v for v in self._roster if v != self.cid]
        holders = sorted(self._roster)
        s_shares = split(_private_bytes(self._s), holders, threshold)
        b_shares = split(self._b, holders, threshold)
        self._held[self.cid] = (s_shares[self.cid], b_shares[self.cid])
        out = [struct.pack("<I", len(others))]
        for v in others:
            key = _agree(self._c, self._roster[v][0], b"share")
            nonce = os.urandom(12)
            plain = s_shares[v].to_bytes(_SHARE, "big") + b_shares[v].to_bytes(_SHARE, "big")
            sealed = AESGCM(key).encrypt(nonce, plain, self._header(self.cid, v))
            out.append(struct.pack("<II", v, len(sealed)) + nonce + sealed)
        return b"".join(out)

    def _header(self, sender: int, recipient: int) -> bytes:
        return struct.pack("<QII", self.rnd, sender, recipient)

    def masked_input(self, values: np.ndarray, inbox: bytes) -> bytes:
        """Step 3: keep the shares routed to this client, upload the masked values."""
        at = 0
        (count,) = struct.unpack_from("<I", inbox, at)
        at += 4
        for _ in range(count):
            sender, size = struct.unpack_from("<II", inbox, at)
            nonce = inbox[at + 8 : at + 20]
            sealed = inbox[at + 20 : at + 20 + size]
            at += 20 + size
            if sender not in self._roster or sender == self.cid:
                raise SecAggError(f"client {self.cid}: a share from unknown client {sender}")
            key = _agree(self._c, self._roster[sender][0], b"share")
            try:
                plain = AESGCM(key).decrypt(nonce, sealed, self._header(sender, self.cid))
            except InvalidTag:
                raise SecAggError(
                    f"client {self.cid}: the share from client {sender} failed authentication "
                    "(tampered or misrouted)"
                ) from None
            self._held[sender] = (
                int.from_bytes(plain[:_SHARE], "big"),
                int.from_bytes(plain[_SHARE:], "big"),
            )
        y = encode(values)
        y += _prg(self._b, self.rnd, y.size)
        for v in sorted(self._held):  # the clients that shared: they are in the sum's roster
            if v == self.cid:
                continue
            mask = _prg(_agree(self._s, self._roster[v][1], b"mask"), self.rnd, y.size)
            y = y + mask if self.cid < v else y - mask
        return struct.pack("<II", self.cid, y.size) + y.tobytes()

    def unmask(self, request: bytes) -> bytes:
        """Step 4: shares of the survivors' self-mask seeds and of the dropped clients'
        mask keys (never both for one client)."""
        survivors, at = _read_ids(request)
        dropped, _ = _read_ids(request, at)
        if self.cid not in survivors or set(survivors) & set(dropped):
            raise SecAggError(f"client {self.cid}: an inconsistent unmasking request")
        b = {u: self._held[u][1] for u in survivors if u in self._held}
        s = {u: self._held[u][0] for u in dropped if u in self._held}
        return struct.pack("<I", self.cid) + _shares_bytes(b) + _shares_bytes(s)


def roster_bytes(adverts: list[bytes]) -> bytes:
    """The server's broadcast of step 1: every client's public keys."""
    return struct.pack("<I", len(adverts)) + b"".join(adverts)


def read_roster(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    (n,) = struct.unpack_from("<I", data)
    roster = {}
    for k in range(n):
        at = 4 + 68 * k
        (cid,) = struct.unpack_from("<I", data, at)
        roster[cid] = (data[at + 4 : at + 36], data[at + 36 : at + 68])
    return roster


@dataclass
class SecAggServer:
    """The server's side of one round: routes messages, unmasks the sum."""

    rnd: int
    threshold: int
    adverts: dict[int, bytes] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)  # the clients whose shares went out
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def roster(self, adverts: dict[int, bytes]) -> bytes:
        self.adverts = dict(sorted(adverts.items()))
        return roster_bytes(list(self.adverts.values()))

    def route(self, outboxes: dict[int, bytes]) -> dict[int, bytes]:
        """Step 2's ciphertexts, regrouped by recipient (the server reads ids only); a
        client that sent none (dropped before sharing) is out of the round."""
        self.shared = sorted(outboxes)
        if len(self.shared) < self.threshold:
            raise SecAggError(
                f"round {self.rnd}: {len(self.shared)} clients shared keys, {self.threshold} needed"
            )
        inbox: dict[int, list[bytes]] = {v: [] for v in self.shared}
        for sender, box in sorted(outboxes.items()):
            (count,) = struct.unpack_from("<I", box)
            at = 4
            for _ in range(count):
                recipient, size = struct.unpack_from("<II", box, at)
                item = box[at + 8 : at + 20 + size]
                if recipient in inbox:
                    inbox[recipient].append(struct.pack("<II", sender, size) + item)
                at += 20 + size
        return {v: struct.pack("<I", len(items)) + b"".join(items) for v, items in inbox.items()}

    def receive(self, wire: bytes) -> int:
        """Take one masked input; return the client it came from."""
        cid, size = struct.unpack_from("<II", wire)
        if cid not in self.shared or len(wire) != 8 + 8 * size:
            raise SecAggError(f"round {self.rnd}: a masked input that is not the round's")
        self.masked[cid] = np.frombuffer(wire, dtype=np.uint64, count=size, offset=8).copy()
        return cid

    def unmask_request(self) -> bytes:
        survivors = sorted(self.masked)
        dropped = sorted(set(self.shared) - set(self.masked))
        if len(survivors) < self.threshold:
            raise SecAggError(
                f"round {self.rnd}: {len(survivors)} masked inputs, {self.threshold} needed"
            )
        return _ids(survivors) + _ids(dropped)

    def total(self, answers: dict[int, bytes]) -> np.ndarray:
        """The survivors' sum (floats) from the unmasking answers."""
        survivors = sorted(self.masked)
        dropped = sorted(set(self.shared) - set(self.masked))
        b_shares: dict[int, dict[int, int]] = {u: {} for u in survivors}
        s_shares: dict[int, dict[int, int]] = {u: {} for u in dropped}
        for holder, wire in answers.items():
            b, at = _read_shares(wire, 4)
            s, _ = _read_shares(wire, at)
            for u, y in b.items():
                b_shares[u][holder] = y
            for u, y in s.items():
                s_shares[u][holder] = y
        size = len(next(iter(self.masked.values())))
        total = sum(self.masked.values(), np.zeros(size, np.uint64))
        for u in survivors:
            total -= _prg(combine(b_shares[u], self.threshold), self.rnd, total.size)
        roster = read_roster(roster_bytes(list(self.adverts.values())))
        for u in dropped:
            key = X25519PrivateKey.from_private_bytes(combine(s_shares[u], self.threshold))
            for v in survivors:  # v's upload holds +/- the mask it shares with u
                mask = _prg(_agree(key, roster[v][1], b"mask"), self.rnd, total.size)
                total = total + mask if u < v else total - mask
        return decode(total)


@dataclass
class Exchange:
    """What one secure round moved, per client (bytes of the encoded messages)."""

    total: np.ndarray
    survivors: list[int]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]


def default_threshold(n: int) -> int:
    """Shares needed to unmask: a majority of the round's clients (at least 2)."""
    return max(2, n // 2 + 1)


def secure_sum(
    values: dict[int, np.ndarray],
    rnd: int,
    threshold: int | None = None,
    drop_after_sharing: frozenset[int] = frozenset(),
    tamper: tuple[int, int] | None = None,
    drop_before_sharing: frozenset[int] = frozenset(),
) -> Exchange:
    """Run the four steps in process for ``values`` (client id -> vector): the server
    object sees only the messages. ``drop_after_sharing`` clients vanish after step 2
    (their masked input never arrives), ``drop_before_sharing`` ones after step 1;
    ``tamper = (sender, recipient)`` flips a bit of that share in transit (to test that
    it is caught)."""
    ids = sorted(values)
    if len(ids) < 3:
        raise SecAggError(f"secure aggregation needs at least 3 clients, got {len(ids)}")
    t = threshold or default_threshold(len(ids))
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    clients = {c: SecAggClient(c, rnd) for c in ids}
    server = SecAggServer(rnd, t)
    adverts = {c: clients[c].advertise() for c in ids}
    roster = server.roster(adverts)
    outboxes = {}
    for c in ids:
        up[c] += len(adverts[c])
        down[c] += len(roster)
        if c in drop_before_sharing:
            continue
        outboxes[c] = clients[c].share_keys(roster, t)
        up[c] += len(outboxes[c])
    inboxes = server.route(outboxes)
    if tamper is not None:
        inboxes[tamper[1]] = _flip(inboxes[tamper[1]], tamper[0])
    for c in server.shared:
        down[c] += len(inboxes[c])
        if c in drop_after_sharing:
            continue
        wire = clients[c].masked_input(values[c], inboxes[c])
        up[c] += len(wire)
        server.receive(wire)
    request = server.unmask_request()
    answers = {}
    for c in sorted(server.masked):
        down[c] += len(request)
        answers[c] = clients[c].unmask(request)
        up[c] += len(answers[c])
    return Exchange(server.total(answers), sorted(server.masked), up, down)


def _flip(inbox: bytes, sender: int) -> bytes:
    """``inbox`` with one bit of ``sender``'s ciphertext flipped."""
    at = 4
    data = bytearray(inbox)
    while at < len(data):
        who, size = struct.unpack_from("<II", data, at)
        if who == sender:
            data[at + 20] ^= 1
            return bytes(data)
        at += 20 + size
    raise KeyError(sender)
