"""``fedscalar compare``: several algorithms on the same federation, side by side.

Every run of a comparison shares the task, the data partition, the client sampling
sequence, the evaluation schedule and set, and the robustness setting; only the
algorithm and its own hyperparameters (a ``[algorithm.<name>]`` table) differ. Each
(algorithm, seed) is an ordinary run folder under ``<out>/runs/<algorithm>/seed<k>``,
trained in a fresh process (so its peak memory is its own). Re-running the same
comparison skips finished runs and resumes unfinished ones.

Comparison file (``--config``), every key optional::

    algorithms = ["decomfl", "hiso", "fedavg"]
    seeds = [0, 1, 2]
    target = 0.9             # accuracy for the "rounds to target" column
    [run]                    # options shared by every run (as in `fedscalar run`)
    task = "mnist"
    rounds = 1000
    [algorithm.fedavg]       # options for one algorithm only
    lr = 0.3
    seeds = [0]              # (a subset of the seeds: the algorithm runs on these only)
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscalar.config import (
    ALGORITHM_ONLY,
    ALGORITHMS,
    RESUMABLE_CHANGES,
    ConfigError,
    RunConfig,
    _validated,
    read_toml,
    stored_config,
)
from fedscalar.registry import load_plugins
from fedscalar.rundir import RunDir

SHARED_ONLY = frozenset(
    {
        "task",
        "model",
        "clients",
        "sampled",
        "partition",
        "alpha",
        "batch_size",
        "eval_every",
        "eval_examples",
        "pack_tokens",
        "dataset",
        "text_column",
        "label_column",
        "template",
        "verbalizers",
        "max_length",
        "lora",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "lora_layers",
        "dtype",
        "attack",
        "attackers",
        "attack_scale",
        "seed",
        "out",
        "runtime",
    }
)
"""Options that define the federation and its evaluation: the same for every algorithm."""

CONTINUABLE = frozenset(
    {"rounds", "out", "runtime", "min_replies", "short_round", "round_retries", "reply_timeout"}
)
"""What may differ between a comparison and the runs it finds in its folder: more rounds
extend them; anything else (a learning rate included) would mix two configurations."""

FINISHED = ("completed", "diverged")
"""Run statuses a re-run leaves alone (a diverged run diverges again the same way)."""


@dataclass(frozen=True)
class Comparison:
    """A validated comparison: one `RunConfig` per (algorithm, seed)."""

    out: Path
    algorithms: tuple[str, ...]
    seeds: tuple[int, ...]
    target: float | None
    runs: dict[tuple[str, int], RunConfig]

    def folder(self, algorithm: str, seed: int) -> Path:
        return run_folder(self.out, algorithm, seed)

    @property
    def eval_cache(self) -> Path:
        """Where its runs share round 0's evaluation (`fedscalar.evalcache`)."""
        return self.out / "eval-cache"


def run_folder(out: Path, algorithm: str, seed: int) -> Path:
    return Path(out) / "runs" / algorithm / f"seed{seed}"


def parse_list(text: str, what: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"a,b"`` -> ``[a, b]``, with a clear error for an empty or malformed list."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"{what}: an empty list")
    try:
        return [cast(x) for x in items]
    except ValueError:
        raise ConfigError(f"{what}: not a comma-separated list of integers: {text!r}") from None


def plan(
    out: str | Path,
    algorithms: list[str] | None = None,
    seeds: list[int] | None = None,
    file: str | Path | None = None,
    target: float | None = None,
    private: bool | None = None,
    **shared: Any,
) -> Comparison:
    """Validate a comparison completely (before anything runs); `ConfigError` if not.

    ``shared`` are run options for every algorithm (flags override the file's ``[run]``).
    ``private`` is set by `plan_budgets` for one budget of a privacy comparison (False:
    its no-DP column, every ``dp_*`` option dropped).
    """
    spec: dict[str, Any] = read_toml(file) if file is not None else {}
    unknown = set(spec) - {"algorithms", "seeds", "target", "run", "algorithm", "dp_epsilon"}
    if unknown:
        raise ConfigError(f"config: unknown key '{sorted(unknown)[0]}' in the comparison file")
    algorithms = algorithms or spec.get("algorithms")
    if not algorithms:
        raise ConfigError("algorithms: name the algorithms to compare (--algorithms a,b,...)")
    plugins = shared.get("plugins") or spec.get("run", {}).get("plugins") or []
    try:
        load_plugins(plugins)  # they may register the algorithms named here
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in algorithms:
        if name not in ALGORITHMS:
            raise ConfigError(
                f"algorithms: unknown algorithm '{name}' (choose from {', '.join(ALGORITHMS)})"
            )
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError("algorithms: an algorithm is listed twice")
    file_seeds = spec.get("seeds") or seeds or [0]
    seeds = seeds or file_seeds
    for given in (seeds, file_seeds):
        if len(set(given)) != len(given) or any(not isinstance(s, int) or s < 0 for s in given):
            raise ConfigError(f"seeds: distinct non-negative integers, got {given}")
    target = target if target is not None else spec.get("target")
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"target: an accuracy in (0, 1], got {target}")
    if "dp_epsilon" in spec and private is None:
        raise ConfigError(
            "dp_epsilon: a list of budgets in the comparison file is an axis: compare them "
            "with --dp-epsilon (or plan_budgets)"
        )
    base = dict(spec.get("run", {}))
    base.update({k: v for k, v in shared.items() if v is not None})
    for key in ("algorithm", "seed", "out"):
        if key in base:
            raise ConfigError(f"{key}: set by compare itself (use --algorithms, --seeds, --out)")
    tables = spec.get("algorithm", {})
    listed = spec.get("algorithms") or algorithms  # --algorithms may narrow the file's list
    for name, table in tables.items():
        if name not in listed:
            raise ConfigError(f"algorithm.{name}: a table for an algorithm not compared")
        fixed = sorted(set(table) & SHARED_ONLY)
        if fixed:
            raise ConfigError(
                f"algorithm.{name}: {fixed[0]} must be the same for every algorithm of a "
                "comparison; set it in [run] or as a flag"
            )
    runs: dict[tuple[str, int], RunConfig] = {}
    own_horizon: set[tuple[str, int]] = set()  # runs whose lr_decay_rounds was given
    for name in algorithms:
        table = dict(tables.get(name, {}))
        own_seeds = seeds
        if "seeds" in table:
            own_seeds = table.pop("seeds")
            if not isinstance(own_seeds, list) or not set(own_seeds) <= set(file_seeds):
                raise ConfigError(
                    f"algorithm.{name}: seeds must be a subset of the comparison's seeds "
                    f"{file_seeds}"
                )
            own_seeds = [s for s in own_seeds if s in seeds]  # --seeds may narrow them
        for seed in own_seeds:
            values = {**base, **table, "algorithm": name, "seed": seed}
            if private is False:  # the no-DP column of a privacy comparison
                values = {k: v for k, v in values.items() if not k.startswith("dp_")}
            own = ALGORITHMS[name]
            for field in (*ALGORITHM_ONLY, "perturbations"):  # a shared --projections is
                takes = field in own.defaults or (field == "perturbations" and own.perturbs)
                if field in base and field not in table and not takes:  # for ferret's only
                    del values[field]
            values["out"] = str(run_folder(Path(out), name, seed))
            if values.get("lr_decay_rounds") is not None:
                own_horizon.add((name, seed))
            try:
                runs[name, seed] = _validated(values).resolved()
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
    algorithms = [a for a in algorithms if any(n == a for n, _ in runs)]
    if not algorithms:
        raise ConfigError(f"seeds: no algorithm has a run among the seeds {seeds}")
    comparison = Comparison(Path(out), tuple(algorithms), tuple(seeds), target, runs)
    _check_existing(comparison, own_horizon)
    return comparison


def parse_budgets(values: str | list[Any]) -> list[float | None]:
    """Privacy budgets from ``"1,3,8,none"`` or a TOML list (``"none"``: no DP)."""
    items = parse_list(values, "dp_epsilon") if isinstance(values, str) else list(values)
    budgets: list[float | None] = []
    for item in items:
        if str(item).strip().lower() == "none":
            budgets.append(None)
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"dp_epsilon: {item!r} is not a number or 'none'") from None
        if not 0 < value < float("inf"):
            raise ConfigError(f"dp_epsilon: budgets must be positive and finite, got {item!r}")
        budgets.append(value)
    if not budgets or len(set(budgets)) != len(budgets):
        raise ConfigError(f"dp_epsilon: distinct budgets, got {values!r}")
    return budgets


def budget_folder(out: str | Path, epsilon: float | None) -> Path:
    """Where the comparison of one privacy budget lives."""
    return Path(out) / ("epsilon-none" if epsilon is None else f"epsilon-{epsilon:g}")


def plan_budgets(
    out: str | Path,
    budgets: str | list[Any] | None,
    algorithms: list[str] | None = None,
    seeds: list[int] | None = None,
    file: str | Path | None = None,
    target: float | None = None,
    **shared: Any,
) -> list[tuple[float | None, Comparison]]:
    """A privacy comparison: the same comparison once per budget (``budgets``, or the
    comparison file's top-level ``dp_epsilon`` list), each in `budget_folder`. Every
    budget is validated (and its noise calibrated) before anything runs."""
    if budgets is None and file is not None:
        budgets = read_toml(file).get("dp_epsilon")
    if budgets is None:
        raise ConfigError("dp_epsilon: name the budgets to compare (--dp-epsilon 1,3,8,none)")
    planned = []
    for epsilon in parse_budgets(budgets):
        extra = {} if epsilon is None else {"dp_epsilon": epsilon}
        try:
            comparison = plan(
                budget_folder(out, epsilon),
                algorithms,
                seeds,
                file,
                target,
                private=epsilon is not None,
                **shared,
                **extra,
            )
        except ConfigError as e:
            label = "none" if epsilon is None else f"{epsilon:g}"
            raise ConfigError(f"epsilon {label}: {e}") from None
        planned.append((epsilon, comparison))
    return planned


def _check_existing(comparison: Comparison, own_horizon: set[tuple[str, int]]) -> None:
    """Refuse to reuse a run folder that was started with different settings.

    A run extended by a larger ``rounds`` keeps its learning-rate schedule (the decay
    horizon it started with), unless the comparison names ``lr_decay_rounds``, and every
    run keeps the ``lr_scale`` its divergence back-offs left.
    """
    for (name, seed), cfg in comparison.runs.items():
        rd = RunDir(comparison.folder(name, seed))
        if not rd.exists():
            continue
        cfg, clash = reconcile(rd, cfg, keep_horizon=(name, seed) not in own_horizon)
        comparison.runs[name, seed] = cfg
        if clash:
            raise ConfigError(f"out: {rd.path} was run with {clash}; use another --out")


def reconcile(rd: RunDir, cfg: RunConfig, keep_horizon: bool = True) -> tuple[RunConfig, str]:
    """``cfg`` with what an existing run folder keeps of its own (its arithmetic, its
    divergence back-offs' ``lr_scale`` and, with ``keep_horizon``, its decay horizon);
    and the first setting in which the folder differs from it ("" when none does)."""
    stored = stored_config(rd.config)
    # the arithmetic its ledger was written with, and the run's own divergence back-offs
    stored = stored.model_copy(update={"arithmetic": _written_with(rd, stored)})
    kept = {"lr_scale": stored.lr_scale, "arithmetic": stored.arithmetic}
    if keep_horizon:
        kept["lr_decay_rounds"] = stored.lr_decay_rounds
    cfg = cfg.model_copy(update=kept)
    for field in RunConfig.model_fields:
        if field not in CONTINUABLE and getattr(stored, field) != getattr(cfg, field):
            return cfg, (
                f"{field}={getattr(stored, field)!r}, this comparison asks for "
                f"{getattr(cfg, field)!r}"
            )
    return cfg, ""


def _written_with(rd: RunDir, stored: RunConfig) -> str:
    """The update arithmetic of an existing run: its config's, or for a run whose config
    predates the option, its ledger header's (``v1`` when that says nothing either)."""
    if "arithmetic" in read_toml(rd.config) or not rd.ledger.exists():
        return stored.arithmetic
    from fedscalar.ledger import Ledger

    return Ledger.open(rd.ledger).header.get("arithmetic", "v1")


def state_of(folder: Path, cfg: RunConfig) -> str:
    """``new``, ``done`` or ``resume``: what a (re-)run of the comparison does here."""
    rd = RunDir(folder)
    if not rd.exists() or not rd.metrics.exists():
        return "new"
    summary = rd.read_summary()
    finished = summary is not None and (
        summary["status"] == "diverged"
        or (summary["status"] == "completed" and summary["rounds"] >= cfg.rounds)
    )
    return "done" if finished else "resume"


def _stop_with_parent(parent: int, every: float = 2.0) -> threading.Event:
    """Interrupt this training process (as Ctrl-C would: the run stops cleanly, resumable)
    once the comparison that started it (process ``parent``) dies, so that no orphan keeps
    writing to a run folder that a new comparison will resume. Returns the event set at
    that moment, already set if the comparison died before this process started
    watching. An interrupt that lands in a finaliser is swallowed by Python, so the run
    also checks the event after every round (`_orphan_check`)."""
    import _thread
    import signal
    import time

    orphaned = threading.Event()
    if os.getppid() != parent:
        orphaned.set()
        return orphaned
    # a comparison started in the background (`nohup ... &`) passes SIGINT on ignored, and
    # interrupt_main() does nothing for an ignored signal: restore Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        orphaned.set()
        _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True).start()
    return orphaned


def _orphan_check(orphaned: threading.Event) -> Callable[[dict[str, Any]], None]:
    """An ``on_round`` callback that stops the run once ``orphaned`` is set."""

    def check(_record: dict[str, Any]) -> None:
        if orphaned.is_set():
            raise KeyboardInterrupt

    return check


def _train(
    cfg_toml: str, mode: str, threads: int, parent: int, cache: str | None = None
) -> dict[str, Any]:
    """Worker: one run in a fresh process, started by comparison process ``parent``;
    returns its summary (or the error). Round 0's evaluation is shared through the
    comparison's folder ``cache`` (`fedscalar.evalcache`)."""
    import logging

    import torch

    from fedscalar.api import run
    from fedscalar.config import build_config_text
    from fedscalar.runner import RunFailed

    logging.getLogger("fedscalar").propagate = False
    torch.set_num_threads(threads)
    orphaned = _stop_with_parent(parent)
    if orphaned.is_set():  # the comparison died while this process was starting
        return {"status": "interrupted", "error": "the comparison had stopped"}
    cfg = build_config_text(cfg_toml)
    # the Flower simulation runs its server elsewhere and takes no round callback
    check = None if cfg.runtime == "flower-simulation" else _orphan_check(orphaned)
    folder = Path(cfg.out or ".")
    if mode == "new" and folder.exists():
        shutil.rmtree(folder)  # a start that never wrote its first metrics line
    try:
        if mode == "resume":
            overrides = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k != "runtime"}
            result = run(resume=True, resume_overrides=overrides, on_round=check, eval_cache=cache)
            return result.summary
        return run(cfg, on_round=check, eval_cache=cache).summary
    except RunFailed as e:
        summary = RunDir(folder).read_summary() or {}
        return {**summary, "status": summary.get("status", "failed"), "error": str(e)}
    except KeyboardInterrupt:
        return {"status": "interrupted"}
    except Exception as e:  # reported, and the other runs go on
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}


def execute(
    comparison: Comparison,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
    progress_every: float = 60.0,
    threads: int | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """Train every run that is not finished; return each run's summary.

    Every ``progress_every`` seconds without a finished run, ``echo`` gets the rounds the
    runs in flight have completed. Each run gets ``threads`` torch threads (default: the
    CPU cores shared out between the ``jobs``).
    """
    comparison.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for (name, seed), cfg in comparison.runs.items():
        mode = state_of(comparison.folder(name, seed), cfg)
        if mode == "done":
            echo(f"{name} seed {seed}: finished earlier, skipped")
        else:
            todo.append((name, seed, cfg, mode))
    # seed by seed: the first seed of every algorithm is done first, so a long comparison
    # that is stopped early still holds a complete table for its first seeds
    todo.sort(key=lambda t: (comparison.seeds.index(t[1]), comparison.algorithms.index(t[0])))
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            pending = {}
            for name, seed, cfg, mode in todo:
                future = pool.submit(
                    _train, cfg.to_toml(), mode, threads, os.getpid(), str(comparison.eval_cache)
                )
                pending[future] = (name, seed, mode)
                if mode == "resume":
                    echo(f"{name} seed {seed}: resuming")
            done_count = 0
            try:
                while pending:
                    finished, _ = wait(pending, timeout=progress_every, return_when=FIRST_COMPLETED)
                    if not finished:
                        running = [run for f, run in pending.items() if f.running()]
                        echo("running: " + _progress(comparison, running))
                    for future in finished:
                        name, seed, _ = pending.pop(future)
                        try:
                            summary = future.result()
                        except Exception as e:  # the process died (killed, out of memory)
                            summary = {"status": "error", "error": f"training process: {e!r}"}
                        results[name, seed] = summary
                        done_count += 1
                        echo(f"[{done_count}/{len(todo)}] {name} seed {seed}: {_brief(summary)}")
            except KeyboardInterrupt:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return results


def _progress(comparison: Comparison, runs) -> str:
    """``decomfl seed 0 146/200 (about 4 min left), ...`` for the runs in flight
    (``starting`` before their first round)."""
    parts = []
    for name, seed, _ in runs:
        history = RunDir(comparison.folder(name, seed)).read_metrics()
        total = comparison.runs[name, seed].rounds
        done = f"{history[-1]['round']}/{total}{_left(history, total)}" if history else "starting"
        parts.append(f"{name} seed {seed} {done}")
    return ", ".join(parts) or "starting"


def _left(history: list[dict[str, Any]], total: int) -> str:
    """`` (about 3.4 h left)``: the rounds to go at the median pace of the last 20."""
    recent = [h["round_seconds"] for h in history[-20:] if "round_seconds" in h]
    if not recent:
        return ""
    seconds = (total - history[-1]["round"]) * statistics.median(recent)
    if seconds < 90:
        return f" (about {seconds:.0f} s left)"
    if seconds < 90 * 60:
        return f" (about {seconds / 60:.0f} min left)"
    return f" (about {seconds / 3600:.1f} h left)"


def _brief(summary: dict[str, Any]) -> str:
    status = summary.get("status", "?")
    if summary.get("final_test_accuracy") is None:
        return f"{status}" + (f" ({summary['error']})" if "error" in summary else "")
    return (
        f"{status}, {summary['rounds']} rounds, final accuracy "
        f"{summary['final_test_accuracy']:.4f}, {summary['wall_seconds']:.1f} s"
    )
