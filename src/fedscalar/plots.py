"""Learning curves: test accuracy against rounds and against cumulative bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """One line per run: accuracy vs round (left) and vs total bytes exchanged (right, log)."""
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, history in runs.items():
        evals = [h for h in history if "test_accuracy" in h]
        rounds = [h["round"] for h in evals]
        acc = [h["test_accuracy"] for h in evals]
        traffic = [h["bytes_up_cumulative"] + h["bytes_down_cumulative"] for h in evals]
        ax_r.plot(rounds, acc, marker=".", label=label)
        pos = [(b, a) for b, a in zip(traffic, acc, strict=True) if b > 0]
        if pos:
            ax_b.plot(*zip(*pos, strict=True), marker=".", label=label)
    ax_r.set(xlabel="round", ylabel="test accuracy", title=title)
    ax_b.set(
        xlabel="total bytes exchanged (up + down, all clients)",
        ylabel="test accuracy",
        xscale="log",
        title=title,
    )
    ax_b.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
