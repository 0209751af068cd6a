"""Round-0 evaluations shared between runs that start from the same model.

Every run of a language-model comparison scores its untrained model on the evaluation
subset and the whole test split before round 1 (about 8 minutes of one CPU thread for
SmolLM2-135M on `sentiment`), the same for every algorithm and seed: a LoRA adapter
starts with B = 0 and adds exactly nothing. `EvalCache` keeps those metrics in a folder
under a key that holds everything the numbers depend on: the model's effective weights
and buffers (an inert adapter left out), what the task scores and how it batches it,
dtype, device, torch threads and version, fedscalar's version and `KEY_VERSION`. A
different key is a miss, so a cached number is the one the run would have computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_A, LORA_B = ".lora_A.", ".lora_B."
KEY_VERSION = 1
"""Part of every key: raise it when a change of the evaluation code changes its numbers."""


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, values),
    leaving out each LoRA pair whose B is zero: such an adapter changes no output bit."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    inert = {
        name.replace(LORA_B, LORA_A)
        for name, t in tensors.items()
        if LORA_B in name and not bool(t.detach().any())
    }
    inert |= {name.replace(LORA_A, LORA_B) for name in inert}
    h = hashlib.sha256()
    for name in sorted(set(tensors) - inert):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def eval_key(model: nn.Module, task_digest: str, device: str) -> str:
    """The cache key of evaluating ``model`` as a task with ``task_digest`` scores."""
    from fedscalar import __version__

    parts = [model_digest(model), task_digest, device, str(torch.get_num_threads())]
    parts += [torch.__version__, __version__, str(KEY_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class EvalCache:
    """Metrics by key, one small JSON file each in ``folder`` (written atomically, so
    runs in parallel processes may share it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):  # missing, or unreadable: computed again
            return None

    def put(self, key: str, metrics: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(key).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(metrics))
        os.replace(tmp, self._path(key))
