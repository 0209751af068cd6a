"""A bounded soak of a Flower deployment: nodes killed and restarted while DeComFL runs.

Starts a SuperLink and N SuperNodes on loopback, runs DeComFL on digits with every client
sampled each round, and every ``--every`` rounds SIGKILLs one SuperNode (in turn) and
starts it again. At the end it checks that nothing was lost: the run completed every
round, the ledger holds every round once, and exporting base + ledger gives the server's
weights bit for bit. It prints the figures for docs/benchmarks.md: rounds with a missing
reply, rounds that waited for a timeout, seconds per round with and without a fault.

    python benchmarks/flower_soak.py --nodes 4 --rounds 200 --every 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir
from fedscalar.runtime.flower.launch import LocalDeployment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--every", type=int, default=20, help="rounds between two node kills")
    ap.add_argument("--timeout", type=float, default=10.0, help="reply_timeout, seconds")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fedscalar-soak-"))
    config = home / "run.toml"
    config.write_text(
        f'task = "digits"\nalgorithm = "decomfl"\nclients = {args.nodes}\n'
        f"sampled = {args.nodes}\nrounds = {args.rounds}\neval_every = {args.rounds}\n"
        f"reply_timeout = {args.timeout}\n"
    )
    out = home / "run"
    kills: list[int] = []
    started = time.monotonic()
    with LocalDeployment(nodes=args.nodes, home=home / "deployment") as dep:
        dep.submit(config, out)
        next_kill = args.every
        while not (out / "summary.json").exists():
            done = dep.rounds_done(out)
            if done >= next_kill and next_kill < args.rounds:
                node = len(kills) % args.nodes
                dep.kill_node(node)
                dep.start_node(node)
                kills.append(done)
                print(f"round {done}: node {node} killed and restarted", flush=True)
                next_kill += args.every
            if time.monotonic() - started > 4 * 3600:
                raise SystemExit("the soak did not finish within 4 hours")
            time.sleep(0.2)
        summary = dep.wait_for(out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    rounds = [u.round for u in Ledger.open(out / "ledger.bin").updates]
    weights, _ = rebuild(out)
    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    exact = all(torch.equal(weights[n], checkpoint[n]) for n in weights)
    short = [m for m in metrics if m["replies"] < args.nodes]
    waited = [m for m in metrics if m["round_seconds"] >= args.timeout]
    calm = [m["round_seconds"] for m in metrics if m["replies"] == args.nodes]
    print(f"status {summary['status']}, {summary['rounds']} rounds, {len(kills)} kills")
    print(f"ledger rounds 1..{args.rounds} each once: {rounds == list(range(1, args.rounds + 1))}")
    print(f"export of base + ledger equals the server's weights bit for bit: {exact}")
    print(f"rounds with a reply missing: {len(short)}; rounds that waited a timeout: {len(waited)}")
    print(
        f"seconds per round: median {statistics.median(calm):.2f} with every reply, "
        f"{statistics.median(m['round_seconds'] for m in short) if short else 0:.2f} with one "
        f"missing; wall {(time.monotonic() - started) / 60:.1f} min"
    )
    ok = summary["status"] == "completed" and exact and rounds == list(range(1, args.rounds + 1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
