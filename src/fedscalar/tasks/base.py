"""What a task gives the rest of fedscalar: a model, labelled examples, a loss, a metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn


class Task(ABC):
    """A supervised task: train examples (split over clients) and a held-out test set."""

    name: str
    model_name: str

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """The initial model; the same ``seed`` gives bit-identical weights."""

    @property
    @abstractmethod
    def train_labels(self) -> np.ndarray:
        """Integer labels of the training examples (used to partition them)."""

    @abstractmethod
    def batch(self, indices: np.ndarray) -> Any:
        """The training examples at ``indices`` in the form `loss` expects."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of ``model`` on ``batch`` (a scalar tensor)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``{"test_loss": ..., "test_accuracy": ...}`` on the held-out test set."""

    def evaluate_full(self, model: nn.Module) -> dict[str, float]:
        """``full_test_loss``, ``full_test_accuracy`` and ``full_test_examples`` on the
        whole test split when `evaluate` uses a subset of it; empty otherwise."""
        return {}

    def eval_digest(self) -> str | None:
        """A digest of everything `evaluate` and `evaluate_full` score and how they batch
        it, so that equal digests on an equal model give equal metrics; None: evaluation
        is cheap, nothing is cached (`fedscalar.evalcache`)."""
        return None

    def eval_size(self) -> int | None:
        """Examples `evaluate` scores (None: not known)."""
        return None
