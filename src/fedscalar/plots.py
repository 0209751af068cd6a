"""Learning curves: test accuracy against rounds and against cumulative bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
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
    _finish(fig, ax_r, ax_b, title, "total bytes exchanged (up + down, all clients)", path, 110)


def plot_comparison(
    curves: dict[str, list[list[dict[str, Any]]]], path: Path, title: str = ""
) -> None:
    """Per algorithm, the mean ± std over its seeds' evaluated records: accuracy against
    rounds and against cumulative bytes (log; algorithms that send nothing are left out)."""
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for label, runs in curves.items():
        length = min(len(c) for c in runs)
        acc = np.array([[h["test_accuracy"] for h in c[:length]] for c in runs])
        rounds = [h["round"] for h in runs[0][:length]]
        traffic = np.array(
            [
                [h["bytes_up_cumulative"] + h["bytes_down_cumulative"] for h in c[:length]]
                for c in runs
            ]
        ).mean(axis=0)
        mean, std = acc.mean(axis=0), acc.std(axis=0)
        (line,) = ax_r.plot(rounds, mean, label=label)
        ax_r.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        keep = traffic > 0
        if keep.any():
            ax_b.plot(traffic[keep], mean[keep], color=line.get_color(), label=label)
    _finish(fig, ax_r, ax_b, title, "cumulative bytes, up + down, all clients (log)", path, 72)


def _finish(fig, ax_r, ax_b, title: str, bytes_label: str, path: Path, dpi: int) -> None:
    """Labels, log bytes axis, grids and legends of the two panels; save and close."""
    ax_r.set(xlabel="round", ylabel="test accuracy", title=title)
    ax_b.set(xlabel=bytes_label, ylabel="test accuracy", xscale="log", title=title)
    ax_b.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
