"""The append-only record of global updates: checkpoint, catch-up source and export path.

File layout: ``b"FSLEDGER"``, ``u16 version``, ``u32 n``, ``n`` bytes of JSON header
(algorithm, direction generator, parameter fingerprint, ...), then one record per round:
``u32 length``, the encoded `GlobalUpdate`, ``u32 crc32`` of it. A record cut short by a
crash is detected and dropped on open, so a ledger is always a valid prefix of the run.
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
VERSION = 1


class LedgerError(ValueError):
    """The ledger file is unreadable or does not belong to this run."""


class Ledger:
    """Rounds ``1..len(ledger)`` of a run, in memory and mirrored to ``path``."""

    def __init__(self, path: Path, header: dict[str, Any], updates: list[GlobalUpdate]):
        self.path = Path(path)
        self.header = header
        self.updates = updates
        self.dropped_bytes = 0

    def __len__(self) -> int:
        return len(self.updates)

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Ledger:
        blob = json.dumps(header, sort_keys=True).encode()
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(MAGIC + struct.pack("<HI", VERSION, len(blob)) + blob)
        os.replace(tmp, path)
        return cls(path, header, [])

    @classmethod
    def open(cls, path: Path) -> Ledger:
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"no ledger at {path}")
        data = path.read_bytes()
        if data[:8] != MAGIC:
            raise LedgerError(f"{path} is not a fedscalar ledger")
        version, n = struct.unpack_from("<HI", data, 8)
        if version != VERSION:
            raise LedgerError(f"{path}: ledger version {version}, this fedscalar reads {VERSION}")
        pos = 14 + n
        header = json.loads(data[14:pos])
        updates: list[GlobalUpdate] = []
        while pos + 4 <= len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            end = pos + 4 + length + 4
            if end > len(data):
                break
            body = data[pos + 4 : pos + 4 + length]
            (crc,) = struct.unpack_from("<I", data, pos + 4 + length)
            if zlib.crc32(body) != crc:
                break
            try:
                update = decode(body)
            except MessageError as e:
                raise LedgerError(f"{path}: record {len(updates) + 1}: {e}") from e
            if not isinstance(update, GlobalUpdate) or update.round != len(updates) + 1:
                raise LedgerError(f"{path}: record {len(updates) + 1} is out of sequence")
            updates.append(update)
            pos = end
        ledger = cls(path, header, updates)
        ledger.dropped_bytes = len(data) - pos
        if ledger.dropped_bytes:  # torn tail from a crash: cut it so appends stay aligned
            with open(path, "r+b") as f:
                f.truncate(pos)
        return ledger

    @staticmethod
    def record(update: GlobalUpdate) -> bytes:
        body = encode(update)
        return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))

    def append(self, update: GlobalUpdate) -> None:
        if update.round != len(self.updates) + 1:
            raise LedgerError(f"round {update.round} appended after round {len(self.updates)}")
        with open(self.path, "ab") as f:
            f.write(self.record(update))
            f.flush()
        self.updates.append(update)

    def truncate(self, rounds: int) -> None:
        """Keep rounds ``1..rounds`` only (used when resuming from a weights checkpoint)."""
        if rounds >= len(self.updates):
            return
        size = self.path.stat().st_size - sum(len(self.record(u)) for u in self.updates[rounds:])
        with open(self.path, "r+b") as f:
            f.truncate(size)
        del self.updates[rounds:]

    def bytes_per_round(self) -> float:
        return sum(len(self.record(u)) for u in self.updates) / max(1, len(self.updates))
