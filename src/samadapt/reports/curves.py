"""Line plots: training curves (per epoch) and label-efficiency curves (metric vs. fraction of labels)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.reports.figures import new_figure, save_figure


def plot_training_curves(
    path: str | os.PathLike[str],
    *,
    history: Sequence[dict[str, float]],
    best_epoch: int | None = None,
    title: str = "Training curves",
) -> Path:
    """Losses (train_loss, val_loss) on the left, every other `val_*` metric on the right, one line per key.

    `history` is `FitResult.history`: one dict per epoch with "epoch", "train_loss" and "val_<metric>" keys.
    """
    epochs = [row["epoch"] for row in history]
    keys = [k for k in (history[0] if history else {}) if k != "epoch"]
    loss_keys = [k for k in keys if k.endswith("loss")]
    metric_keys = [k for k in keys if not k.endswith("loss")]
    fig = new_figure(width=9.0, height=3.6)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for ax, group, label in ((ax_loss, loss_keys, "loss"), (ax_metric, metric_keys, "metric")):
        for key in group:
            ax.plot(epochs, [row.get(key, math.nan) for row in history], marker=".", label=key)
        if best_epoch is not None and best_epoch >= 0:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1.0, label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if group:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_label_efficiency(
    path: str | os.PathLike[str],
    *,
    rows: Sequence[dict[str, Any]],
    metric: str,
    x: str = "fraction",
    group: str = "method",
    title: str | None = None,
) -> Path:
    """Mean +- std of `metric` against `x` (log scale) for each `group` value, from result rows (e.g. results.csv)."""
    fig = new_figure(width=6.0, height=4.2)
    ax = fig.add_subplot()
    for name in sorted({str(r[group]) for r in rows}):
        points: dict[float, list[float]] = {}
        for r in rows:
            value = _float(r.get(metric))
            if str(r[group]) == name and not math.isnan(value):
                points.setdefault(float(r[x]), []).append(value)
        if not points:
            continue
        xs = sorted(points)
        mean = np.array([np.mean(points[v]) for v in xs])
        std = np.array([np.std(points[v]) for v in xs])
        ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel(f"{x} of training labels")
    ax.set_ylabel(metric)
    ax.set_title(title or f"Label efficiency ({metric})")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, path)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
