"""What a Ferret client round costs beside a DeComFL one, on the same batch.

Speed: per model, the median time of a DeComFL client step (P+1 forwards along seeded
directions) and of a Ferret client step (K=1 forward and backward, then the update
projected on R shared directions), measured alternately in one process; the
projection is also timed alone. Memory: peak RSS of a fresh process doing only one
kind of step (Ferret holds gradients and one copy of the trainable weights).

    python benchmarks/ferret_cost.py [--models minilm-l6,smollm2-135m] [--repeats 5]
        [--batch 16] [--tokens 64] [--projections 64] [--perturbations 5]

First, how far the rebuilt update is from the true one on the digits MLP: the mean of
5 clients' one-step SGD changes (lr 0.3) from the initial weights, projected on R
directions and rebuilt, over 20 seeds, against the prediction (d - 1)/R.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from fedscalar.config import TEXT_LORA_LAYERS

CHILD = r"""
import json, resource, sys, time
import torch
from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.ferret import FerretAlgorithm, project
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.config import RunConfig
from fedscalar.messages import TrainRequest
from fedscalar.params import ParamSpace
from fedscalar.tasks import build_task

name, mode, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
batch, tokens, P, R, repeats = map(int, sys.argv[4:9])
torch.set_num_threads(1)
cfg = RunConfig(task="sentiment", model=name, max_length=tokens, lora=True, lora_layers=layers)
task = build_task(cfg)
model = task.build_model(0)
vocab = task.pre.tokenizer.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, min(vocab, 20000), (batch, tokens), generator=g)
data = (task._tokens(ids.tolist()), torch.randint(0, 2, (batch,), generator=g))
client = ClientData(0, lambda r, k: data, task.loss)
space = ParamSpace(model)
decomfl = ZOAlgorithm(ZOSettings(perturbations=P))
ferret = FerretAlgorithm(ZOSettings(perturbations=R), 1)

def zo_step():
    decomfl.measure(ZOState(space, False), client, data, 12345, [])

def ferret_step():
    state = ZOState(space, False)
    ferret.train(state, TrainRequest(1, 1e-3, (12345,)), client)

def projection():
    delta = [p.detach() for p in space.params]
    project(space.params, delta, 12345, R)

out = {"trainable": space.numel}
if mode == "speed":
    zo_step(); ferret_step()
    times = {"decomfl": [], "ferret": [], "projection": []}
    for _ in range(repeats):
        for key, fn in (("decomfl", zo_step), ("ferret", ferret_step), ("projection", projection)):
            s = time.perf_counter(); fn(); times[key].append(time.perf_counter() - s)
    out.update(times)
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (zo_step if mode == "decomfl" else ferret_step)()
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["model_mb"] = base / 1024
print(json.dumps(out))
"""


def child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def reconstruction(counts=(16, 64, 255), seeds=20) -> None:
    import numpy as np
    import torch

    from fedscalar.config import RunConfig
    from fedscalar.federation import client_data, client_partitions
    from fedscalar.params import ParamSpace
    from fedscalar.tasks import build_task

    cfg = RunConfig(task="digits")
    task = build_task(cfg)
    model = task.build_model(0)
    space = ParamSpace(model)
    parts = client_partitions(cfg, task)
    start = space.flat()
    changes = []
    for cid in range(5):
        model.zero_grad()
        task.loss(model, client_data(cfg, task, parts[cid], cid).make_batch(1, 0)).backward()
        changes.append(-0.3 * torch.cat([p.grad.reshape(-1) for p in space.params]))
    mean = torch.stack(changes).mean(0).double()
    space.load_flat_(start)
    sizes = [p.numel() for p in space.params]
    d = space.numel
    print(f"digits MLP, d = {d:,}: rebuilt mean update against the true one, {seeds} seeds")
    print("| R | measured E|rebuilt - true|^2 / |true|^2 | predicted (d - 1)/R |")
    print("|---|---|---|")
    from fedscalar.algorithms.ferret import project
    from fedscalar.directions import rademacher_rows

    for r_count in counts:
        errors = []
        for seed in range(seeds):
            parts_ = list(torch.split(mean, sizes))
            c = torch.from_numpy(project(space.params, parts_, seed, r_count))
            z = torch.cat(
                [
                    rademacher_rows(seed, r_count, i, 0, n, dtype=torch.float64)
                    for i, n in enumerate(sizes)
                ],
                dim=1,
            )
            rebuilt = (c @ z) / r_count
            errors.append(float(((rebuilt - mean) ** 2).sum() / (mean**2).sum()))
        print(f"| {r_count} | {np.mean(errors):.1f} | {(d - 1) / r_count:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--perturbations", type=int, default=5)
    ap.add_argument("--projections", type=int, default=64)
    args = ap.parse_args()
    reconstruction()
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), one torch thread per process")
    print(
        "| model (LoRA, last blocks) | trainable | DeComFL step (s) | Ferret step (s) | of which "
        "projection (s) | Ferret / DeComFL | peak MB DeComFL | peak MB Ferret |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        layers = TEXT_LORA_LAYERS.get(name, 2)
        common = [
            str(layers),
            *map(str, (args.batch, args.tokens, args.perturbations, args.projections)),
        ]
        speed = child(name, "speed", *common, str(args.repeats))
        mem = {m: child(name, m, *common, "1")["peak_mb"] for m in ("decomfl", "ferret")}
        med = {k: statistics.median(speed[k]) for k in ("decomfl", "ferret", "projection")}
        print(
            f"| {name} ({layers}) | {speed['trainable']:,} | {med['decomfl']:.3f} | "
            f"{med['ferret']:.3f} | {med['projection']:.3f} | "
            f"{med['ferret'] / med['decomfl']:.2f}x | {mem['decomfl']:.0f} | {mem['ferret']:.0f} |"
        )


if __name__ == "__main__":
    main()
