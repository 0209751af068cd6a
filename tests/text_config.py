"""The text-classification run options the tests use with the tiny models of conftest."""

from __future__ import annotations

from typing import Any

from fedscalar import RunConfig


def text_options(model, csv_path, **overrides: Any) -> dict[str, Any]:
    """A 3-client text-classification run on the news CSV: short texts, small batches,
    every weight trained (``lora=True`` to train adapters)."""
    return {
        "task": "text-classification",
        "lora": False,
        "model": str(model),
        "dataset": str(csv_path),
        "text_column": "sentence",
        "label_column": "topic",
        "clients": 3,
        "sampled": 2,
        "eval_examples": 16,
        "batch_size": 4,
        "max_length": 16,
        **overrides,
    }


def text_config(model, csv_path, **overrides: Any) -> RunConfig:
    return RunConfig(**text_options(model, csv_path, **overrides))
