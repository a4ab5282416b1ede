"""The files every classification-like run (classify, fewshot) leaves in RUN, written the same way for both."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.reports.confusion import plot_confusion_matrix
from samadapt.reports.curves import plot_training_curves
from samadapt.reports.html import write_html_report
from samadapt.reports.predictions import write_predictions_csv
from samadapt.reports.roc import plot_roc
from samadapt.utils.atomic import atomic_write_json


def write_classification_run(
    out: Path,
    *,
    title: str,
    metrics: dict[str, Any],
    class_names: list[str],
    ids: list[str],
    splits: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    history: list[dict[str, float]] | None,
    best_epoch: int | None,
    notes: list[str],
    extra_figures: Sequence[tuple[str, Path]] = (),
) -> None:
    """predictions.csv, confusion matrix, ROC, training curves and report.html; metrics.json last (run complete)."""
    test = np.array([s == "test" for s in splits])
    write_predictions_csv(
        out / "predictions.csv", ids=ids, probs=probs, class_names=class_names, y_true=y_true, split=splits
    )
    figures = [
        ("Confusion matrix (test)", plot_confusion_matrix(
            out / "confusion_matrix.png", y_true=y_true[test], y_pred=probs[test].argmax(1), class_names=class_names,
            title="Confusion matrix (test)")),
        ("ROC (test)", plot_roc(out / "roc.png", y_true=y_true[test], probs=probs[test], class_names=class_names,
                                title="ROC (test)")),
    ]  # fmt: skip
    if history:
        curves = plot_training_curves(out / "training_curves.png", history=history, best_epoch=best_epoch)
        figures.append(("Training curves", curves))
    figures.extend(extra_figures)
    summary = {"val": metrics["val"], "test": metrics["test"]}
    summary.update(
        {k: v for k, v in metrics.items() if k not in ("val", "test") and not isinstance(v, dict | list)}
    )
    write_html_report(out / "report.html", title=title, summary=summary, figures=figures, notes=notes)
    atomic_write_json(out / "metrics.json", metrics)
