"""Your own model, data, loss and metric, trained with DeComFL from Python.

    python examples/custom_task.py --rounds 300 --out runs/wine

The data is scikit-learn's wine table (178 wines, 13 measurements, 3 cultivars); the
model a small network defined here. Nothing in fedscalar is edited: the task is
registered under a name, and the run is configured like any other.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_wine
from torch import nn

from fedscalar import RunConfig, run
from fedscalar.registry import register_task
from fedscalar.tasks.custom import TensorTask


def wine_task() -> TensorTask:
    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)  # standardised measurements
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    return TensorTask(
        "wine",
        build_model=lambda: nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3)),
        train=(x[:140], y[:140]),
        test=(x[140:], y[140:]),
        model_name="wine-mlp",
    )


def main(out: str, rounds: int = 300, quiet: bool = False) -> dict:
    register_task(wine_task().spec(help="scikit-learn's wine table"), replace=True)
    cfg = RunConfig(
        task="wine",
        algorithm="decomfl",
        lr=0.05,
        clients=4,
        sampled=2,
        batch_size=16,
        rounds=rounds,
        eval_every=50,
        out=out,
    )

    def report(record: dict) -> None:  # called after every round
        if "test_accuracy" in record and not quiet:
            print(f"round {record['round']}: test accuracy {record['test_accuracy']:.3f}")

    return run(cfg, on_round=report).summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--out", default="runs/wine")
    args = ap.parse_args()
    summary = main(args.out, args.rounds)
    print(f"final test accuracy {summary['final_test_accuracy']:.3f}, {summary['rounds']} rounds")
