"""ROC curves: the positive class for binary tasks, one-vs-rest per class for multi-class tasks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, roc_curve

from samadapt.reports.figures import new_figure, save_figure


def plot_roc(
    path: str | os.PathLike[str],
    *,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    title: str = "ROC",
) -> Path:
    """Plot ROC curves from [N, C] probabilities; classes absent from `y_true` are skipped (curve undefined)."""
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs)
    fig = new_figure(width=5.0, height=4.5)
    ax = fig.add_subplot()
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    for c in classes:
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives.astype(int), probs[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)
