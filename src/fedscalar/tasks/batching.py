"""Batches of token sequences for one forward pass: packed without padding, or padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_TOKENS = 256
"""Token budget of one packed row (0: no packing, one padded sequence per row)."""


@dataclass
class Tokens:
    """A batch of token sequences laid out for one forward pass.

    Packed (the default): sequences are concatenated into rows of at most a token budget,
    with no padding between them; ``mask`` is an additive ``(rows, 1, T, T)`` mask that
    keeps each sequence to itself (block diagonal, and causal for causal LMs) and
    ``positions`` restart at 0 for each sequence. Padded (for models whose attention
    ignores such a mask): one sequence per row, right padding, ``mask`` is the usual
    ``(rows, T)`` 0/1 mask and ``positions`` is None.

    ``row[i]``, ``start[i]`` and ``length[i]`` locate sequence ``i`` (in batch order).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None
    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    def to(self, device: torch.device) -> Tokens:
        return Tokens(
            self.ids.to(device),
            self.mask.to(device),
            None if self.positions is None else self.positions.to(device),
            self.row.to(device),
            self.start.to(device),
            self.length.to(device),
        )

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a Hugging Face model's forward."""
        out = {"input_ids": self.ids, "attention_mask": self.mask}
        if self.positions is not None:
            out["position_ids"] = self.positions
        return out


def lay_out(
    seqs: list[list[int]],
    pad_id: int,
    *,
    packed: bool,
    causal: bool,
    budget: int,
    dtype: torch.dtype = torch.float32,
) -> Tokens:
    """Lay ``seqs`` out as `Tokens`: packed into rows of at most ``budget`` tokens (in
    order, a new row when the next sequence does not fit), or one per row, padded."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, s in enumerate(seqs):
        if packed and rows and used[-1] + len(s) <= budget:
            rows[-1].append(i)
            used[-1] += len(s)
        else:
            rows.append([i])
            used.append(len(s))
    width = max(used)
    n = len(seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    row, start, length = (torch.zeros(n, dtype=torch.long) for _ in range(3))
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            s = seqs[i]
            ids[r, offset : offset + len(s)] = torch.tensor(s)
            segment[r, offset : offset + len(s)] = i
            positions[r, offset : offset + len(s)] = torch.arange(len(s))
            row[i], start[i], length[i] = r, offset, len(s)
            offset += len(s)
    if not packed:
        return Tokens(ids, (segment >= 0).long(), None, row, start, length)
    same = segment[:, :, None] == segment[:, None, :]  # padding attends to padding only
    if causal:
        same &= torch.ones(width, width, dtype=torch.bool).tril()
    mask = torch.zeros(same.shape, dtype=dtype).masked_fill_(~same, torch.finfo(dtype).min)
    return Tokens(ids, mask[:, None], positions, row, start, length)
