"""The figures every classification-like run (classify, fewshot) shows: confusion matrix and ROC of the test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.reports.confusion import plot_confusion_matrix
from samadapt.reports.roc import plot_roc


def classification_figures(
    out: Path, *, y_true: np.ndarray, probs: np.ndarray, splits: Sequence[str], class_names: Sequence[str]
) -> list[tuple[str, Path]]:
    """confusion_matrix.png and roc.png of the test rows, as (caption, path)."""
    test = np.array([s == "test" for s in splits])
    return [
        ("Confusion matrix (test)", plot_confusion_matrix(
            out / "confusion_matrix.png", y_true=y_true[test], y_pred=probs[test].argmax(1), class_names=class_names,
            title="Confusion matrix (test)")),
        ("ROC (test)", plot_roc(out / "roc.png", y_true=y_true[test], probs=probs[test], class_names=class_names,
                                title="ROC (test)")),
    ]  # fmt: skip
