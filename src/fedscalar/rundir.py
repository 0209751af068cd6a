"""The run folder: every file a run reads or writes, and how it is written.

Files are appended or replaced atomically, so a run stopped at any point (crash,
Ctrl-C, divergence) leaves a consistent prefix: ``metrics.jsonl`` and ``ledger.bin``
agree on the last completed round and ``--resume`` continues from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


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

    def exists(self) -> bool:
        return self.config.exists()

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
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @staticmethod
    def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta

    # -- misc ---------------------------------------------------------------------------
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
