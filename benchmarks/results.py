"""Regenerate docs/results.md: the comparisons on digits, mnist and the language-model
sentiment tasks, and the robustness table, from the comparison files in benchmarks/results/.

    python benchmarks/results.py --out runs/results --jobs 2
    python benchmarks/results.py --out runs/results --only sentiment-smollm2 --report-only

Each comparison is an ordinary ``fedscalar compare`` folder under ``--out``, so an
interrupted regeneration resumes where it stopped (and can be stopped and resumed any
number of times). ``--only`` picks sections; ``--report-only`` tabulates the runs as far
as they got without training more; ``--threads`` gives each run of the comparison
sections that many torch threads (default 1: the seconds per round are one core's).
Each section is kept in docs/results/<name>.md with
its plot, and the page is recomposed from all of them after each section, so sections
not regenerated keep their last tables.

Each finished run also leaves a record of a few kB (config, summary, the evaluated rounds)
in benchmarks/results/records/<name>/, kept with the code: a regeneration puts records in
place of missing run folders, so a section's tables and plots survive the loss of ``--out``
and a comparison of many long runs can be finished over many sessions, on any machine.
An unfinished run of a method whose ledger rebuilds its weights (DeComFL, HiSo, MeZO and
the other seed-and-scalar methods; not FedZO or FedAvg) is kept too, as its config,
metrics and ledger, and resumes from its last round;
``--report-only`` writes these records as far as the runs got.
A record of other settings (say, a changed default) is left out and its run trains again.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
from pathlib import Path

from fedscalar import compare as cmp
from fedscalar.config import ALGORITHMS, read_toml
from fedscalar.report import (
    collect,
    markdown,
    restore_records,
    write_privacy_report,
    write_records,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
SECTIONS = (
    "digits",
    "mnist",
    "robust",
    "privacy",
    "sentiment-minilm",
    "sentiment-minilm-full",
    "sentiment-minilm-lora-all",
    "sentiment-smollm2",
    "sentiment-smollm2-full",
    "sentiment",
)
"""The page's sections in order (``sentiment``: the earlier 200-round MiniLM table)."""
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
READING = SPECS / "reading.md"
RECORDS = SPECS / "records"


def _ratio(rows, a: str, b: str) -> str:
    """``b``'s bytes per client over ``a``'s: over the whole runs, and per client-round."""
    by = {r.algorithm: r for r in rows}
    if a not in by or b not in by:
        return "-"
    run_a, run_b = (by[x].bytes_up + by[x].bytes_down for x in (a, b))
    round_a, round_b = (by[x].up_per_round + by[x].down_per_round for x in (a, b))
    if not run_a or not round_a:
        return "-"
    return f"{_x(run_b / run_a)} over the runs, {_x(round_b / round_a)} per client-round"


def _x(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _finished(rows) -> list:
    """The rows about finished runs (a row none of whose runs finished is left out)."""
    return [r for r in rows if r.finished]


def _training(rows, comparison) -> str:
    """A line naming the unfinished runs (training, or stopped to resume) the table leaves out."""
    left = [
        f"{r.algorithm} seed {sd} (round {n} of {comparison.runs[r.algorithm, sd].rounds})"
        for r in rows
        if not r.finished
        for sd, n in zip(r.seeds, r.rounds, strict=True)
    ]
    return f"Not finished yet, not in the table: {', '.join(left)}.\n\n" if left else ""


def _facts(rows) -> str:
    """Sentences computed from the table, so they never disagree with it (about finished
    runs only: a row still training is marked in the table and left out here)."""
    rows = _finished(rows)
    by = {r.algorithm: r for r in rows}
    out = []
    if "decomfl" in by:
        for ref in ("fedavg", "fedzo", "fedkseed", "ferret", "feedsign"):
            if ref in by:
                out.append(
                    f"- {ref}: DeComFL's bytes per client (up + down) times "
                    f"{_ratio(rows, 'decomfl', ref)}."
                )
        d = statistics.mean(by["decomfl"].final)
        for ref in ("fedavg", "fedzo", "mezo", "hiso", "ferret", "feedsign"):
            if ref in by:
                gap = statistics.mean(by[ref].final) - d
                out.append(f"- {ref} final accuracy minus DeComFL's: {gap:+.3f}.")
    return "\n".join(out)


def _hiso_ratio(rows) -> str:
    """Per seed that both finished: the rounds DeComFL took to first reach its final
    accuracy over the rounds HiSo took to reach it (evaluated rounds only); the median
    and range over seeds."""
    by = {r.algorithm: r for r in rows}
    if "decomfl" not in by or "hiso" not in by:
        return ""
    hiso = dict(zip(by["hiso"].seeds, by["hiso"].curves, strict=True))
    ratios, missed = [], 0
    for seed, dec in zip(by["decomfl"].seeds, by["decomfl"].curves, strict=True):
        if seed not in hiso:
            continue
        goal = dec[-1]["test_accuracy"]
        own = next((h["round"] for h in dec if h["round"] > 0 and h["test_accuracy"] >= goal), 0)
        reach = next(
            (h["round"] for h in hiso[seed] if h["round"] > 0 and h["test_accuracy"] >= goal),
            None,
        )
        if reach is None:
            missed += 1
        else:
            ratios.append(own / reach)
    if not ratios:
        if not missed:
            return ""
        return "- HiSo did not reach DeComFL's final accuracy within the run on any seed."
    text = (
        f"- Rounds to DeComFL's final accuracy (evaluated rounds), DeComFL's first over "
        f"HiSo's: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}x-"
        f"{max(ratios):.2f}x over {len(ratios)} seeds)"
    )
    return text + (f"; HiSo did not reach it on {missed} seed(s)." if missed else ".")


def _lm_facts(rows) -> str:
    """Zero-shot and final accuracy on the whole test split, and the gaps the issue of
    scalar-only fine-tuning is about (DeComFL/HiSo against MeZO, FedZO and FedAvg)."""
    rows = _finished(rows)
    by = {r.algorithm: r for r in rows}
    out = []
    for name in ("decomfl", "hiso"):
        r = by.get(name)
        if r and r.full_initial and r.full_final:
            gain = statistics.mean(r.full_final) - statistics.mean(r.full_initial)
            out.append(
                f"- {name}: whole test split {statistics.mean(r.full_initial):.3f} (zero-shot) "
                f"-> {statistics.mean(r.full_final):.3f}, {gain * 100:+.1f} points."
            )
    for name in ("decomfl", "hiso"):
        for ref in ("mezo", "fedzo", "fedavg"):
            a, b = by.get(name), by.get(ref)
            if a and b and a.full_final and b.full_final:
                gap = statistics.mean(a.full_final) - statistics.mean(b.full_final)
                out.append(f"- {name} minus {ref}, whole test split: {gap * 100:+.1f} points.")
    ratio = _hiso_ratio(rows)
    return "\n".join([*out, ratio] if ratio else out)


def _first(comparison, algorithm: str):
    """The configuration of ``algorithm``'s first run in ``comparison``."""
    return next(c for (n, _), c in comparison.runs.items() if n == algorithm)


def _planned(folder: Path, records: Path, **options) -> cmp.Comparison:
    """The comparison in ``folder``, with the records of its finished runs put back."""
    comparison = cmp.plan(folder, **options)
    if restore_records(comparison, records):
        comparison = cmp.plan(folder, **options)
    return comparison


def section(out: Path, name: str, jobs: int, train: bool = True, threads: int = 1) -> str:
    comparison = _planned(out / name, RECORDS / name, file=SPECS / f"{name}.toml")
    if train:
        cmp.execute(comparison, jobs, echo=print, threads=threads)
    write_records(comparison, RECORDS / name)
    _, rows, target = write_report(comparison, name)
    DOCS.joinpath("results").mkdir(exist_ok=True)
    if (out / name / "comparison.png").exists():
        shutil.copy(out / name / "comparison.png", DOCS / "results" / f"{name}.png")
    if (out / name / "frontier.png").exists():
        shutil.copy(out / name / "frontier.png", DOCS / "results" / f"{name}-frontier.png")
    first = next(iter(comparison.runs.values()))
    setup = (
        f"{first.clients} clients, {first.sampled} sampled per round, {first.partition} "
        f"partition, K={first.local_steps}, P={first.perturbations}, batch "
        f"{first.batch_size}, seeds {', '.join(map(str, comparison.seeds))}; learning "
        "rates: " + ", ".join(f"{a} {_first(comparison, a).lr:g}" for a in comparison.algorithms)
    )
    fewer = [
        f"{a} {', '.join(str(sd) for (n, sd) in comparison.runs if n == a)}"
        for a in comparison.algorithms
        if sum(n == a for n, _ in comparison.runs) < len(comparison.seeds)
    ]
    if fewer:
        setup += "; seeds of " + "; ".join(fewer)
    if first.task in ("sentiment", "text-classification"):
        setup += (
            f"; model {first.model}"
            + (f", LoRA rank {first.lora_rank}" if first.lora else ", all weights")
            + (f" on the last {first.lora_layers} layers" if first.lora_layers else "")
            + f"; evaluated on {first.eval_examples or 'all the'} test examples every "
            f"{first.eval_every} rounds and on the whole test split at round 0 and at the end"
        )
    facts = _facts(rows)
    if first.task in ("sentiment", "text-classification"):
        facts = "\n".join(x for x in (facts, _lm_facts(rows)) if x)
    return (
        f"## {name}\n\n{setup}. Comparison file: `benchmarks/results/{name}.toml`.\n\n"
        f"{markdown(_finished(rows), target)}\n{_training(rows, comparison)}{facts}\n\n"
        f"![{name}](results/{name}.png)\n\n"
        f"Final accuracy against the bytes one client exchanged over the run (the "
        f"frontier joins the methods that no other beats on both):\n\n"
        f"![{name}: accuracy against bytes](results/{name}-frontier.png)\n"
    )


def robustness(out: Path, jobs: int) -> str:
    results: dict[str, dict[str, str]] = {}
    listed = read_toml(SPECS / "robust.toml")["algorithms"]
    settings = [("no attack", "mean", {"attack": "none", "attackers": 0})]
    settings += [(agg, agg, {}) for agg in AGGREGATORS]
    for label, agg, extra in settings:
        folder = out / "robust" / label.replace(" ", "-")
        takes = [a for a in listed if agg in ALGORITHMS[a].aggregators]  # FeedSign: its vote
        records = RECORDS / "robust" / folder.name
        comparison = _planned(
            folder, records, algorithms=takes, file=SPECS / "robust.toml", aggregator=agg, **extra
        )
        cmp.execute(comparison, jobs, echo=print)
        write_records(comparison, records)
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
        "uploaded scalars, for Ferret on its R coefficients, for FedZO and FedAvg on the "
        "weight change; FeedSign's rule is its majority vote of one-bit signs (under `mean`; "
        "the other rules do not apply to it). Comparison file: "
        "`benchmarks/results/robust.toml`.\n\n" + "\n".join(lines) + "\n"
    )


def privacy(out: Path, jobs: int, train: bool = True) -> str:
    """Accuracy against the privacy budget, one table per task (privacy-<task>.toml)."""
    parts = [
        "## Privacy: accuracy against the budget epsilon\n\n"
        "Client-level differential privacy, central mode: the server clips each reply "
        "(DeComFL: its K x P = 5 scalars; FedAvg: its weight change) and adds Gaussian noise "
        "to their sum, calibrated before training so that the run spends at most epsilon "
        "at delta 1e-5 (RDP accounting, sampling without replacement). 100 clients, 10 "
        "sampled per round, DeComFL 1,000 rounds, FedAvg 200; seeds 0, 1, 2. Comparison "
        "files: `benchmarks/results/privacy-<task>.toml`.\n"
    ]
    for task in ("digits", "mnist"):
        name = f"privacy-{task}"
        file = SPECS / f"{name}.toml"
        planned = []
        for epsilon in cmp.parse_budgets(read_toml(file)["dp_epsilon"]):
            folder = cmp.budget_folder(out / name, epsilon)
            options = {"file": file, "private": epsilon is not None}
            if epsilon is not None:
                options["dp_epsilon"] = epsilon
            planned.append((epsilon, _planned(folder, RECORDS / name / folder.name, **options)))
        for epsilon, comparison in planned:
            if train:
                cmp.execute(comparison, jobs, echo=print, threads=1)
            write_records(comparison, RECORDS / name / cmp.budget_folder("", epsilon).name)
        path, table = write_privacy_report(out / name, planned, task)
        shutil.copy(path.with_suffix(".png"), DOCS / "results" / f"{name}.png")
        clips = ", ".join(
            f"{a} {_first(planned[0][1], a).dp_clip:g}" for a in planned[0][1].algorithms
        )
        parts.append(f"### {task}\n\nClip: {clips}.\n\n{table}\n![{name}](results/{name}.png)\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=",".join(s for s in SECTIONS if s != "sentiment"))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per run of a section (default 1)"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="tabulate the runs as they are, train nothing"
    )
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.only.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--only: unknown section {name!r} (choose from {SECTIONS})")
        if name == "robust":
            text = robustness(out, args.jobs)
        elif name == "privacy":
            text = privacy(out, args.jobs, train=not args.report_only)
        else:
            text = section(out, name, args.jobs, not args.report_only, args.threads)
        (DOCS / "results" / f"{name}.md").write_text(text)
        write_page()


def write_page() -> None:
    reading = READING.read_text() if READING.exists() else ""
    parts = [DOCS / "results" / f"{k}.md" for k in SECTIONS]
    body = "\n".join(p.read_text() for p in parts if p.exists())
    (DOCS / "results.md").write_text(
        "# Results: DeComFL and HiSo beside the baselines\n\n"
        "Generated by `python benchmarks/results.py --out runs/results --jobs 2` "
        f"(CPU, {platform.machine()}, 2 cores, two runs at a time, one torch thread each; "
        "timings are comparable within a table only). Every algorithm of a table sees the "
        "same clients, data partition, client sampling sequence and evaluation set "
        "(MeZO: one party holding all the clients' data, with the batch of a whole round). "
        "Accuracy is mean ± std over seeds; bytes are the encoded messages' payload per "
        "client over the whole run (catch-up included); peak MB is the training process's "
        "peak resident memory; rounds and hours are each run's, over all the sessions it "
        "took. Each finished run is kept as a record of a few kB in `benchmarks/results/records/`, "
        "so the tables can be redrawn, and a comparison completed, after its run folders are "
        "gone; an unfinished run of a seed-and-scalar method (DeComFL, HiSo, MeZO...) is kept "
        "as its ledger, tens of bytes per round, and resumes from it on any machine."
        "\n\n" + reading + "\n" + body
    )


if __name__ == "__main__":
    main()
