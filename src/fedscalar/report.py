"""Tables and plots of a comparison, read back from its run folders.

Everything here is computed from each run's ``metrics.jsonl`` and ``summary.json``, so
a report can be redrawn at any time, also from a comparison still in progress, and from
the few kB of a finished run's record (`write_records`) once its folder is gone.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscalar.compare import Comparison, reconcile, run_folder, state_of
from fedscalar.config import ALGORITHMS
from fedscalar.rundir import RunDir


@dataclass
class Row:
    """One algorithm of a comparison, over its seeds."""

    algorithm: str
    runs: int
    final: list[float]
    best: list[float]
    to_target: list[int | None]
    bytes_up: float  # per client, whole run (mean over seeds)
    bytes_down: float
    up_per_round: float  # per sampled client per round
    down_per_round: float
    seconds_per_round: float  # median over seeds
    peak_mb: float  # largest over seeds
    statuses: list[str]
    curves: list[list[dict[str, Any]]]  # evaluated metrics records, one list per seed
    rounds: list[int]  # rounds done, per seed
    hours: list[float]  # training wall time over all the run's sessions, per seed
    full_initial: list[float]  # accuracy on the whole test split at round 0 (text tasks)
    full_final: list[float]  # ... at the last round, when it was scored there
    seeds: list[int]  # the seeds of the runs above, in order
    pending: dict[int, int]  # seed -> rounds done, of unfinished runs left out of the row

    @property
    def finished(self) -> bool:
        """Whether the row is about finished runs (completed or diverged) only."""
        return set(self.statuses) <= {"completed", "diverged"}


def mean_std(values: list[float]) -> str:
    """``mean ± std`` to three decimals (the value alone for one, ``-`` for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def collect(comparison: Comparison, target: float | None = None) -> tuple[list[Row], float | None]:
    """One `Row` per algorithm with at least one run that has metrics; and the target used.

    A row is about its finished runs only (completed or diverged): an unfinished seed
    would pull the mean towards its early accuracy, so it is left out and listed in
    `Row.pending`. A row none of whose runs has finished shows them all as they stand.

    Without a target, it is 90% of the way from the mean accuracy at round 0 to the
    lowest mean final accuracy among the algorithms that did not diverge, floored to two
    decimals: an accuracy every such algorithm reached on its way, not only at its end.
    """
    raw: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = {}
    seeds: dict[str, list[int]] = {}
    pending: dict[str, dict[int, int]] = {}
    for name in comparison.algorithms:
        found = []
        for seed in comparison.seeds:
            if (name, seed) not in comparison.runs:
                continue
            folder = comparison.folder(name, seed)
            rd = RunDir(folder)
            history = rd.read_metrics()
            if not history:
                continue
            summary = rd.read_summary() or {"status": "running"}
            done = state_of(folder, comparison.runs[name, seed]) == "done"
            if not done and summary["status"] == "completed":  # fewer rounds than asked
                summary = {**summary, "status": "unfinished"}
            found.append((seed, summary, history, done))
        if not found:
            continue
        keep = [f for f in found if f[3]] or found
        raw[name] = [(summary, history) for _, summary, history, _ in keep]
        seeds[name] = [seed for seed, *_ in keep]
        kept = set(seeds[name])
        pending[name] = {seed: h[-1]["round"] for seed, _, h, _ in found if seed not in kept}
    if target is None:
        finals = [
            statistics.mean(s["final_test_accuracy"] for s, _ in runs)
            for runs in raw.values()
            if all(s.get("status") == "completed" for s, _ in runs)
        ]
        starts = [h[0].get("test_accuracy", 0.0) for runs in raw.values() for _, h in runs]
        start = statistics.mean(starts) if starts else 0.0
        target = int((start + 0.9 * (min(finals) - start)) * 100) / 100 if finals else None
    rows = []
    for name, runs in raw.items():
        evals = [[h for h in hist if "test_accuracy" in h] for _, hist in runs]
        clients = max(1, runs[0][0].get("clients", 1))
        rows.append(
            Row(
                algorithm=name,
                runs=len(runs),
                final=[e[-1]["test_accuracy"] for e in evals],
                best=[max(h["test_accuracy"] for h in e) for e in evals],
                to_target=[
                    next((h["round"] for h in e if h["test_accuracy"] >= target), None)
                    if target is not None
                    else None
                    for e in evals
                ],
                bytes_up=statistics.mean(h[-1]["bytes_up_cumulative"] for _, h in runs) / clients,
                bytes_down=statistics.mean(h[-1]["bytes_down_cumulative"] for _, h in runs)
                / clients,
                up_per_round=statistics.mean(
                    s.get("bytes_up_per_client_round", 0.0) for s, _ in runs
                ),
                down_per_round=statistics.mean(
                    s.get("bytes_down_per_client_round", 0.0) for s, _ in runs
                ),
                seconds_per_round=statistics.median(
                    s.get("seconds_per_round", float("nan")) for s, _ in runs
                ),
                peak_mb=max(s.get("peak_rss_mb", float("nan")) for s, _ in runs),
                statuses=[s.get("status", "?") for s, _ in runs],
                curves=evals,
                rounds=[h[-1]["round"] for _, h in runs],
                hours=[h[-1]["wall_seconds"] / 3600 for _, h in runs],
                full_initial=[
                    s["initial_full_test_accuracy"]
                    for s, _ in runs
                    if s.get("initial_full_test_accuracy") is not None
                ],
                full_final=[
                    s["final_full_test_accuracy"]
                    for s, _ in runs
                    if s.get("final_full_test_accuracy") is not None
                ],
                seeds=seeds[name],
                pending=pending[name],
            )
        )
    return rows, target


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _reached(values: list[int | None]) -> str:
    hit = [v for v in values if v is not None]
    if not hit:
        return "not reached"
    med = statistics.median(hit)
    return f"{med:g}" + (f" ({len(hit)}/{len(values)} seeds)" if len(hit) < len(values) else "")


def _status(statuses: list[str]) -> str:
    odd = [s for s in statuses if s != "completed"]
    return "ok" if not odd else ", ".join(sorted(set(odd)))


def _runs_cell(r: Row) -> str:
    """``2 (ok)``, and the unfinished seeds the row leaves out with the rounds they did."""
    cell = f"{r.runs} ({_status(r.statuses)})"
    if r.pending:
        left = ", ".join(f"seed {s} at round {n}" for s, n in sorted(r.pending.items()))
        cell += f"; not counted, unfinished: {left}"
    return cell


HEADER = (
    "algorithm",
    "final acc",
    "best acc",
    "rounds to target",
    "bytes up / client",
    "bytes down / client",
    "B up / B down per client-round",
    "s / round",
    "peak MB",
    "runs",
)


def _span(values: list[float] | list[int], fmt: str) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{format(low, fmt)}-{format(high, fmt)}"


def markdown(rows: list[Row], target: float | None) -> str:
    """The comparison table (mean ± std over seeds; per-client bytes for the whole run).

    When runs scored the whole test split (text tasks evaluated on a subset during
    training), two columns give it at round 0 and at the end; the last two columns say
    how many rounds each figure took and how many hours of training, over every session
    of the run (resumes included)."""
    full = any(r.full_final or r.full_initial for r in rows)
    header = list(HEADER[:3])
    if full:
        header += ["zero-shot acc (whole split)", "final acc (whole split)"]
    header += [*HEADER[3:-1], "rounds", "hours", HEADER[-1]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.algorithm, mean_std(r.final), mean_std(r.best)]
        if full:
            cells += [mean_std(r.full_initial), mean_std(r.full_final)]
        cells += [
            _reached(r.to_target),
            _bytes(r.bytes_up),
            _bytes(r.bytes_down),
            f"{r.up_per_round:,.0f} / {r.down_per_round:,.0f}",
            f"{r.seconds_per_round * 1000:.1f} ms"
            if r.seconds_per_round < 1
            else f"{r.seconds_per_round:.2f} s",
            f"{r.peak_mb:.0f}",
            _span(r.rounds, "d"),
            _span(r.hours, ".2f"),
            _runs_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"Target accuracy: {target:.2f}." if target is not None else "No target accuracy."
    return "\n".join(lines) + f"\n\n{note}\n"


def write_csv(rows: list[Row], path: Path, target: float | None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "algorithm",
                "runs",
                "final_acc_mean",
                "final_acc_std",
                "best_acc_mean",
                "best_acc_std",
                "target",
                "rounds_to_target_median",
                "seeds_reaching_target",
                "bytes_up_per_client",
                "bytes_down_per_client",
                "bytes_up_per_client_round",
                "bytes_down_per_client_round",
                "seconds_per_round",
                "peak_rss_mb",
                "rounds",
                "hours",
                "full_test_accuracy_initial_mean",
                "full_test_accuracy_final_mean",
                "statuses",
                "unfinished_left_out",
            ]
        )
        for r in rows:
            hit = [v for v in r.to_target if v is not None]
            w.writerow(
                [
                    r.algorithm,
                    r.runs,
                    statistics.mean(r.final),
                    statistics.stdev(r.final) if len(r.final) > 1 else 0.0,
                    statistics.mean(r.best),
                    statistics.stdev(r.best) if len(r.best) > 1 else 0.0,
                    target if target is not None else "",
                    statistics.median(hit) if hit else "",
                    len(hit),
                    r.bytes_up,
                    r.bytes_down,
                    r.up_per_round,
                    r.down_per_round,
                    r.seconds_per_round,
                    r.peak_mb,
                    " ".join(map(str, r.rounds)),
                    " ".join(f"{h:.3f}" for h in r.hours),
                    statistics.mean(r.full_initial) if r.full_initial else "",
                    statistics.mean(r.full_final) if r.full_final else "",
                    " ".join(r.statuses),
                    " ".join(f"seed{sd}:{n}" for sd, n in sorted(r.pending.items())),
                ]
            )


def write_report(comparison: Comparison, title: str = "") -> tuple[Path, list[Row], float | None]:
    """``results.md``, ``results.csv``, ``comparison.png`` and ``frontier.png`` in the
    comparison folder."""
    rows, target = collect(comparison, comparison.target)
    out = comparison.out
    table = markdown(rows, target)
    (out / "results.md").write_text(
        f"# {title or 'Comparison'}\n\n{table}\n![accuracy](comparison.png)\n"
        "![accuracy against bytes](frontier.png)\n"
    )
    write_csv(rows, out / "results.csv", target)
    if rows:
        from fedscalar.plots import plot_comparison, plot_frontier

        plot_comparison(
            {r.algorithm + ("" if r.finished else " (unfinished)"): r.curves for r in rows},
            out / "comparison.png",
            title,
        )
        done = [r for r in rows if r.final and r.finished]
        if done:
            plot_frontier(
                {
                    r.algorithm: (
                        r.bytes_up + r.bytes_down,
                        statistics.mean(r.final),
                        statistics.stdev(r.final) if len(r.final) > 1 else 0.0,
                    )
                    for r in done
                },
                out / "frontier.png",
                title,
                reference={r.algorithm for r in done if ALGORITHMS[r.algorithm].pooled},
            )
    return out / "results.md", rows, target


RECORD_DROPS = ("clients", "contributors")
"""Per-round fields a record leaves out (the sampled ids: the seed's sampler redraws them)."""


def write_records(comparison: Comparison, dest: Path) -> int:
    """Keep what the tables and plots need of each finished run, under ``dest`` laid out
    like the comparison's folder: its ``config.toml`` and ``summary.json`` and a thinned
    ``metrics.jsonl`` (round 0, the evaluated rounds and the last one). A few kB per run,
    so the results of hours of training outlive the run folders.

    An unfinished run whose ledger rebuilds its weights (a replayable algorithm) is kept
    as its ``config.toml``, ``metrics.jsonl`` and ``ledger.bin``: tens of bytes per
    round, from which `restore_records` lets it resume on another machine (its initial
    weights are rebuilt from their source and checked against the ledger's digest).
    Returns how many runs were kept."""
    kept = 0
    for (name, seed), cfg in comparison.runs.items():
        rd = RunDir(comparison.folder(name, seed))
        record = RunDir(run_folder(dest, name, seed))
        state = state_of(rd.path, cfg)
        if state == "resume" and cfg.spec.replayable and rd.ledger.exists():
            kept += _write_partial(rd, record)
            continue
        if state != "done":
            continue
        history = rd.read_metrics()
        rows = [h for i, h in enumerate(history) if "test_accuracy" in h or i == len(history) - 1]
        record.path.mkdir(parents=True, exist_ok=True)
        record.ledger.unlink(missing_ok=True)  # what an earlier partial record held
        record.write_atomic(record.config, rd.config.read_text())
        record.write_atomic(record.summary, rd.summary.read_text())
        record.write_atomic(
            record.metrics,
            "".join(
                json.dumps({k: v for k, v in h.items() if k not in RECORD_DROPS}) + "\n"
                for h in rows
            ),
        )
        kept += 1
    return kept


def _write_partial(rd: RunDir, record: RunDir) -> int:
    """Keep an unfinished replayable run as config, metrics and ledger (1), or nothing
    when it has no trained round yet (0). The metrics are read before the ledger, so a
    run that is still training leaves a ledger at least as long as its metrics (a resume
    drops the ledger's extra rounds)."""
    history = rd.read_metrics()
    if not history or history[-1]["round"] < 1:
        return 0
    record.path.mkdir(parents=True, exist_ok=True)
    record.summary.unlink(missing_ok=True)
    record.write_atomic(record.config, rd.config.read_text())
    record.write_atomic(record.metrics, "".join(json.dumps(h) + "\n" for h in history))
    tmp = record.ledger.with_suffix(".tmp")
    shutil.copyfile(rd.ledger, tmp)
    tmp.replace(record.ledger)
    return 1


def restore_records(comparison: Comparison, src: Path, echo=print) -> int:
    """Put the records under ``src`` (`write_records`) in place of the comparison's run
    folders that are missing, when they hold runs of the settings the comparison asks
    for: a finished run is reported as it ended, an unfinished one resumes from its
    ledger. A record of other settings, or a finished one of fewer rounds, is left out,
    so that run trains again. Returns how many were restored."""
    restored = 0
    for (name, seed), cfg in comparison.runs.items():
        record = RunDir(run_folder(src, name, seed))
        target = RunDir(comparison.folder(name, seed))
        if target.exists() or not record.exists():
            continue
        _, clash = reconcile(record, cfg)
        partial = record.ledger.exists() and not record.summary.exists()
        if clash or (state_of(record.path, cfg) != "done" and not partial):
            echo(f"record of {name} seed {seed} left out: " + (clash or "not finished"))
            continue
        target.path.mkdir(parents=True)
        for f in (record.config, record.summary, record.metrics, record.ledger):
            if f.exists():
                shutil.copy(f, target.path / f.name)
        if partial:
            done = record.read_metrics()[-1]["round"]
            echo(f"{name} seed {seed}: resumes from its record at round {done}")
        restored += 1
    return restored


def privacy_table(
    parts: list[tuple[float | None, Comparison]],
) -> tuple[str, dict[str, dict[float | None, Row]]]:
    """A privacy comparison's table: final accuracy (mean ± std over seeds) per algorithm
    and budget, with the noise multiplier each budget was calibrated to; and the rows."""
    rows: dict[str, dict[float | None, Row]] = {}
    for epsilon, comparison in parts:
        for row in collect(comparison, comparison.target)[0]:
            rows.setdefault(row.algorithm, {})[epsilon] = row
    budgets = [e for e, _ in parts]
    header = [
        "algorithm",
        *(f"epsilon {e:g}" if e is not None else "no DP" for e in budgets),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_budget in rows.items():
        cells = [name]
        for epsilon, comparison in parts:
            row = by_budget.get(epsilon)
            if row is None:
                cells.append("-")
                continue
            cell = mean_std(row.final)
            noise = {c.dp_noise_multiplier for (a, _), c in comparison.runs.items() if a == name}
            if epsilon is not None and len(noise) == 1 and None not in noise:
                cell += f" (z {noise.pop():.3g})"
            if set(row.statuses) != {"completed"}:
                cell += f" ({_status(row.statuses)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Final test accuracy, mean ± std over seeds; z: the noise multiplier calibrated to "
        "the budget (noise std = z x 2 x clip on the sum of the clipped replies)."
    )
    return "\n".join(lines) + "\n\n" + note + "\n", rows


def write_privacy_report(
    out: Path, parts: list[tuple[float | None, Comparison]], title: str = ""
) -> tuple[Path, str]:
    """``privacy.md`` and ``privacy.png`` (accuracy against epsilon) in a privacy
    comparison's folder; each budget's own report in its sub-folder."""
    out.mkdir(parents=True, exist_ok=True)
    for _, comparison in parts:
        write_report(comparison, title)
    table, rows = privacy_table(parts)
    (out / "privacy.md").write_text(
        f"# {title or 'Privacy'}: accuracy against the privacy budget\n\n{table}\n"
        "![accuracy against epsilon](privacy.png)\n"
    )
    from fedscalar.plots import plot_privacy

    curves = {
        name: [
            (e, statistics.mean(r.final), statistics.stdev(r.final) if len(r.final) > 1 else 0.0)
            for e, r in by.items()
            if e is not None and r.final
        ]
        for name, by in rows.items()
    }
    plain = {
        name: (statistics.mean(by[None].final), 0.0)
        for name, by in rows.items()
        if None in by and by[None].final
    }
    plot_privacy(curves, plain, out / "privacy.png", title)
    return out / "privacy.md", table
