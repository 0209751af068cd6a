"""The append-only record of global updates: checkpoint, catch-up source and export path.

File layout (docs/protocol.md): ``b"FSLEDGER"``, ``u16 version``, ``u32 n``, ``n`` bytes
of JSON header (algorithm, direction generator, parameter fingerprint, ...), from
version 2 on a ``u32 crc32`` of those ``n`` bytes, then one record per round: ``u32
length``, the encoded `GlobalUpdate`, ``u32 crc32`` of it.

Two kinds of damage are told apart. A last record cut short (a crash while appending)
is a *torn tail*: readers ignore it and leave the file alone; only a writer opening the
ledger to continue the run (``repair=True``) cuts it off. Anything else (a record or
the header failing its checksum, a record out of sequence) is *corruption*: opening
raises `LedgerCorrupted` and nothing on disk changes.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from fedscalar.messages import GlobalUpdate, MessageError, decode, encode

MAGIC = b"FSLEDGER"
VERSION = 2
READABLE = (1, 2)
"""Version 1 ledgers (no header checksum) are read and appended to as they are."""


class LedgerError(ValueError):
    """The ledger file is unreadable or does not belong to this run."""


class LedgerCorrupted(LedgerError):
    """Bytes of the ledger changed after they were written (not a crash while appending)."""


class Ledger:
    """Rounds ``1..len(ledger)`` of a run, in memory and mirrored to ``path``."""

    def __init__(self, path: Path, header: dict[str, Any], updates: list[GlobalUpdate]):
        self.path = Path(path)
        self.header = header
        self.updates = updates
        self.torn_bytes = 0
        """Bytes of an incomplete last record after the valid records (0 when none)."""
        self.repaired = False

    def __len__(self) -> int:
        return len(self.updates)

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Ledger:
        blob = json.dumps(header, sort_keys=True).encode()
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        head = MAGIC + struct.pack("<HI", VERSION, len(blob)) + blob
        with open(tmp, "wb") as f:
            f.write(head + struct.pack("<I", zlib.crc32(blob)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cls(path, header, [])

    @classmethod
    def open(cls, path: Path, *, repair: bool = False) -> Ledger:
        """Read the ledger at ``path``. A torn tail is ignored (``repair``: cut off, for a
        writer about to append); corruption raises `LedgerCorrupted`, the file unchanged."""
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"no ledger at {path}")
        data = path.read_bytes()
        if data[:8] != MAGIC or len(data) < 14:
            raise LedgerError(f"{path} is not a fedscalar ledger")
        version, n = struct.unpack_from("<HI", data, 8)
        if version not in READABLE:
            raise LedgerError(f"{path}: ledger version {version}, this fedscalar reads {READABLE}")
        pos = 14 + n
        blob = data[14:pos]
        if version >= 2:
            stored = struct.unpack_from("<I", data, pos)[0] if pos + 4 <= len(data) else None
            if stored != zlib.crc32(blob):
                raise LedgerCorrupted(
                    f"{path}: the header fails its checksum: the file is corrupted; restore "
                    "ledger.bin from a backup (nothing was changed)"
                )
            pos += 4
        try:
            header = json.loads(blob)
        except ValueError:
            raise LedgerCorrupted(f"{path}: the header is not valid JSON") from None
        updates: list[GlobalUpdate] = []
        while pos < len(data):
            rnd = len(updates) + 1
            problem = _check_record(data, pos, rnd)
            if problem == "torn":
                break
            if problem:
                raise LedgerCorrupted(
                    f"{path}: record {rnd} (byte {pos}) {problem}: the file is corrupted and "
                    f"rounds {rnd}+ cannot be trusted; restore ledger.bin from a backup, or "
                    f"keep rounds 1-{rnd - 1} by truncating the file to {pos} bytes and "
                    f"running `fedscalar run --resume --from-round {rnd - 1}` (nothing was "
                    "changed)"
                )
            length = _u32(data, pos)
            try:
                update = decode(data[pos + 4 : pos + 4 + length])
            except MessageError as e:
                raise LedgerCorrupted(f"{path}: record {rnd} (byte {pos}): {e}") from e
            updates.append(update)
            pos += 8 + length
        ledger = cls(path, header, updates)
        ledger.torn_bytes = len(data) - pos
        if repair and ledger.torn_bytes:
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
            ledger.repaired = True
        return ledger

    @staticmethod
    def record(update: GlobalUpdate) -> bytes:
        body = encode(update)
        return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))

    def append(self, update: GlobalUpdate) -> None:
        if update.round != len(self.updates) + 1:
            raise LedgerError(f"round {update.round} appended after round {len(self.updates)}")
        if self.torn_bytes and not self.repaired:
            raise LedgerError(f"{self.path} ends in a torn record: open it with repair=True")
        with open(self.path, "ab") as f:
            f.write(self.record(update))
        self.updates.append(update)

    def sync(self) -> None:
        """Force the appended records to disk (at evaluations and at exit)."""
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())

    def truncate(self, rounds: int) -> None:
        """Keep rounds ``1..rounds`` only (used when resuming from a weights checkpoint)."""
        if rounds >= len(self.updates):
            return
        if self.torn_bytes and not self.repaired:
            raise LedgerError(f"{self.path} ends in a torn record: open it with repair=True")
        size = self.path.stat().st_size - sum(len(self.record(u)) for u in self.updates[rounds:])
        with open(self.path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        del self.updates[rounds:]

    def bytes_per_round(self) -> float:
        return sum(len(self.record(u)) for u in self.updates) / max(1, len(self.updates))


def _u32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _check_record(data: bytes, pos: int, rnd: int) -> str | None:
    """None for a sound record of round ``rnd`` at ``pos``; ``"torn"`` for the prefix of
    one that a crash cut short (or the zeros a crash can leave after the last write);
    otherwise what is wrong with it.

    A torn record is a prefix of a valid one: whatever of its length, tag, round, K and
    P is there must agree (the length with ``11 + 4K + 4KP``), which a flipped byte in
    the middle of the file does not.
    """
    rest = data[pos:]
    if not any(rest):
        return "torn"
    if len(rest) < 4:
        return "torn"
    length = _u32(data, pos)
    head = rest[4:11]  # tag, round, K, P
    if head[:1] and head[0] != GlobalUpdate.TAG:
        return "has an unknown tag"
    if len(head) >= 5 and _u32(head, 1) != rnd:
        return f"is labelled round {_u32(head, 1)}"
    if len(head) == 7 and length != 11 + 4 * head[5] + 4 * head[5] * head[6]:
        return f"has length {length}, not that of its K={head[5]}, P={head[6]}"
    if len(rest) < 8 + length:
        return "torn"
    if zlib.crc32(rest[4 : 4 + length]) != _u32(rest, 4 + length):
        return "fails its checksum"
    return None
