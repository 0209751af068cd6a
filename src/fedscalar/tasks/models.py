"""Small models for the built-in tasks."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected network: ``inputs -> hidden... -> classes`` with ReLU."""

    def __init__(self, inputs: int, hidden: tuple[int, ...], classes: int):
        layers: list[nn.Module] = []
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers with max pooling, then a linear classifier."""

    def __init__(self, side: int, classes: int, channels: tuple[int, int] = (8, 16)):
        super().__init__()
        self.side = side
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.view(-1, 1, self.side, self.side))
        return self.head(x.flatten(1))


def build(name: str, inputs: int, side: int, classes: int) -> nn.Module:
    """A model by name: ``linear``, ``mlp`` (hidden 32), ``mlp64``, ``mlp128``, ``cnn``."""
    if name == "linear":
        return MLP(inputs, (), classes)
    if name.startswith("mlp"):
        width = int(name[3:] or 32)
        return MLP(inputs, (width,), classes)
    if name == "cnn":
        return SmallCNN(side, classes)
    raise ValueError(name)


MODEL_NAMES = ("linear", "mlp", "mlp16", "mlp64", "mlp128", "cnn")
