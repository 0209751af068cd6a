"""What secure aggregation adds to a DeComFL round: bytes and seconds, side by side.

For each number of sampled clients, runs DeComFL on digits with and without
``--secure-aggregation`` in one process, alternating, and prints per client-round the
bytes up and down (from the run's metrics: the encoded messages) and the median seconds
per round over ``--repeats`` runs of each, plus the protocol alone (`secure_sum` on the
same vectors, without training).

    python benchmarks/secagg_cost.py --sampled 3,5,10,20 --rounds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedscalar import RunConfig, run
from fedscalar.privacy.secagg import secure_sum


def _per_round(out: Path) -> tuple[float, float, float]:
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    sampled = len(metrics[0]["clients"])
    up = statistics.mean(m["bytes_up"] for m in metrics) / sampled
    down = statistics.mean(m["bytes_down"] for m in metrics) / sampled
    seconds = statistics.median(m["round_seconds"] for m in metrics)
    return up, down, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sampled", default="3,5,10,20")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        "| sampled | B up / client-round (plain -> secure) | B down (plain -> secure) | "
        "s / round plain | s / round secure | protocol alone, s / round |"
    )
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sampled.split(",")):
        found: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for k in range(args.repeats):
            for secure in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = RunConfig(
                        task="digits",
                        clients=max(n, 10),
                        sampled=n,
                        rounds=args.rounds,
                        eval_every=args.rounds,
                        secure_aggregation=secure,
                        out=str(Path(tmp) / f"r{k}"),
                    )
                    run(cfg, progress=False)
                    found[secure].append(_per_round(Path(cfg.out)))
        vectors = {c: np.random.default_rng(c).normal(size=6) for c in range(n)}
        alone = []
        for rnd in range(args.rounds):
            start = time.perf_counter()
            secure_sum(vectors, rnd)
            alone.append(time.perf_counter() - start)
        plain, secure = found[False], found[True]
        print(
            f"| {n} | {plain[0][0]:,.0f} -> {secure[0][0]:,.0f} | "
            f"{plain[0][1]:,.0f} -> {secure[0][1]:,.0f} | "
            f"{statistics.median(p[2] for p in plain):.4f} | "
            f"{statistics.median(s[2] for s in secure):.4f} | "
            f"{statistics.median(alone):.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
