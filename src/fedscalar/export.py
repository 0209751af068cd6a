"""Rebuild a run's trained weights from its base weights and its ledger."""

from __future__ import annotations

from pathlib import Path

import torch

from fedscalar.algorithms import make_server
from fedscalar.config import ConfigError, stored_config
from fedscalar.header import check_header, load_base
from fedscalar.ledger import Ledger
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir
from fedscalar.tasks import build_task
from fedscalar.tasks.hf import MissingPackage


def rebuild(run_dir: str | Path, rounds: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The model weights after ``rounds`` (default: all) rounds of the run in ``run_dir``.

    DeComFL and HiSo weights are replayed from ``base.safetensors`` and ``ledger.bin``
    alone; FedAvg's are read from its checkpoint (its ledger holds no updates).
    """
    rd = RunDir(run_dir)
    if not rd.exists():
        raise ConfigError(f"run: no run folder at {rd.path} (config.toml missing)")
    cfg = stored_config(rd.config)
    try:
        task = build_task(cfg)
    except (ValueError, MissingPackage) as e:
        raise ConfigError(str(e)) from None
    space = ParamSpace(task.build_model(cfg.seed))
    ledger = Ledger.open(rd.ledger)  # read only: a torn last record is ignored, not cut
    cfg = check_header(rd, cfg, ledger.header)
    target = len(ledger) if rounds is None else rounds
    if not cfg.spec.replayable:
        tensors, meta = RunDir.load_tensors(rd.checkpoint)
        if rounds is not None and int(meta["round"]) != rounds:
            raise ConfigError(f"rounds: {cfg.algorithm} can only be exported at its checkpoint")
        return {n: tensors[n] for n in space.names}, int(meta["round"])
    if target > len(ledger):
        raise ConfigError(f"rounds: the ledger holds {len(ledger)} rounds, asked for {target}")
    load_base(rd, space, ledger.header)
    server = make_server(cfg.resolved(), space, ledger.updates)
    for update in ledger.updates[:target]:
        server.apply(update)
    return space.state(), target


def export(run_dir: str | Path, output: str | Path) -> int:
    """Write the rebuilt trainable weights to a safetensors file (named as in the model).

    Frozen weights (the pretrained model under LoRA adapters) are not repeated: they are
    the base model's.
    """
    weights, rounds = rebuild(run_dir)
    RunDir.save_tensors(
        Path(output), weights, {"format": "fedscalar-export", "rounds": str(rounds)}
    )
    return rounds
