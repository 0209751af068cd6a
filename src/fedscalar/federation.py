"""The federation a run trains: which examples each client holds, the minibatches it
draws, which clients each round samples, and the device the model lives on. The same
for every runtime and every algorithm (MeZO's one party holds the union of the data)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from fedscalar import schedule
from fedscalar.algorithms.base import ClientData
from fedscalar.config import ConfigError, RunConfig
from fedscalar.tasks.partition import partition


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's own message for a name it does not know
        raise ConfigError(f"device: unknown device {name!r} (cpu, cuda or auto)") from None


def batch_size(cfg: RunConfig) -> int:
    """Examples per local step. MeZO's one party takes the federation's round's worth."""
    return cfg.batch_size * cfg.sampled if cfg.spec.pooled else cfg.batch_size


def client_data(cfg: RunConfig, task: Any, idx: Any, cid: int) -> ClientData:
    """Client ``cid``'s minibatches, drawn from its examples ``idx`` of ``task``."""
    size = batch_size(cfg)

    def make_batch(rnd: int, step: int):
        pos = schedule.batch_positions(cfg.seed, rnd, cid, step, size, len(idx))
        return task.batch(idx[pos])

    return ClientData(cid, make_batch, task.loss)


def client_partitions(cfg: RunConfig, task: Any) -> list[Any]:
    """Each client's training examples (indices into the task's training set).

    The split depends only on the task, ``clients``, ``partition``, ``alpha`` and the
    run seed, never on the algorithm. MeZO's one party holds the union of them.
    """
    parts = partition(
        task.train_labels, cfg.clients, cfg.partition, cfg.alpha, schedule.partition_seed(cfg.seed)
    )
    if cfg.spec.pooled:
        return [np.sort(np.concatenate(parts))]
    return parts


def partition_digest(parts: list[Any]) -> str:
    """SHA-256 of the clients' example indices (equal digests: the same data split)."""
    h = hashlib.sha256()
    for idx in parts:
        h.update(np.asarray(idx, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def round_clients(cfg: RunConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd``: the same for every algorithm but MeZO (one party)."""
    if cfg.spec.pooled:
        return [0]
    return schedule.sample_clients(cfg.seed, rnd, cfg.clients, cfg.sampled)
