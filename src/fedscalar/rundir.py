"""The run folder: every file a run reads or writes, and how it is written.

Files are appended or replaced atomically, so a run stopped at any point (crash,
Ctrl-C, divergence) leaves a consistent prefix: ``metrics.jsonl`` and ``ledger.bin``
agree on the last completed round and ``--resume`` continues from there. One process
at a time writes a folder (`RunDir.writing`); readers never change it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedscalar.config import ConfigError


class FolderLocked(ConfigError):
    """Another process is writing the run folder."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.toml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary = property(lambda self: self.path / "summary.json")
    ledger = property(lambda self: self.path / "ledger.bin")
    base = property(lambda self: self.path / "base.safetensors")
    checkpoint = property(lambda self: self.path / "checkpoint.safetensors")
    curves = property(lambda self: self.path / "curves.png")
    log = property(lambda self: self.path / "run.log")
    lock = property(lambda self: self.path / ".lock")
    dp_secret = property(lambda self: self.path / "dp-secret")

    def exists(self) -> bool:
        return self.config.exists()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder's write lock: an advisory ``flock`` on ``.lock`` that the
        operating system releases when the process ends, however it ends (a SIGKILL
        leaves no stale lock). A second writer gets `FolderLocked` naming the holder."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"out: {self.path} is a file, not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.lock, "a+")  # noqa: SIM115 (held for the whole block)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FolderLocked(
                f"out: {self.path} is being written by {holder}; wait for it to finish or "
                "stop it, then run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    @staticmethod
    def fsync(path: Path) -> None:
        """Force ``path``'s appended bytes to disk."""
        if path.exists():
            with open(path, "rb") as f:
                os.fsync(f.fileno())

    # -- metrics ------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the valid prefix
        return out

    def truncate_metrics(self, rounds: int) -> list[dict[str, Any]]:
        """Keep the records of rounds ``0..rounds``; return them."""
        kept = [m for m in self.read_metrics() if m["round"] <= rounds]
        self.write_atomic(self.metrics, "".join(json.dumps(m) + "\n" for m in kept))
        return kept

    # -- weights ------------------------------------------------------------------------
    @staticmethod
    def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Write a safetensors file atomically and byte for byte reproducibly: the same
        tensors and metadata give the same bytes (the library orders the metadata keys
        at random; the header is rewritten with sorted keys)."""
        blob = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=meta)
        (n,) = struct.unpack_from("<Q", blob)
        header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
        header += " " * (-len(header) % 8)  # the format pads the header to 8 bytes
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header.encode() + blob[8 + n :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def checkpoint_round(self) -> int | None:
        """The round ``checkpoint.safetensors`` holds, or None when there is none."""
        if not self.checkpoint.exists():
            return None
        from safetensors import safe_open

        with safe_open(self.checkpoint, framework="pt") as f:
            return int((f.metadata() or {})["round"])

    @staticmethod
    def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta

    # -- misc ---------------------------------------------------------------------------
    def secret(self) -> int:
        """The run's DP noise secret: made once, readable by its owner only, never in
        the config, the ledger or the metrics (whoever knows it can remove the noise)."""
        if not self.dp_secret.exists():
            fd = os.open(self.dp_secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{secrets.randbits(63)}\n")
                f.flush()
                os.fsync(f.fileno())
        text = self.dp_secret.read_text().strip()
        if not text.isdigit():
            raise ConfigError(f"{self.dp_secret}: not a DP secret (one integer); restore it")
        return int(text)

    @staticmethod
    def write_atomic(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def read_summary(self) -> dict[str, Any] | None:
        """The run's ``summary.json``, or None if it is missing or unreadable."""
        try:
            return json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_atomic(self.summary, json.dumps(summary, indent=2) + "\n")
