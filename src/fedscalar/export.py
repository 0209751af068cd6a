"""Rebuild a run's trained weights from its base weights and its ledger, and check them
against what the training process wrote."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedscalar.algorithms import make_server
from fedscalar.config import ConfigError, stored_config
from fedscalar.federation import resolve_device
from fedscalar.header import check_header, load_base
from fedscalar.ledger import Ledger
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir
from fedscalar.tasks import build_task
from fedscalar.tasks.hf import MissingPackage


@dataclass
class _Replayed:
    rd: RunDir
    task: Any
    server: Any  # None for FedAvg-like runs: their weights come from the checkpoint
    space: ParamSpace
    round: int


def _replay(run_dir: str | Path, rounds: int | None, device: str) -> _Replayed:
    """The run's model with ``rounds`` (default: all) rounds of its ledger applied on
    ``device`` by its server; FedAvg-like runs (nothing to replay) get their checkpoint's
    weights and no server."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise ConfigError(f"run: no run folder at {rd.path} (config.toml missing)")
    cfg = stored_config(rd.config)
    try:
        task = build_task(cfg)
    except (ValueError, MissingPackage) as e:
        raise ConfigError(str(e)) from None
    space = ParamSpace(task.build_model(cfg.seed).to(resolve_device(device)))
    ledger = Ledger.open(rd.ledger)  # read only: a torn last record is ignored, not cut
    cfg = check_header(rd, cfg, ledger.header)
    target = len(ledger) if rounds is None else rounds
    if not cfg.spec.replayable:
        tensors, meta = RunDir.load_tensors(rd.checkpoint)
        if rounds is not None and int(meta["round"]) != rounds:
            raise ConfigError(f"rounds: {cfg.algorithm} can only be exported at its checkpoint")
        space.load_state_(tensors)
        return _Replayed(rd, task, None, space, int(meta["round"]))
    if target > len(ledger):
        raise ConfigError(f"rounds: the ledger holds {len(ledger)} rounds, asked for {target}")
    load_base(rd, space, ledger.header)
    server = make_server(cfg.resolved(), space, ledger.updates)
    for update in ledger.updates[:target]:
        server.apply(update)
    return _Replayed(rd, task, server, space, target)


def rebuild(
    run_dir: str | Path, rounds: int | None = None, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], int]:
    """The model weights (on the CPU) after ``rounds`` (default: all) rounds of the run in
    ``run_dir``, and that round.

    DeComFL and HiSo weights are replayed on ``device`` from ``base.safetensors`` and
    ``ledger.bin`` alone; FedAvg's are read from its checkpoint (its ledger holds no updates).
    """
    done = _replay(run_dir, rounds, device)
    return {n: t.cpu() for n, t in done.space.state().items()}, done.round


@dataclass(frozen=True)
class Agreement:
    """How a replay compares with the weights a training process wrote (`verify`)."""

    round: int
    device: str  # where the ledger was replayed
    values: int
    differing: int
    largest: float  # inf where one side holds a NaN
    worst: str | None  # the tensor holding the largest difference

    @property
    def identical(self) -> bool:
        return self.differing == 0


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers of its width (on the CPU): equal patterns, equal bits."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().contiguous().view(ints[t.element_size()])


def verify(run_dir: str | Path, device: str = "cpu") -> Agreement:
    """Replay the run's ledger on ``device`` to its checkpoint's round and compare the
    result (the weights, and HiSo's H) with the checkpoint the training process wrote,
    bit for bit: what any party holding the ledger derives, against what the run holds.
    The checkpoint is read once, first, so a run still training can be verified."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise ConfigError(f"run: no run folder at {rd.path} (config.toml missing)")
    cfg = stored_config(rd.config)
    if not cfg.spec.replayable:
        raise ConfigError(
            f"verify: {cfg.algorithm} keeps its weights only in its checkpoint (its ledger "
            "holds no updates): there is nothing to replay"
        )
    device = str(resolve_device(device))  # a bad name fails before the model loads
    if not rd.checkpoint.exists():
        raise ConfigError(f"verify: {rd.checkpoint} is missing: nothing to compare against")
    written, meta = RunDir.load_tensors(rd.checkpoint)
    done = _replay(run_dir, int(meta["round"]), device)
    values = differing = 0
    largest, worst = 0.0, None
    for name, mine in done.server.state_tensors().items():
        if name not in written:
            raise ConfigError(f"verify: {rd.checkpoint} lacks {name}")
        theirs = written[name]
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise ConfigError(
                f"verify: {name} is {theirs.dtype} {tuple(theirs.shape)} in "
                f"{rd.checkpoint}, {mine.dtype} {tuple(mine.shape)} replayed"
            )
        values += mine.numel()
        off = bit_pattern(mine) != bit_pattern(theirs)
        if bool(off.any()):
            differing += int(off.sum())
            gap = (mine.detach().cpu().double() - theirs.double()).abs()
            top = float(gap.nan_to_num(nan=float("inf")).max())  # a NaN on one side: inf
            if worst is None or top > largest:
                largest, worst = top, name
    return Agreement(done.round, device, values, differing, largest, worst)


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


def export_hf(run_dir: str | Path, folder: str | Path) -> int:
    """Write a language-model run's trained model as a Hugging Face model folder.

    LoRA adapters are merged into the weights (PEFT's ``merge_and_unload``), so
    ``AutoModelForCausalLM`` (or ``AutoModel`` for an encoder) loads the folder with no
    fedscalar or PEFT; the tokenizer is saved beside it. ``fedscalar.json`` says how the
    run classified: a causal LM's prompt (``prefix_ids``, the text's first ``text_tokens``
    tokens without special tokens, ``suffix_ids``) and verbalizer tokens (class scores are
    their logits at the prompt's last token), or an encoder's labels and its cosine head,
    kept in ``head.safetensors`` (scores: ``head(normalize(mean of the last hidden
    states)))``). Returns the round the weights are from; the folder must not exist.
    """
    from fedscalar.tasks.text import EncoderClassifier, PromptClassifier

    target = Path(folder)
    if target.exists():
        raise ConfigError(f"hf: {target} already exists (give a new folder)")
    done = _replay(run_dir, None, "cpu")
    model, task = done.space.model, done.task
    if isinstance(model, PromptClassifier):
        backbone = model.lm
        info = {  # a prompt's ids: prefix_ids + the text's first text_tokens + suffix_ids
            "kind": "causal",
            "template": task.template,
            "prefix_ids": task.prefix_ids,
            "suffix_ids": task.suffix_ids,
            "text_tokens": task.s.max_length - len(task.prefix_ids) - len(task.suffix_ids),
            "add_special_tokens": False,
            "verbalizers": task.verbalizers,
            "verbalizer_ids": task.verbalizer_ids,
        }
    elif isinstance(model, EncoderClassifier):
        backbone = model.encoder
        info = {
            "kind": "encoder",
            "label_texts": task.label_texts,  # the phrases the head started from
            "pooling": "mean",
            "normalize": True,
            "head": "head.safetensors",
        }
    else:
        raise ConfigError(
            f"hf: only language-model runs export as a Hugging Face folder (task {task.name!r})"
        )
    if hasattr(backbone, "merge_and_unload"):  # a PEFT model: fold B A into the weights
        backbone = backbone.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        backbone.save_pretrained(tmp)
        task.pre.tokenizer.save_pretrained(tmp)
        if info["kind"] == "encoder":
            head = {"weight": model.head.weight, "bias": model.head.bias}
            RunDir.save_tensors(tmp / "head.safetensors", head, {"format": "fedscalar-head"})
        info = {
            "format": "fedscalar-hf",
            "task": task.name,
            "labels": list(task.data.label_names),
            "max_length": task.s.max_length,
            "rounds": done.round,
            **info,
        }
        (tmp / "fedscalar.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the export failed
    return done.round
