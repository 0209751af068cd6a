"""What HiSo's curvature vector H learns: does it track the per-weight gradient scale?

HiSo keeps ``H <- beta H + (1 - beta) D^2`` with ``D = (1/P) sum_p g_p z_p / sqrt(H + eps)``
built from P scalars a round. This script answers, for a trained HiSo run, and in a
controlled simulation, how much per-weight information H holds:

1. Trained run: H from a HiSo checkpoint against the true mean squared gradient per
   weight ``E[(df/dx_i)^2]`` (backprop over the run's training minibatches at its final
   weights): spread of H (max/min, coefficient of variation) and the Spearman
   correlation between the two.
2. Simulation: a fixed gradient with a known, very uneven per-weight scale
   (log-normal), the ZO estimate ``D = (1/P) sum_p (g . z_p) z_p`` along Rademacher
   and along Gaussian directions, the EMA run for many rounds (H = 1 at the start, no
   preconditioning, as in the first round of HiSo): how well H correlates with ``g^2``
   as P and the dimension d vary.

    python benchmarks/hiso_curvature.py --run runs/hiso-digits   # a finished HiSo run
    python benchmarks/hiso_curvature.py --simulate-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def simulate(d: int, p: int, rounds: int, beta: float, kind: str, seed: int = 0) -> float:
    """Spearman correlation of the EMA of squared ZO estimates with the true ``g^2``."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(d) * np.exp(rng.standard_normal(d))  # scales spread over e^+-2
    h = np.ones(d)
    for _ in range(rounds):
        noise = 0.5 * rng.standard_normal(d) * np.abs(g)  # minibatch noise, per weight
        grad = g + noise
        if kind == "rademacher":
            z = rng.choice([-1.0, 1.0], size=(p, d))
        else:
            z = rng.standard_normal((p, d))
        scalars = z @ grad  # the P directional derivatives a client measures
        est = scalars @ z / p
        h = beta * h + (1 - beta) * est * est
    return spearman(h, g * g)


def trained(run: Path, batches: int) -> None:

    from fedscalar.config import stored_config
    from fedscalar.federation import client_data, client_partitions
    from fedscalar.rundir import RunDir
    from fedscalar.tasks import build_task

    rd = RunDir(run)
    cfg = stored_config(rd.config).resolved()
    if cfg.algorithm != "hiso":
        raise SystemExit(f"{run} is a {cfg.algorithm} run, not hiso")
    task = build_task(cfg)
    model = task.build_model(cfg.seed)
    tensors, meta = RunDir.load_tensors(rd.checkpoint)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.load_state_dict({n: tensors[n] for n in names}, strict=False)
    h = np.concatenate([tensors[f"curvature::{n}"].numpy().ravel() for n in names])
    parts = client_partitions(cfg, task)
    sq = np.zeros_like(h)
    count = 0
    for b in range(batches):
        cid = b % cfg.clients
        batch = client_data(cfg, task, parts[cid], cid).make_batch(10_000 + b, 0)
        model.zero_grad()
        task.loss(model, batch).backward()
        grad = np.concatenate(
            [p.grad.numpy().ravel() for n, p in model.named_parameters() if p.requires_grad]
        )
        sq += grad * grad
        count += 1
    sq /= count
    print(
        f"{run} after round {meta['round']}: {h.size} weights; H from {h.min():.3g} to "
        f"{h.max():.3g} (max/min {h.max() / h.min():.2f}, coefficient of variation "
        f"{h.std() / h.mean():.3f}); E[grad^2] max/min {sq.max() / max(sq.min(), 1e-30):.3g} "
        f"(coefficient of variation {sq.std() / sq.mean():.2f}); Spearman(H, E[grad^2]) = "
        f"{spearman(h, sq):+.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a HiSo run folder with a checkpoint")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--beta", type=float, default=0.95)
    args = ap.parse_args()
    if args.run and not args.simulate_only:
        trained(args.run, args.batches)
    print(
        f"\nSimulation: Spearman correlation of H (EMA, beta {args.beta}, {args.rounds} "
        "rounds) with the true g^2\n"
    )
    print("| d | P | Rademacher | Gaussian |")
    print("|---|---|---|---|")
    for d in (100, 2_410, 25_450):
        for p in (1, 5, 50):
            rad = simulate(d, p, args.rounds, args.beta, "rademacher")
            gau = simulate(d, p, args.rounds, args.beta, "gaussian")
            print(f"| {d:,} | {p} | {rad:+.3f} | {gau:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
