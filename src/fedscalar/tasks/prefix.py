"""Reuse the frozen bottom of a network across the forwards of one zeroth-order step.

A ZO step evaluates the same batch P + 1 times at points that differ only in the
trainable weights. When those sit in the upper blocks (LoRA on the last layers, say),
every block below them computes the same thing each time: `PrefixCache` keeps the last
output of each such block and returns it again when the block is called with equal
inputs, so a step costs one full forward plus P forwards of the trainable top. Outputs
are the very tensors the block computed, so results are bit-identical with and without
the cache; a different batch (or any changed input) is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_LISTS = ("layers", "layer", "h", "blocks")
"""Attribute names under which Hugging Face models keep their transformer blocks."""


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest list of repeated blocks in ``model`` (its attribute name and the list)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        repeated = isinstance(module, nn.ModuleList) and leaf in BLOCK_LISTS and len(module) > 1
        if repeated and (best is None or len(module) > len(best[1])):
            best = (leaf, module)
    return best


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class PrefixCache:
    """Caches the outputs of the leading blocks of ``blocks`` that have no trainable
    weights, provided nothing trainable runs before them (checked by the caller)."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = []
        for block in blocks:
            if not _frozen(block):
                break
            self.blocks.append(block)
        self._seen: list[tuple[Any, Any] | None] = [None] * len(self.blocks)
        self.hits = 0
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)

    def __len__(self) -> int:
        return len(self.blocks)

    def _wrap(self, i: int, forward):
        def cached(*args, **kwargs):
            seen = self._seen[i]
            if seen is not None and _same(seen[0], (args, kwargs)):
                self.hits += 1
                return seen[1]
            self._seen[i] = None
            out = forward(*args, **kwargs)
            self._seen[i] = ((args, kwargs), out)
            return out

        return cached

    def clear(self) -> None:
        self._seen = [None] * len(self.blocks)
