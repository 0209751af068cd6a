"""The front door: `run` configures a run (new, or resumed from its folder) and hands it
to the runtime it names: the in-process simulator (`runner.execute`) or Flower's
simulation engine, which drives the same loop from its ServerApp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedscalar.config import RESUMABLE_CHANGES, ConfigError, RunConfig, stored_config
from fedscalar.evalcache import EvalCache
from fedscalar.rundir import RunDir
from fedscalar.runner import RoundCallback, RunResult, default_out, execute
from fedscalar.runtime.base import RuntimeFactory


def _resume_config(rd: RunDir, overrides: dict[str, Any]) -> RunConfig:
    if not rd.exists():
        raise ConfigError(f"out: no run to resume in {rd.path} (config.toml missing)")
    stored = stored_config(rd.config)
    changed = {
        k for k, v in overrides.items() if v is not None and getattr(stored, k) != v
    } - RESUMABLE_CHANGES
    if changed:
        raise ConfigError(
            f"{sorted(changed)[0]}: cannot change on --resume (only {sorted(RESUMABLE_CHANGES)})"
        )
    return stored_config(rd.config, **overrides)


def run(
    cfg: RunConfig | None = None,
    *,
    resume: bool = False,
    resume_overrides: dict[str, Any] | None = None,
    progress: bool = False,
    runtime: RuntimeFactory | None = None,
    from_round: int | None = None,
    on_round: RoundCallback | None = None,
    eval_cache: str | Path | None = None,
) -> RunResult:
    """Run (or resume) training as configured and return the summary.

    With ``resume=True``, ``resume_overrides["out"]`` names the run folder and the other
    overrides may change only the fields in `RESUMABLE_CHANGES`; ``from_round`` first
    rolls the run back to that round (its later rounds are discarded). ``runtime``
    replaces the runtime ``cfg.runtime`` names (the Flower ServerApp passes its own).
    ``on_round(record)`` gets each round's metrics record (as written to
    ``metrics.jsonl``) once the round is recorded; raising KeyboardInterrupt in it stops
    the run as Ctrl-C does (summary written, resumable), any other exception propagates
    (the rounds recorded so far stay, and ``resume`` continues from them).
    ``eval_cache`` names a folder where round 0's evaluation is kept and reused by runs
    that start from the same model on the same test data (`fedscalar.evalcache`;
    ``compare`` gives its runs one).
    """
    if from_round is not None and not resume:
        raise ConfigError("from_round: only with --resume (it rolls a run back)")
    if resume:
        overrides = dict(resume_overrides or {})
        if overrides.get("out") is None:
            raise ConfigError("out: --resume needs --out naming the run folder")
        rd = RunDir(overrides["out"])
        cfg = _resume_config(rd, overrides)
    else:
        cfg = cfg or RunConfig()
        rd = RunDir(cfg.out or default_out(cfg))
        if rd.exists():
            raise ConfigError(f"out: {rd.path} already holds a run; use --resume or another --out")
        cfg = cfg.model_copy(update={"out": str(rd.path)})
    cfg = cfg.resolved()
    if runtime is None and cfg.runtime == "flower-simulation":
        try:
            from fedscalar.runtime.flower.simulation import simulate
        except ImportError as e:
            raise ConfigError(
                f"runtime: flower-simulation needs Flower ({e.name} is missing): "
                "pip install 'fedscalar[flower-sim]'"
            ) from None
        if from_round is not None:
            raise ConfigError("from_round: roll the run back with --runtime local first")
        if on_round is not None:
            raise ConfigError("on_round: the Flower simulation runs the server elsewhere")
        return simulate(cfg, resume=resume, progress=progress)
    if runtime is None and cfg.runtime == "flower":
        raise ConfigError(
            "runtime: a Flower deployment is started with `flwr run` of the fedscalar "
            "Flower app (docs/deployment.md); fedscalar run takes local or flower-simulation"
        )
    return execute(
        cfg,
        resume=resume,
        progress=progress,
        runtime=runtime,
        from_round=from_round,
        on_round=on_round,
        eval_cache=EvalCache(eval_cache) if eval_cache is not None else None,
    )
