"""Confusion-matrix plot (counts, with row-normalised shading)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix

from samadapt.reports.figures import new_figure, save_figure


def plot_confusion_matrix(
    path: str | os.PathLike[str],
    *,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    title: str = "Confusion matrix",
) -> Path:
    """Rows are true classes, columns predictions; cells show counts, colour shows the row fraction (recall)."""
    n = len(class_names)
    counts = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=np.arange(n))
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    size = 2.5 + 0.45 * n
    fig = new_figure(width=size + 1.0, height=size)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path)
