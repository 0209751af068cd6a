"""Tiny randomly initialised language models (same architectures as the real ones)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "story",
    "actors",
    "was",
    "is",
    "it",
    "great",
    "terrible",
    "good",
    "bad",
    "boring",
    "fun",
    "world",
    "sports",
    "business",
    "tech",
    "news",
    "game",
    "team",
    "market",
    "phone",
    "answer",
    ":",
    ".",
    ",",
]


def _tokenizer(folder: Path, causal: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        **({} if causal else {"cls_token": "[CLS]", "sep_token": "[SEP]"}),
    )
    fast.save_pretrained(folder)
    return len(vocab)


SHAPE = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)


def _save_tiny(folder: Path, model_cls, config_cls, causal: bool, **extra) -> Path:
    """A randomly initialised model of the given architecture, with a tiny tokenizer."""
    import torch

    vocab = _tokenizer(folder, causal=causal)
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=vocab, **SHAPE, **extra)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_tiny(
        tmp_path_factory.mktemp("tiny-llama"),
        LlamaForCausalLM,
        LlamaConfig,
        causal=True,
        num_key_value_heads=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertModel, BertConfig, causal=False)


@pytest.fixture(scope="session")
def news_csv(tmp_path_factory) -> Path:
    """A local CSV dataset: 4 topics, 'sentence' and 'topic' columns, 120 rows."""
    import numpy as np

    folder = tmp_path_factory.mktemp("news")
    topics = {
        "world": "world news",
        "sports": "sports game team",
        "business": "business market",
        "tech": "tech phone",
    }
    rng = np.random.default_rng(0)
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "topic"])
        for i in range(120):
            topic = list(topics)[i % 4]
            filler = " ".join(rng.choice(["the", "a", "is", "it", "good", "bad"], 3))
            w.writerow([f"{filler} {topics[topic]}", topic])
    return folder / "train.csv"
