"""Cost of one zeroth-order client step against plain inference, side by side.

Speed: for each model, the median time of a ZO step with P perturbations and forward
differences (P+1 perturbed/unperturbed forwards, directions regenerated from the seed)
against the median time of P+1 plain forwards on the same batch, measured alternately
in one process. Memory: peak RSS of a fresh process doing only inference, a DeComFL
step, a HiSo step, or a first-order (FedAvg) step on the same batch.

    python benchmarks/zo_step.py [--models minilm-l6,smollm2-135m] [--repeats 5]
        [--batch 16] [--tokens 64] [--perturbations 5]

Also the time every party spends applying one round's global update (K=1, P directions)
with update arithmetic v1 and v2 (fedscalar.arithmetic), for DeComFL and HiSo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.config import RunConfig
from fedscalar.params import ParamSpace
from fedscalar.tasks import build_task

model_name, mode, batch, tokens, P, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
task = build_task(RunConfig(task="sentiment", model=model_name, max_length=tokens, lora=False))
model = task.build_model(0)
vocab = task.pre.tokenizer.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, min(vocab, 20000), (batch, tokens), generator=g)
data = (task._tokens(ids.tolist()), torch.randint(0, 2, (batch,), generator=g))
client = ClientData(0, lambda r, k: data, task.loss)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"params": sum(p.numel() for p in model.parameters())}

def plain():
    with torch.no_grad():
        for _ in range(P + 1):
            task.loss(model, data)

def zo(hiso):
    algo = ZOAlgorithm(ZOSettings(perturbations=P, hiso=hiso))
    state = ZOState(ParamSpace(model), hiso)
    return lambda: algo.measure(state, client, data, 12345, [])

def first_order():
    task.loss(model, data).backward()
    model.zero_grad(set_to_none=True)

if mode == "speed":
    step = zo(False)
    plain(); step()
    t_plain, t_zo = [], []
    for _ in range(repeats):  # alternate so both see the same machine state
        s = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - s)
        s = time.perf_counter(); step(); t_zo.append(time.perf_counter() - s)
    out.update(plain=t_plain, zo=t_zo)
    # applying one round's global update (K=1), as every party does, in each arithmetic
    from fedscalar.arithmetic import apply_
    params = ParamSpace(model).params
    curvature = [torch.ones(p.numel()) for p in params]
    steps = [[(777, p, 0.01 * (p + 1)) for p in range(P)]]
    for version in ("v1", "v2"):
        for hiso in (False, True):
            times = []
            for _ in range(repeats):
                s = time.perf_counter()
                apply_(params, curvature if hiso else None, steps, 1e-7, version=version)
                times.append(time.perf_counter() - s)
            out[f"apply_{version}_{'hiso' if hiso else 'decomfl'}"] = times
else:
    fn = {"inference": plain, "decomfl": zo(False), "hiso": zo(True), "fedavg": first_order}[mode]
    fn()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_rss_mib"] = base_rss / 1024
print(json.dumps(out))
"""


def child(*args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--perturbations", type=int, default=5)
    args = ap.parse_args()
    common = (args.batch, args.tokens, args.perturbations, args.repeats)
    print(
        f"batch {args.batch} x {args.tokens} tokens, P={args.perturbations}, forward "
        f"differences, median of {args.repeats}\n"
    )
    print(
        "| model | params | P+1 plain forwards | ZO step | ratio | peak RSS: inference "
        "| DeComFL step | HiSo step | FedAvg step | ZO/inference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    applied = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        speed = child(model, "speed", *common)
        mem = {
            m: child(model, m, *common)["peak_rss_mib"]
            for m in ("inference", "decomfl", "hiso", "fedavg")
        }
        plain, zo = statistics.median(speed["plain"]), statistics.median(speed["zo"])
        print(
            f"| {model} | {speed['params'] / 1e6:.1f}M | {plain:.3f} s | {zo:.3f} s "
            f"| **{zo / plain:.2f}** | {mem['inference']:.0f} MiB | {mem['decomfl']:.0f} MiB "
            f"| {mem['hiso']:.0f} MiB | {mem['fedavg']:.0f} MiB "
            f"| **{mem['decomfl'] / mem['inference']:.2f}** |",
            flush=True,
        )
        print(
            f"<!-- {model}: {json.dumps(speed)} {json.dumps(mem)} "
            f"({time.perf_counter() - t0:.0f} s) -->",
            flush=True,
        )
        applied.append((model, plain, zo, speed))
    print(
        "\nApplying one global update (K=1), median; the last column is a HiSo client's "
        "round (ZO step + applying the update with v2) over its P+1 plain forwards\n"
    )
    print("| model | DeComFL v1 | DeComFL v2 | HiSo v1 | HiSo v2 | HiSo round / forwards |")
    print("|---|---|---|---|---|---|")
    for model, plain, zo, speed in applied:
        t = {k: statistics.median(v) for k, v in speed.items() if k.startswith("apply_")}
        print(
            f"| {model} | {t['apply_v1_decomfl']:.3f} s | {t['apply_v2_decomfl']:.3f} s "
            f"| {t['apply_v1_hiso']:.3f} s | {t['apply_v2_hiso']:.3f} s "
            f"| **{(zo + t['apply_v2_hiso']) / plain:.2f}** |"
        )


if __name__ == "__main__":
    main()
