"""Seconds a fresh process needs to import what one training process imports, side by
side with the imports the IID partition used to add (flwr-datasets and HF datasets, now
imported only for a Dirichlet partition). Every training process of a comparison and
every Flower ClientApp process pays this before its first round.

    python benchmarks/startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "runner (now)": "import fedscalar.runner",
    "runner + flwr_datasets, datasets (before)": (
        "import fedscalar.runner, datasets, flwr_datasets.partitioner"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved: both see the same machine state
        for name, code in VARIANTS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["runner (now)"])
    print(f"| imports | median s (of {args.repeats}) | ratio |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
