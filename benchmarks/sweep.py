"""Learning-rate (and model) sweep over seeds: how the default learning rates were chosen.

Every (model, lr) is an ordinary `fedscalar compare` folder under ``--out`` holding one
run per seed, so an interrupted sweep resumes where it stopped and a larger
``--rounds`` extends it. The table gives, per (model, lr), the final and best test
accuracy as mean ± std over seeds, the first evaluated round at which the seeds' mean
reaches ``--target``, the runs that diverged (stopped by a rising test loss or
non-finite values: they count as failures), and seconds per round. The rate picked is
the one with the highest mean final accuracy among those whose seeds all completed.

    python benchmarks/sweep.py --task digits --algorithm decomfl \
        --models linear,mlp16,mlp,mlp64,cnn --lrs 0.01,0.03,0.1 --rounds 1000
    python benchmarks/sweep.py --task sentiment --algorithm decomfl --models smollm2-135m \
        --lrs 3e-3,1e-2,3e-2 --seeds 0,1 --rounds 300 --set lora=true --set lora_layers=10 \
        --out runs/sweep-smollm2 --jobs 2
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedscalar import compare as cmp
from fedscalar.report import mean_std as _mean_std
from fedscalar.rundir import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--algorithm", default="decomfl")
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run option, e.g. --set hiso_eps=1e-4 (repeatable)",
    )
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [(m, lr) for m in args.models.split(",") for lr in args.lrs.split(",")]
    plans = {
        (model, lr): cmp.plan(
            Path(args.out) / model / f"lr{lr}",
            [args.algorithm],
            seeds,
            task=args.task,
            model=model,
            lr=float(lr),
            rounds=args.rounds,
            eval_every=args.eval_every,
            **extra,
        )
        for model, lr in grid
    }
    runs = [(c, seed) for c in plans.values() for seed in seeds]

    def train(item):
        comparison, seed = item
        one = cmp.Comparison(
            comparison.out,
            comparison.algorithms,
            (seed,),
            None,
            {k: v for k, v in comparison.runs.items() if k[1] == seed},
        )
        cmp.execute(one, jobs=1, echo=lambda line: print(f"{comparison.out}: {line}"), threads=1)

    with ThreadPoolExecutor(args.jobs) as pool:  # each run in its own process, one thread
        list(pool.map(train, runs))

    print(
        f"\n{args.task}, {args.algorithm}, {args.rounds} rounds, seeds {args.seeds}, eval every "
        f"{args.eval_every}{', ' + ', '.join(args.set) if args.set else ''}\n"
    )
    print(
        f"| model (params) | lr | final acc | best acc | first round >= {args.target} "
        "| diverged | s/round |"
    )
    print("|---|---|---|---|---|---|---|")
    best = None
    for (model, lr), comparison in plans.items():
        folders = [RunDir(comparison.folder(args.algorithm, s)) for s in seeds]
        summaries = [f.read_summary() or {} for f in folders]
        finals = [s["final_test_accuracy"] for s in summaries if s.get("final_test_accuracy")]
        bests = [s["best_test_accuracy"] for s in summaries if s.get("best_test_accuracy")]
        curves = [[m for m in f.read_metrics() if "test_accuracy" in m] for f in folders]
        rounds = sorted({m["round"] for c in curves for m in c})
        mean_at = {
            r: statistics.mean(m["test_accuracy"] for c in curves for m in c if m["round"] == r)
            for r in rounds
        }
        hit = next((r for r in rounds if mean_at[r] >= args.target), None)
        diverged = sum(s.get("status") == "diverged" for s in summaries)
        params = next((s["num_parameters"] for s in summaries if s), 0)
        per_round = [s["seconds_per_round"] for s in summaries if s.get("seconds_per_round")]
        print(
            f"| {model} ({params:,}) | {lr} | {_mean_std(finals)} | {_mean_std(bests)} "
            f"| {hit if hit is not None else '-'} | {diverged}/{len(seeds)} "
            f"| {statistics.median(per_round) if per_round else float('nan'):.2f} |",
            flush=True,
        )
        done = all(s.get("status") == "completed" for s in summaries)
        if done and finals and (best is None or statistics.mean(finals) > best[0]):
            best = (statistics.mean(finals), model, lr)
    if best:
        print(f"\nbest: {best[1]} lr {best[2]} (mean final accuracy {best[0]:.3f})")


if __name__ == "__main__":
    main()
