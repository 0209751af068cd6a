"""DeComFL, HiSo and first-order FedAvg fine-tuning a language model on `sentiment`.

Runs each algorithm as its own `fedscalar run` (in parallel with ``--jobs``, each on
``--threads`` torch threads) with the same clients, partition, sampling and evaluation
subset, then reports zero-shot and final test accuracy, the first round at which HiSo
reaches DeComFL's final accuracy, bytes per client, and seconds per round.

    python benchmarks/llm_sentiment.py --model minilm-l6 --lora --rounds 600 \
        --lr decomfl=1e-3,hiso=1e-3,fedavg=1e-3 --fedavg-rounds 100 --out runs/llm-minilm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--fedavg-rounds", type=int, default=100)
    ap.add_argument("--lr", default="decomfl=1e-3,hiso=1e-3,fedavg=1e-3")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/llm-sentiment")
    ap.add_argument(
        "--extra",
        default="--clients 8 --sampled 2 --partition dirichlet --alpha 1.0 "
        "--batch-size 16 --max-length 64 --eval-examples 500 --perturbations 5",
    )
    args = ap.parse_args()
    lrs = dict(kv.split("=") for kv in args.lr.split(","))
    out = Path(args.out)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs, pending = [], list(lrs)
    fedscalar = [sys.executable, "-m", "fedscalar", "run", "--quiet"]

    def launch(algo: str) -> subprocess.Popen:
        rounds = args.fedavg_rounds if algo == "fedavg" else args.rounds
        folder = out / algo
        cmd = (
            ["--resume", "--out", str(folder), "--rounds", str(rounds)]
            if (folder / "config.toml").exists()
            else [
                "--task",
                "sentiment",
                "--model",
                args.model,
                "--algorithm",
                algo,
                "--rounds",
                str(rounds),
                "--lr",
                lrs[algo],
                "--eval-every",
                str(args.eval_every),
                "--out",
                str(folder),
                "--lora" if args.lora else "--no-lora",
                *args.extra.split(),
            ]
        )
        print("$ fedscalar run", " ".join(cmd), flush=True)
        return subprocess.Popen(fedscalar + cmd, env=env)

    while pending or procs:
        while pending and len(procs) < args.jobs:
            procs.append(launch(pending.pop(0)))
        procs[0].wait()
        procs = [p for p in procs if p.poll() is None]

    rows = {}
    for algo in lrs:
        metrics = [json.loads(x) for x in (out / algo / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / algo / "summary.json").read_text())
        rows[algo] = (metrics, summary)
    target = rows["decomfl"][1]["final_test_accuracy"] if "decomfl" in rows else None
    print(f"\n{args.model}{' + LoRA' if args.lora else ''}, {args.extra}\n")
    print(
        "| algorithm | lr | rounds | zero-shot acc | final acc | best acc | bytes per client "
        "(up + down, whole run) | s/round |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for algo, (metrics, s) in rows.items():
        clients = 8
        per_client = (s["bytes_up_total"] + s["bytes_down_total"]) / clients
        print(
            f"| {algo} | {lrs[algo]} | {s['rounds']} | {metrics[0]['test_accuracy']:.3f} "
            f"| {s['final_test_accuracy']:.3f} | {s['best_test_accuracy']:.3f} "
            f"| {per_client:,.0f} B | {s['seconds_per_round']:.2f} |"
        )
    if target is not None and "hiso" in rows:
        hit = next(
            (
                m["round"]
                for m in rows["hiso"][0]
                if m["round"] > 0 and m.get("test_accuracy", 0) >= target
            ),
            None,
        )
        print(
            f"\nHiSo first reaches DeComFL's final accuracy ({target:.3f}) at round {hit} "
            f"of {rows['decomfl'][1]['rounds']}"
            + (f": {rows['decomfl'][1]['rounds'] / hit:.2f}x fewer rounds" if hit else "")
        )


if __name__ == "__main__":
    main()
