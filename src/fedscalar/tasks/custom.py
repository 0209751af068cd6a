"""A task from a user's own model, data, loss and metric, without subclassing `Task`.

    from fedscalar.tasks.custom import TensorTask

    task = TensorTask(
        "my-task",
        build_model=lambda: MyNet(),          # any torch.nn.Module (or an HF model)
        train=(x_train, y_train),             # tensors (or a torch Dataset of (x, y))
        test=(x_test, y_test),
        loss=torch.nn.functional.cross_entropy,   # (model output, y) -> scalar
        metric=None,                          # (model output, y) -> float; default accuracy
    )
    register_task(task.spec(help="my data"))  # then RunConfig(task="my-task", lr=...)

Every party builds the same initial weights: ``build_model`` runs under
``torch.manual_seed(run seed)``. Labels are integers (they split the data over clients
by label for ``partition = "dirichlet"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedscalar.tasks.base import Task

if TYPE_CHECKING:
    from fedscalar.config import RunConfig
    from fedscalar.registry import TaskSpec

Data = tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset


def accuracy(output: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose largest output is the label."""
    return float((output.argmax(-1) == y).float().mean())


def _tensors(data: Data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, tuple):
        x, y = data
    else:
        pairs = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not pairs:
            raise ValueError(f"{what}: the dataset is empty")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what}: {len(x)} inputs and {len(y)} labels (need as many, > 0)")
    if y.dtype.is_floating_point:
        raise ValueError(f"{what}: labels must be integers (they split the data over clients)")
    return x, y.long()


class TensorTask(Task):
    """Inputs and integer labels held in memory; the model scores a batch of inputs."""

    def __init__(
        self,
        name: str,
        build_model: Callable[[], nn.Module],
        train: Data,
        test: Data,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
        model_name: str = "custom",
        eval_batch: int = 1024,
    ):
        self.name, self.model_name = name, model_name
        self._build, self._loss, self._metric = build_model, loss, metric or accuracy
        self.x_train, self.y_train = _tensors(train, "train")
        self.x_test, self.y_test = _tensors(test, "test")
        self.eval_batch = eval_batch

    def spec(self, help: str = "", data: str = "", default_model: str = "") -> TaskSpec:
        """A registry entry serving this task object to every run that names it."""
        from fedscalar.registry import TaskSpec

        return TaskSpec(
            self.name,
            help or f"{self.name} (a TensorTask)",
            lambda cfg: self.for_config(cfg),
            default_model or self.model_name,
            data or f"{len(self.y_train)} training examples",
        )

    def for_config(self, cfg: RunConfig) -> TensorTask:
        if cfg.model not in (None, self.model_name):
            raise ValueError(f"model: task {self.name} has its own model ({self.model_name})")
        return self

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._build()

    @property
    def train_labels(self) -> np.ndarray:
        return self.y_train.numpy()

    def batch(self, indices: np.ndarray) -> Any:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        return self._loss(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        outputs = [
            model(self.x_test[i : i + self.eval_batch].to(device))
            for i in range(0, len(self.y_test), self.eval_batch)
        ]
        out, y = torch.cat(outputs), self.y_test.to(device)
        return {"test_loss": float(self._loss(out, y)), "test_accuracy": self._metric(out, y)}

    def eval_size(self) -> int:
        return len(self.y_test)
