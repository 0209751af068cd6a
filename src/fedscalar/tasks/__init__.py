"""Built-in tasks, by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedscalar.config import DEFAULT_MODEL
from fedscalar.tasks.base import Task
from fedscalar.tasks.models import MODEL_NAMES

if TYPE_CHECKING:
    from fedscalar.config import RunConfig


def build_task(cfg: RunConfig) -> Task:
    """The task ``cfg.task`` with ``cfg.model`` (or the task's default model).

    Raises ValueError (or `hf.MissingPackage`) with a one-line, user-facing message.
    """
    model = cfg.model or DEFAULT_MODEL[cfg.task]
    if cfg.task in ("digits", "mnist"):
        from fedscalar.tasks import vision

        if model not in MODEL_NAMES:
            raise ValueError(
                f"model: unknown model {model!r} for task {cfg.task}; choose from {MODEL_NAMES}"
            )
        return {"digits": vision.digits, "mnist": vision.mnist}[cfg.task](model)
    from fedscalar.tasks import text, text_data

    settings = text.TextSettings(
        model=model,
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
