"""Peak memory of the local simulator does not grow with the number of clients.

Runs the same training (digits, IID, 5 sampled clients per round) with 10 and with
1,000 clients, each in a fresh process, and reports that process's peak RSS (median of
``--repeats`` runs) and the ratio. Usage:

    python benchmarks/memory_clients.py [--rounds 200] [--repeats 3] [--algorithm decomfl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys
from fedscalar import RunConfig, run
cfg = RunConfig(**json.loads(sys.argv[1]))
s = run(cfg).summary
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "accuracy": s["final_test_accuracy"], "bytes_down_total": s["bytes_down_total"]}))
"""


def measure(algorithm: str, clients: int, rounds: int, out: str) -> dict:
    cfg = dict(
        algorithm=algorithm,
        task="digits",
        clients=clients,
        sampled=5,
        rounds=rounds,
        partition="iid",
        eval_every=rounds,
        out=out,
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--algorithm", default="decomfl")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (10, 1000):
            runs = [
                measure(args.algorithm, clients, args.rounds, f"{tmp}/{clients}-{i}")
                for i in range(args.repeats)
            ]
            rows[clients] = {
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                "all_peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in runs],
                "bytes_down_total": runs[0]["bytes_down_total"],
            }
    ratio = rows[1000]["peak_rss_mib"] / rows[10]["peak_rss_mib"]
    print(f"| clients | peak RSS (MiB, median of {args.repeats}) | runs | bytes down (total) |")
    print("|---|---|---|---|")
    for clients, r in rows.items():
        print(
            f"| {clients} | {r['peak_rss_mib']:.1f} | {r['all_peak_rss_mib']} | "
            f"{r['bytes_down_total']} |"
        )
    print(f"\nratio 1000/10 clients: {ratio:.3f} ({args.algorithm}, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
