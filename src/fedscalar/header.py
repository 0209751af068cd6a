"""What a ledger header records about a run, and the checks that hold a run folder to it.

The header is the authority on everything that defines the model: ``config.toml`` is a
convenience copy a user can edit, so a resume or an export whose ``config.toml``
disagrees with the header on such a field is refused, naming the field, and
``base.safetensors`` must match the digest the header took of the initial weights.
"""

from __future__ import annotations

from typing import Any

from fedscalar import directions
from fedscalar.arithmetic import ARITHMETIC
from fedscalar.config import RunConfig, read_toml
from fedscalar.ledger import LedgerCorrupted, LedgerError
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir

BASE_COPY_LIMIT = 64 << 20
"""Initial trainable weights up to this size (bytes, as float32) are copied into the run
folder as ``base.safetensors``; larger ones (a full pretrained LLM) are rebuilt from their
source on resume and export, and checked against the digest in the ledger header."""

DEFINING = (
    "algorithm",
    "task",
    "model",
    "seed",
    "local_steps",
    "perturbations",
    "lora",
    "lora_rank",
    "lora_alpha",
    "lora_layers",
    "dtype",
)
"""Config fields recorded in the header (ledgers written before a field was added lack it
and are not checked on it)."""
HISO = {"beta": "hiso_beta", "eps": "hiso_eps", "update": "hiso_curvature_update"}
FERRET = ("projections", "server_lr")


def ledger_header(cfg: RunConfig, space: ParamSpace) -> dict[str, Any]:
    return {
        **{field: getattr(cfg, field) for field in DEFINING},
        "generator": directions.GENERATOR_ID,
        "arithmetic": cfg.arithmetic,
        "parameters": [[n, list(p.shape)] for n, p in zip(space.names, space.params, strict=True)],
        "fingerprint": space.fingerprint(),
        "num_parameters": space.numel,
        "base_digest": space.digest(),
        "hiso": {key: getattr(cfg, field) for key, field in HISO.items()}
        if cfg.algorithm == "hiso"
        else None,
        **({"ferret": {f: getattr(cfg, f) for f in FERRET}} if cfg.algorithm == "ferret" else {}),
        **({"options": cfg.options} if cfg.options else {}),
    }


def check_header(rd: RunDir, cfg: RunConfig, header: dict[str, Any]) -> RunConfig:
    """``cfg`` held to the ledger ``header``: refuses a field that disagrees, adopts the
    arithmetic the ledger was written with (a header without one is ``v1``)."""
    if header.get("generator") != directions.GENERATOR_ID:
        raise LedgerError(f"{rd.ledger} uses direction generator {header.get('generator')}")
    written = header.get("arithmetic", "v1")
    if written not in ARITHMETIC:
        raise LedgerError(
            f"{rd.ledger} uses update arithmetic {written!r}, which this fedscalar does not know "
            f"({', '.join(ARITHMETIC)}); export or resume it with the version that wrote it"
        )
    stated = read_toml(rd.config).get("arithmetic") if rd.config.exists() else None
    recorded = {field: header[field] for field in DEFINING if field in header}
    if header.get("hiso"):
        recorded.update({field: header["hiso"][key] for key, field in HISO.items()})
    if stated is not None:
        recorded["arithmetic"] = written
    if header.get("ferret"):
        recorded.update(header["ferret"])
    recorded["options"] = header.get("options")  # a plug-in's settings; none: absent
    for field, value in recorded.items():
        ours = stated if field == "arithmetic" else getattr(cfg, field)
        if field == "options":
            ours = ours or None
        if ours != value:
            raise LedgerError(
                f"{rd.config} says {field} = {ours!r} but {rd.ledger} was written with "
                f"{value!r}; the ledger decides: restore config.toml (nothing was changed)"
            )
    return cfg.model_copy(update={"arithmetic": written})


def load_base(rd: RunDir, space: ParamSpace, header: dict[str, Any]) -> None:
    """Put the run's initial weights into ``space`` (from the copy, or check the rebuild);
    either must match the header's digest of them."""
    if header["fingerprint"] != space.fingerprint():
        raise LedgerError(f"{rd.ledger} was written for a different model layout")
    if rd.base.exists():
        base, _ = RunDir.load_tensors(rd.base)
        space.load_state_(base)
        if space.digest() != header["base_digest"]:
            raise LedgerCorrupted(
                f"{rd.base} does not match the digest of the initial weights in {rd.ledger}: "
                "the file is corrupted; restore it from a backup (nothing was changed)"
            )
    elif space.digest() != header["base_digest"]:
        raise LedgerError(
            f"the base model rebuilt for {rd.path} differs from the one the run started from "
            "(its weights' digest changed)"
        )
