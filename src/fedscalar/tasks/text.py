"""Text classification with pretrained language models.

Causal LMs classify by prompting (as in MeZO and DeComFL): the example is put into a
template, and the logits of one verbalizer token per class at the answer position (the
last prompt token) are the class scores; the loss is cross-entropy over those scores.
Encoders mean-pool their last hidden states into a cosine classifier whose head starts
as zero-shot classification by similarity to a phrase per label (`EncoderClassifier`).
The data comes from `fedscalar.tasks.text_data`, batches are laid out by
`fedscalar.tasks.batching`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedscalar.tasks import hf
from fedscalar.tasks.base import Task
from fedscalar.tasks.batching import PACK_TOKENS, Tokens, lay_out
from fedscalar.tasks.prefix import PrefixCache, transformer_blocks
from fedscalar.tasks.text_data import SPLIT_SEED, TextData

SENTIMENT_TEMPLATE = "{text} It was"
SENTIMENT_VERBALIZERS = (" terrible", " great")


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
            self.template, self.verbalizers = template, list(words)
            self.verbalizer_ids = []
            for w in words:
                ids = tok.encode(w, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"verbalizers: {w!r} is {len(ids)} tokens, not one")
                self.verbalizer_ids.append(ids[0])
            prefix, suffix = template.split("{text}")
            self.prefix_ids = tok.encode(prefix, add_special_tokens=False) if prefix else []
            self.suffix_ids = tok.encode(suffix, add_special_tokens=False) if suffix else []
            if len(self.prefix_ids) + len(self.suffix_ids) >= settings.max_length:
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
            budget = self.s.max_length - len(self.prefix_ids) - len(self.suffix_ids)
            bodies = tok(texts, add_special_tokens=False)["input_ids"]
            return [self.prefix_ids + b[:budget] + self.suffix_ids for b in bodies]
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

    def eval_digest(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.model_name, self._dtype, self.packed, self.s.pack_tokens)).encode())
        h.update(repr((self.s.eval_batch_size, self.eval_index.tolist())).encode())
        for ids in self.test_ids:
            h.update(np.asarray(ids, np.int64).tobytes() + b"|")
        h.update(np.ascontiguousarray(self.data.test_labels, np.int64).tobytes())
        return h.hexdigest()

    def eval_size(self) -> int:
        return len(self.eval_index)
