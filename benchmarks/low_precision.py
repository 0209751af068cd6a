"""Can the P+1 forwards of a ZO step run in bfloat16 or float16 (autocast) on the CPU?

Faster forwards would be welcome (bfloat16 matmuls are about 2.5x faster than float32
on CPUs with AMX), but a ZO scalar is a difference of two losses a step ``mu`` apart.
This script measures, on one real minibatch of `sentiment`, the P directional
derivatives in float32 and under autocast, their correlation and relative error, and
the time of the P+1 forwards, for full fine-tuning and for LoRA.

    python benchmarks/low_precision.py --model smollm2-135m --perturbations 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedscalar.config import RunConfig
from fedscalar.params import ParamSpace
from fedscalar.tasks import build_task


def scalars(task, model, space, batch, mu: float, p: int, dtype) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=bool(dtype)):
        f0 = float(task.loss(model, batch))
        g = []
        for k in range(p):
            with space.perturbed([(123, k, mu)]):
                g.append((float(task.loss(model, batch)) - f0) / mu)
    return np.array(g), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--perturbations", type=int, default=8)
    ap.add_argument("--mu", default="1e-3,1e-2")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(
        f"{args.model}, one batch of {args.batch} snippets, {args.perturbations} directions; "
        "correlation and relative error of the autocast scalars against float32\n"
    )
    print("| weights trained | mu | autocast | correlation | relative error | s (P+1 forwards) |")
    print("|---|---|---|---|---|---|")
    for lora in (False, True):
        cfg = RunConfig(task="sentiment", model=args.model, lora=lora, lora_layers=None)
        task = build_task(cfg)
        model = task.build_model(0)
        space = ParamSpace(model)
        rng = np.random.default_rng(0)
        batch = task.batch(rng.choice(len(task.train_ids), args.batch, replace=False))
        for mu in (float(x) for x in args.mu.split(",")):
            ref, t_ref = scalars(task, model, space, batch, mu, args.perturbations, None)
            what = f"LoRA ({space.numel:,})" if lora else f"all ({space.numel:,})"
            print(f"| {what} | {mu:g} | float32 | 1 | 0 | {t_ref:.1f} |", flush=True)
            for dtype in (torch.bfloat16, torch.float16):
                low, t_low = scalars(task, model, space, batch, mu, args.perturbations, dtype)
                corr = np.corrcoef(ref, low)[0, 1] if low.std() > 0 else float("nan")
                err = np.linalg.norm(ref - low) / np.linalg.norm(ref)
                name = str(dtype).removeprefix("torch.")
                print(
                    f"| {what} | {mu:g} | {name} | {corr:.2f} | {err:.2f} | {t_low:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
