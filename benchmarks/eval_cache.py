"""Seconds from a run's start to the end of its round 1 (model loading, the zero-shot
evaluation on the subset and the whole test split, one round), without the evaluation cache and
with it filled by an earlier run of another seed, side by side: what each run of a
language-model comparison after the first one saves.

    python benchmarks/eval_cache.py --model minilm-l6 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedscalar import RunConfig, run
from fedscalar.runner import RunFailed


def _stop(record: dict) -> None:
    raise KeyboardInterrupt  # after round 1: the run stops as Ctrl-C stops it


def seconds_to_round_1(model: str, seed: int, out: Path, cache: Path | None) -> float:
    """A LoRA DeComFL run on `sentiment` stopped after round 1 (not evaluated): loading,
    round 0 evaluated, one round trained."""
    cfg = RunConfig(task="sentiment", model=model, seed=seed, rounds=2, eval_every=2, out=str(out))
    start = time.perf_counter()
    with contextlib.suppress(RunFailed):  # the stop after round 1
        run(cfg, eval_cache=cache, on_round=_stop)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"no cache": [], "cache filled by seed 0": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.repeats):  # interleaved: both see the same machine state
            cache = root / f"cache{r}"
            times["no cache"].append(seconds_to_round_1(args.model, 0, root / f"a{r}", None))
            seconds_to_round_1(args.model, 0, root / f"b{r}", cache)  # fills the cache
            times["cache filled by seed 0"].append(
                seconds_to_round_1(args.model, 1, root / f"c{r}", cache)
            )
    base = statistics.median(times["no cache"])
    print(f"{args.model}, {args.threads} thread(s)")
    print(f"| start to round 1 | median s (of {args.repeats}) | ratio |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
