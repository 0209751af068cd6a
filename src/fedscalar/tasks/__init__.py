"""Built-in tasks, by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedscalar import registry
from fedscalar.tasks.base import Task
from fedscalar.tasks.models import MODEL_NAMES

if TYPE_CHECKING:
    from fedscalar.config import RunConfig


def build_task(cfg: RunConfig) -> Task:
    """The task ``cfg.task`` (built-in or registered) with ``cfg.model``.

    Raises ValueError (or `hf.MissingPackage`) with a one-line, user-facing message.
    """
    return registry.task(cfg.task).build(cfg)


def build_vision_task(cfg: RunConfig) -> Task:
    """digits or mnist with one of the small image models."""
    from fedscalar.tasks import vision

    model = cfg.model or registry.task(cfg.task).default_model
    if model not in MODEL_NAMES:
        raise ValueError(
            f"model: unknown model {model!r} for task {cfg.task}; choose from {MODEL_NAMES}"
        )
    return {"digits": vision.digits, "mnist": vision.mnist}[cfg.task](model)


def build_text_task(cfg: RunConfig) -> Task:
    """sentiment or text-classification with a language model."""
    from fedscalar.tasks import text, text_data

    settings = text.TextSettings(
        model=cfg.model or registry.task(cfg.task).default_model,
        max_length=cfg.max_length,
        template=cfg.template,
        verbalizers=cfg.verbalizers,
        lora=cfg.lora,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_targets=cfg.lora_targets,
        lora_layers=cfg.lora_layers,
        dtype=cfg.dtype,
        eval_examples=cfg.eval_examples,
        pack_tokens=cfg.pack_tokens,
    )
    if cfg.task == "sentiment":
        data = text_data.load_sentiment()
    else:
        assert cfg.dataset is not None
        data = text_data.load_dataset_columns(cfg.dataset, cfg.text_column, cfg.label_column)
    return text.TextTask(cfg.task, data, settings)


__all__ = ["Task", "build_task"]
