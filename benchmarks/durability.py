"""What forcing the ledger and metrics to disk costs per round, side by side.

A run fsyncs ``ledger.bin`` and ``metrics.jsonl`` at every evaluation (with the
checkpoint) and at exit. This times the same digits DeComFL run with fsync and with
fsync replaced by a no-op, alternately in one process, at ``eval_every`` 1 (a sync every
round: the worst case) and 10, and prints the median seconds per round.

    python benchmarks/durability.py [--rounds 200] [--repeats 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedscalar import RunConfig, run


def timed(folder: Path, eval_every: int, rounds: int) -> float:
    start = time.perf_counter()
    run(RunConfig(task="digits", rounds=rounds, eval_every=eval_every, out=str(folder)))
    return (time.perf_counter() - start) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the run folders go (the disk measured)")
    args = ap.parse_args()
    real = os.fsync
    print(f"digits, DeComFL, {args.rounds} rounds, median of {args.repeats}\n")
    print("| eval_every | with fsync | without | difference per round |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for eval_every in (1, 10):
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(args.repeats):
                for sync in (True, False):
                    os.fsync = real if sync else (lambda fd: None)
                    try:
                        folder = Path(tmp) / f"e{eval_every}-{i}-{sync}"
                        times[sync].append(timed(folder, eval_every, args.rounds))
                    finally:
                        os.fsync = real
            with_, without = (statistics.median(times[s]) for s in (True, False))
            print(
                f"| {eval_every} | {with_ * 1e3:.2f} ms | {without * 1e3:.2f} ms "
                f"| {(with_ - without) * 1e3:+.2f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
