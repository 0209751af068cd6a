"""Rebuild a run's trained weights from its base weights and its ledger."""

from __future__ import annotations

from pathlib import Path

import torch

from fedscalar import directions
from fedscalar.algorithms import REPLAYABLE, make_server
from fedscalar.config import ConfigError, build_config
from fedscalar.ledger import Ledger, LedgerError
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir
from fedscalar.tasks import build_task


def rebuild(run_dir: str | Path, rounds: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The model weights after ``rounds`` (default: all) rounds of the run in ``run_dir``.

    DeComFL and HiSo weights are replayed from ``base.safetensors`` and ``ledger.bin``
    alone; FedAvg's are read from its checkpoint (its ledger holds no updates).
    """
    rd = RunDir(run_dir)
    if not rd.exists():
        raise ConfigError(f"run: no run folder at {rd.path} (config.toml missing)")
    cfg = build_config(rd.config)
    task = build_task(cfg.task, cfg.model)
    model = task.build_model(cfg.seed)
    space = ParamSpace(model)
    ledger = Ledger.open(rd.ledger)
    if ledger.header["fingerprint"] != space.fingerprint():
        raise LedgerError(f"{rd.ledger} was written for a different model layout")
    if ledger.header.get("generator") != directions.GENERATOR_ID:
        raise LedgerError(f"{rd.ledger} uses direction generator {ledger.header.get('generator')}")
    target = len(ledger) if rounds is None else rounds
    if cfg.algorithm not in REPLAYABLE:
        tensors, meta = RunDir.load_tensors(rd.checkpoint)
        if rounds is not None and int(meta["round"]) != rounds:
            raise ConfigError(f"rounds: {cfg.algorithm} can only be exported at its checkpoint")
        return {n: tensors[n] for n in space.names}, int(meta["round"])
    if target > len(ledger):
        raise ConfigError(f"rounds: the ledger holds {len(ledger)} rounds, asked for {target}")
    base, _ = RunDir.load_tensors(rd.base)
    space.load_state_(base)
    server = make_server(cfg.resolved(), space, ledger.updates)
    for update in ledger.updates[:target]:
        server.apply(update)
    return space.state(), target


def export(run_dir: str | Path, output: str | Path) -> int:
    """Write the rebuilt weights (with frozen parameters too) to a safetensors file."""
    weights, rounds = rebuild(run_dir)
    rd = RunDir(run_dir)
    full, _ = RunDir.load_tensors(rd.base)
    full.update(weights)
    RunDir.save_tensors(Path(output), full, {"format": "fedscalar-export", "rounds": str(rounds)})
    return rounds
