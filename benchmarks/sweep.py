"""Learning-rate and model sweep: how the default model and learning rates were chosen.

For every (model, lr, seed) it trains one run and reports final and best test accuracy,
the first evaluated round reaching ``--target`` accuracy, and seconds per round.
Usage:

    python benchmarks/sweep.py --task digits --algorithm decomfl \
        --models linear,mlp16,mlp,mlp64,cnn --lrs 0.01,0.03,0.1,0.3 --rounds 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedscalar import RunConfig, run
from fedscalar.runner import RunFailed


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
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run option, e.g. --set hiso_eps=1e-4 (repeatable)",
    )
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    print(
        f"{args.task}, {args.algorithm}, {args.rounds} rounds, eval every {args.eval_every}"
        f"{', ' + ', '.join(args.set) if args.set else ''}\n"
    )
    print(
        f"| model (params) | lr | seed | final acc | best acc | first round >= {args.target} "
        "| ms/round |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = Path(tmp) / f"{model}-{lr}-{seed}"
                    cfg = RunConfig(
                        task=args.task,
                        algorithm=args.algorithm,
                        model=model,
                        lr=lr,
                        seed=seed,
                        rounds=args.rounds,
                        eval_every=args.eval_every,
                        out=str(out),
                        **extra,
                    )
                    try:
                        s = run(cfg).summary
                    except RunFailed:
                        print(f"| {model} | {lr:g} | {seed} | diverged | | | |", flush=True)
                        continue
                    evals = [
                        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                    ]
                    hit = next(
                        (m["round"] for m in evals if m.get("test_accuracy", 0) >= args.target),
                        None,
                    )
                    print(
                        f"| {model} ({s['num_parameters']}) | {lr:g} | {seed} "
                        f"| {s['final_test_accuracy']:.3f} | {s['best_test_accuracy']:.3f} "
                        f"| {hit if hit is not None else '-'} "
                        f"| {s['seconds_per_round'] * 1000:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
