"""Learning curves (test accuracy against rounds and against cumulative bytes) and the
accuracy/bytes frontier of a comparison."""

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
        if any(traffic):
            ax_b.plot(traffic, acc, marker=".", label=label)
    start = [h["test_accuracy"] for r in runs.values() for h in r[:1] if "test_accuracy" in h]
    _finish(
        fig, ax_r, ax_b, title, "total bytes exchanged (up + down, all clients)", path, 110, start
    )


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
        if traffic.any():  # MeZO sends nothing: no curve against bytes
            ax_b.plot(traffic, mean, color=line.get_color(), label=label)
    start = [c[0]["test_accuracy"] for runs in curves.values() for c in runs if c]
    _finish(fig, ax_r, ax_b, title, "cumulative bytes, up + down, all clients", path, 72, start)


def plot_frontier(
    points: dict[str, tuple[float, float, float]],
    path: Path,
    title: str = "",
    reference: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Final accuracy (mean ± std over seeds) against the bytes one client sent and
    received over the run, one point per algorithm, with the methods no other beats on
    both (fewer bytes and higher accuracy) joined: the frontier to choose a method from.
    ``reference`` points (centralised MeZO: no federation) are drawn hollow, off the
    frontier."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    order = sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1]))
    frontier, best = [], -1.0
    for k, (label, (traffic, acc, std)) in enumerate(order):
        hollow = label in reference
        ax.errorbar(traffic, acc, yerr=std, fmt="o", capsize=3, mfc="none" if hollow else None)
        text = f"{label} (centralised)" if hollow else label
        offset = (5, 4) if k % 2 == 0 else (5, -10)  # alternate: neighbours stay legible
        ax.annotate(text, (traffic, acc), textcoords="offset points", xytext=offset, fontsize=8)
        if not hollow and acc > best:
            frontier.append((traffic, acc))
            best = acc
    if len(frontier) > 1:
        xs, ys = zip(*frontier, strict=True)
        ax.step(xs, ys, where="post", color="grey", lw=1, ls="--", label="frontier")
        ax.legend(fontsize=8, loc="lower right")
    positive = [t for t, _, _ in points.values() if t > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel="bytes per client over the run, up + down (log; 0 at left)",
        ylabel="final test accuracy",
        title=title,
    )
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _finish(
    fig, ax_r, ax_b, title: str, bytes_label: str, path: Path, dpi: int, start: list[float]
) -> None:
    """Labels, a 0-1 accuracy axis with round 0's accuracy marked, a log bytes axis that
    still shows round 0 (0 bytes: linear below the smallest positive count), grids and
    legends; save and close."""
    ax_r.set(xlabel="round", ylabel="test accuracy", title=title)
    ax_b.set(xlabel=bytes_label + " (log; 0 at left)", ylabel="test accuracy", title=title)
    positive = [x for line in ax_b.get_lines() for x in line.get_xdata() if x > 0]
    if positive:
        ax_b.set_xscale("symlog", linthresh=min(positive), linscale=0.3)
        ax_b.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
    for ax in (ax_r, ax_b):
        ax.set_ylim(0.0, 1.0)
        if start:
            ax.axhline(float(np.mean(start)), color="grey", ls=":", lw=1, label="round 0")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_privacy(
    curves: dict[str, list[tuple[float, float, float]]],
    plain: dict[str, tuple[float, float]],
    path: Path,
    title: str = "",
) -> None:
    """Final accuracy (mean ± std over seeds) against the privacy budget epsilon (log),
    one line per algorithm; its accuracy without DP as a dotted line of the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.4), constrained_layout=True)
    for label in sorted(set(curves) | set(plain)):
        points = sorted(curves.get(label, []))
        color = None
        if points:
            eps, acc, std = zip(*points, strict=True)
            line = ax.errorbar(eps, acc, yerr=std, marker="o", capsize=3, label=label)
            color = line.lines[0].get_color()
        if label in plain:
            mean, _ = plain[label]
            ax.axhline(mean, ls=":", color=color, label=f"{label}, no DP")
    ax.set_xscale("log")
    budgets = sorted({e for points in curves.values() for e, _, _ in points})
    if budgets:
        ax.set_xticks(budgets, [f"{e:g}" for e in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="privacy budget epsilon (log)", ylabel="final test accuracy", title=title)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
