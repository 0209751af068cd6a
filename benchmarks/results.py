"""Regenerate docs/results.md: the comparisons on digits, mnist and sentiment, and the
robustness table, from the comparison files in benchmarks/results/.

    python benchmarks/results.py --out runs/results --jobs 2

Each comparison is an ordinary ``fedscalar compare`` folder under ``--out``, so an
interrupted regeneration resumes where it stopped. ``--only`` picks sections (digits,
mnist, sentiment, robust). The page is rewritten after each section, with the sections
whose runs exist; the plots are copied to docs/results/ (small PNGs).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
from pathlib import Path

from fedscalar import compare as cmp
from fedscalar.report import collect, markdown, write_report

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
TASKS = ("digits", "mnist", "sentiment")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
READING = SPECS / "reading.md"


def _ratio(rows, a: str, b: str) -> str:
    """``b``'s bytes per client over ``a``'s: over the whole runs, and per client-round."""
    by = {r.algorithm: r for r in rows}
    if a not in by or b not in by:
        return "-"
    run_a, run_b = (by[x].bytes_up + by[x].bytes_down for x in (a, b))
    round_a, round_b = (by[x].up_per_round + by[x].down_per_round for x in (a, b))
    if not run_a or not round_a:
        return "-"
    return f"{run_b / run_a:,.0f}x over the runs, {round_b / round_a:,.0f}x per client-round"


def _facts(rows) -> str:
    """Sentences computed from the table, so they never disagree with it."""
    by = {r.algorithm: r for r in rows}
    out = []
    if "decomfl" in by:
        for ref in ("fedavg", "fedzo", "fedkseed"):
            if ref in by:
                out.append(
                    f"- {ref}: DeComFL's bytes per client (up + down) times "
                    f"{_ratio(rows, 'decomfl', ref)}."
                )
        d = statistics.mean(by["decomfl"].final)
        for ref in ("fedavg", "fedzo", "mezo", "hiso"):
            if ref in by:
                gap = statistics.mean(by[ref].final) - d
                out.append(f"- {ref} final accuracy minus DeComFL's: {gap:+.3f}.")
    return "\n".join(out)


def section(out: Path, task: str, jobs: int) -> str:
    comparison = cmp.plan(out / task, file=SPECS / f"{task}.toml")
    cmp.execute(comparison, jobs, echo=print)
    _, rows, target = write_report(comparison, task)
    DOCS.joinpath("results").mkdir(exist_ok=True)
    shutil.copy(out / task / "comparison.png", DOCS / "results" / f"{task}.png")
    first = next(iter(comparison.runs.values()))
    setup = (
        f"{first.clients} clients, {first.sampled} sampled per round, {first.partition} "
        f"partition, K={first.local_steps}, P={first.perturbations}, batch "
        f"{first.batch_size}, seeds {', '.join(map(str, comparison.seeds))}; learning "
        "rates: "
        + ", ".join(
            f"{a} {comparison.runs[a, comparison.seeds[0]].lr:g}" for a in comparison.algorithms
        )
    )
    return (
        f"## {task}\n\n{setup}. Comparison file: `benchmarks/results/{task}.toml`.\n\n"
        f"{markdown(rows, target)}\n{_facts(rows)}\n\n![{task}](results/{task}.png)\n"
    )


def robustness(out: Path, jobs: int) -> str:
    results: dict[str, dict[str, str]] = {}
    settings = [("no attack", "mean", {"attack": "none", "attackers": 0})]
    settings += [(agg, agg, {}) for agg in AGGREGATORS]
    for label, agg, extra in settings:
        folder = out / "robust" / label.replace(" ", "-")
        comparison = cmp.plan(folder, file=SPECS / "robust.toml", aggregator=agg, **extra)
        cmp.execute(comparison, jobs, echo=print)
        rows, _ = collect(comparison)
        for r in rows:
            results.setdefault(r.algorithm, {})[label] = f"{statistics.mean(r.final):.3f}" + (
                "" if set(r.statuses) == {"completed"} else f" ({', '.join(set(r.statuses))})"
            )
    labels = [s[0] for s in settings]
    lines = ["| algorithm | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for algo, cells in results.items():
        lines.append(f"| {algo} | " + " | ".join(cells.get(x, "-") for x in labels) + " |")
    return (
        "## Robustness: 20% sign-flip attackers on digits\n\n"
        "2 of 10 clients (fixed ids) send their values times -10; 5 clients per round, 600 "
        "rounds, seed 0. Final test accuracy per server aggregator (`no attack`: the same "
        "runs without attackers, mean). For DeComFL and HiSo the aggregator acts on the K x P "
        "uploaded scalars, for FedZO and FedAvg on the weight change. Comparison file: "
        "`benchmarks/results/robust.toml`.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="digits,mnist,robust,sentiment")
    args = ap.parse_args()
    out = Path(args.out)
    wanted = args.only.split(",")
    parts: dict[str, str] = {}
    order = [t for t in (*TASKS[:2], "robust", TASKS[2]) if t in wanted]
    for name in order:
        parts[name] = (
            robustness(out, args.jobs) if name == "robust" else section(out, name, args.jobs)
        )
        write_page(parts)


def write_page(parts: dict[str, str]) -> None:
    reading = READING.read_text() if READING.exists() else ""
    body = "\n".join(parts[k] for k in ("digits", "mnist", "sentiment", "robust") if k in parts)
    (DOCS / "results.md").write_text(
        "# Results: DeComFL and HiSo beside the baselines\n\n"
        "Generated by `python benchmarks/results.py --out runs/results --jobs 2` "
        f"(CPU, {platform.machine()}, 2 cores, two runs at a time, one torch thread each; "
        "timings are comparable within a table only). Every algorithm of a table sees the "
        "same clients, data partition, client sampling sequence and evaluation set "
        "(MeZO: one party holding all the clients' data, with the batch of a whole round). "
        "Accuracy is mean ± std over seeds; bytes are the encoded messages' payload per "
        "client over the whole run (catch-up included); peak MB is the training process's "
        "peak resident memory.\n\n" + reading + "\n" + body
    )


if __name__ == "__main__":
    main()
