"""Built-in tasks, by name."""

from __future__ import annotations

from fedscalar.tasks.base import Task
from fedscalar.tasks.models import MODEL_NAMES

DEFAULT_MODEL = {"digits": "mlp", "mnist": "mlp"}


def build_task(name: str, model: str | None = None) -> Task:
    """The task ``name`` with ``model`` (or the task's default model)."""
    from fedscalar.tasks import vision

    model = model or DEFAULT_MODEL[name]
    if model not in MODEL_NAMES:
        raise ValueError(
            f"model: unknown model {model!r} for task {name}; choose from {MODEL_NAMES}"
        )
    return {"digits": vision.digits, "mnist": vision.mnist}[name](model)


__all__ = ["Task", "build_task"]
