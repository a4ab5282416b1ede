"""What a few-shot run leaves in RUN: the classification outputs (metrics.json, predictions.csv, confusion
matrix, ROC, training curves, report.html) plus the mask overlays that explain MedFocusCLIP's input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.reports import (
    new_figure,
    plot_confusion_matrix,
    plot_roc,
    plot_training_curves,
    save_figure,
    write_html_report,
    write_predictions_csv,
)
from samadapt.utils.atomic import atomic_write_json


def plot_overlay_gallery(
    path: Path,
    *,
    panels: list[tuple[np.ndarray, str]],
    focus: list[torch.Tensor | None] | None = None,
    columns: int = 4,
    title: str = "SAM 2 mask overlays (test images)",
) -> Path:
    """A grid of overlay images with captions; for medfocus-attn the patch focus is drawn as a contour."""
    rows = max(1, -(-len(panels) // columns))
    fig = new_figure(width=2.6 * columns, height=2.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(panels):
            continue
        image, caption = panels[k]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        grid = focus[k] if focus else None
        if grid is not None:
            g = int(round(grid.numel() ** 0.5))
            h, w = image.shape[:2]
            side = min(h, w)  # the focus lives on the center crop CLIP sees
            extent = ((w - side) / 2, (w + side) / 2, (h + side) / 2, (h - side) / 2)
            ax.imshow(grid.reshape(g, g).numpy(), cmap="magma", alpha=0.45, extent=extent, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


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
    extra_figures: list[tuple[str, Path]] = (),
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
    figures.extend(extra_figures)
    summary = {"val": metrics["val"], "test": metrics["test"]}
    summary.update(
        {k: v for k, v in metrics.items() if k not in ("val", "test") and not isinstance(v, dict | list)}
    )
    write_html_report(
        out / "report.html",
        title=f"samadapt fewshot: {metrics.get('method')} ({metrics.get('clip')})",
        summary=summary,
        figures=figures,
        notes=notes,
    )
    atomic_write_json(out / "metrics.json", metrics)
