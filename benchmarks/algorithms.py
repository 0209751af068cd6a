"""Accuracy, time and bytes of decomfl, hiso and fedavg on the built-in tasks.

Every algorithm runs with the same clients, partition, sampling schedule and number of
rounds, at its default learning rate, for each seed; the table reports medians over
seeds. Usage:

    python benchmarks/algorithms.py [--tasks digits,mnist] [--seeds 0,1,2]
        [--rounds digits=1000,mnist=1000] [--algorithms decomfl,hiso,fedavg]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile

import torch

from fedscalar import RunConfig, run


def _median(values):
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="digits,mnist")
    ap.add_argument("--algorithms", default="decomfl,hiso,fedavg")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", default="digits=1000,mnist=1000")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    rounds = {k: int(v) for k, v in (x.split("=") for x in args.rounds.split(","))}
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for algorithm in args.algorithms.split(","):
                runs = []
                for seed in seeds:
                    cfg = RunConfig(
                        algorithm=algorithm,
                        task=task,
                        rounds=rounds[task],
                        seed=seed,
                        eval_every=max(1, rounds[task] // 10),
                        out=f"{tmp}/{task}-{algorithm}-{seed}",
                    )
                    runs.append(run(cfg).summary)
                s0 = runs[0]
                row = {
                    "task": task,
                    "algorithm": algorithm,
                    "model": s0["model"],
                    "parameters": s0["num_parameters"],
                    "rounds": rounds[task],
                    "lr": RunConfig(algorithm=algorithm, task=task).effective_lr,
                    "final_acc": _median(r["final_test_accuracy"] for r in runs),
                    "final_acc_all": [round(r["final_test_accuracy"], 4) for r in runs],
                    "s_per_round": _median(r["seconds_per_round"] for r in runs),
                    "up_per_client_round": _median(r["bytes_up_per_client_round"] for r in runs),
                    "down_per_client_round": _median(
                        r["bytes_down_per_client_round"] for r in runs
                    ),
                    "total_bytes": _median(
                        r["bytes_up_total"] + r["bytes_down_total"] for r in runs
                    ),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}\n"
    )
    print(
        "| task | algorithm | model (params) | lr | rounds | final test acc (median; seeds) "
        "| s/round | B up / B down per client-round | total bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['task']} | {r['algorithm']} | {r['model']} ({r['parameters']}) | {r['lr']:g} "
            f"| {r['rounds']} | {r['final_acc']:.3f} ({', '.join(map(str, r['final_acc_all']))}) "
            f"| {r['s_per_round'] * 1000:.1f} ms | {r['up_per_client_round']:.0f} / "
            f"{r['down_per_client_round']:.0f} | {r['total_bytes'] / 1e3:,.1f} kB |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
