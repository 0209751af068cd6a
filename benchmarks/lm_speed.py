"""Seconds per zeroth-order round on `sentiment`, side by side: padded batches (the
previous code path), packed batches, and packed batches with LoRA on the last layers
(whose frozen bottom blocks are computed once per step).

One round = each of ``--clients`` sampled clients measures P+1 forwards on its own real
minibatch of Rotten Tomatoes snippets (DeComFL's client step), then the server applies
the update. The variants run interleaved in one process (round-robin, so they see the
same machine state); the table gives the median over ``--repeats`` rounds of wall time
and of CPU time (the process's, robust to other jobs on the machine).

    python benchmarks/lm_speed.py --models minilm-l6,smollm2-135m --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.config import TEXT_LORA_LAYERS, RunConfig
from fedscalar.messages import GlobalUpdate, TrainRequest
from fedscalar.params import ParamSpace
from fedscalar.tasks import build_task


def variants(model: str) -> list[tuple[str, dict]]:
    n = TEXT_LORA_LAYERS.get(model, 2)
    return [
        ("full, padded", dict(lora=False, pack_tokens=0)),
        ("full, packed", dict(lora=False)),
        ("LoRA all layers, padded", dict(lora=True, lora_layers=None, pack_tokens=0)),
        ("LoRA all layers, packed", dict(lora=True, lora_layers=None)),
        (f"LoRA last {n} layers, packed", dict(lora=True, lora_layers=n)),
    ]


class Setup:
    def __init__(self, model: str, extra: dict, batch: int, perturbations: int):
        cfg = RunConfig(task="sentiment", model=model, max_length=64, batch_size=batch, **extra)
        self.task = build_task(cfg)
        self.state = ZOState(ParamSpace(self.task.build_model(0)), hiso=False)
        self.algo = ZOAlgorithm(ZOSettings(perturbations=perturbations))
        self.batch = batch
        self.rnd = 0

    def round(self, clients: int) -> None:
        """One DeComFL round: each client's step on its own batch, then the update."""
        self.rnd += 1
        seeds = (1000 + self.rnd,)
        replies = []
        for cid in range(clients):
            rng = np.random.default_rng([self.rnd, cid])
            idx = rng.choice(len(self.task.train_ids), self.batch, replace=False)
            data = ClientData(cid, lambda r, k, idx=idx: self.task.batch(idx), self.task.loss)
            request = TrainRequest(self.rnd, 1e-3, seeds)
            replies.append(self.algo.train(self.state, request, data).scalars)
        update = GlobalUpdate(self.rnd, 1e-3, seeds, np.mean(replies, axis=0).astype(np.float32))
        self.algo.apply(self.state, update)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--perturbations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"{args.clients} clients x (P+1={args.perturbations + 1} forwards of {args.batch} "
        f"snippets), torch threads {args.threads}, median of {args.repeats} rounds, load "
        f"average at start {load:.1f}\n"
    )
    print("| model | variant | trainable | s/round (wall) | s/round (CPU) | CPU vs first |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        setups = [
            (name, Setup(model, extra, args.batch, args.perturbations))
            for name, extra in variants(model)
        ]
        for _, s in setups:
            s.round(args.clients)  # warm-up
        wall: dict[str, list[float]] = {name: [] for name, _ in setups}
        cpu: dict[str, list[float]] = {name: [] for name, _ in setups}
        for _ in range(args.repeats):
            for name, s in setups:
                w, c = time.perf_counter(), time.process_time()
                s.round(args.clients)
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
        first = statistics.median(cpu[setups[0][0]])
        for name, s in setups:
            c = statistics.median(cpu[name])
            print(
                f"| {model} | {name} | {s.state.space.numel:,} | "
                f"{statistics.median(wall[name]):.2f} | {c:.2f} | {first / c:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
