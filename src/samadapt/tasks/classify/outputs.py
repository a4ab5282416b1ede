"""What a classification run leaves in RUN: metrics.json, predictions.csv, plots and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from samadapt.reports import (
    plot_confusion_matrix,
    plot_roc,
    plot_training_curves,
    write_html_report,
    write_predictions_csv,
)
from samadapt.utils.atomic import atomic_write_json


def write_run_outputs(
    out: Path,
    *,
    metrics: dict[str, Any],
    class_names: list[str],
    ids: list[str],
    splits: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    history: list[dict[str, float]] | None,
    best_epoch: int | None,
    notes: list[str],
) -> None:
    """Plots and predictions for the val + test examples; metrics.json is written last (the run is complete)."""
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
        figures.append(
            (
                "Training curves",
                plot_training_curves(out / "training_curves.png", history=history, best_epoch=best_epoch),
            )
        )
    summary = {"val": metrics["val"], "test": metrics["test"]}
    summary.update(
        {k: v for k, v in metrics.items() if k not in ("val", "test") and not isinstance(v, dict | list)}
    )
    write_html_report(
        out / "report.html",
        title=f"samadapt classify: {metrics.get('method')} ({metrics.get('backbone', '')})",
        summary=summary,
        figures=figures,
        notes=notes,
    )
    atomic_write_json(out / "metrics.json", metrics)
