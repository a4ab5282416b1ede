"""predictions.csv: one row per image with the predicted class and every class probability."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.reports.tables import write_csv_rows


def prediction_rows(
    *,
    ids: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    y_true: np.ndarray | None = None,
    split: Sequence[str | None] | None = None,
) -> list[dict[str, object]]:
    """Rows id, [split], [true], predicted, prob_<class>... (probabilities with 6 digits), in that column order."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    rows = []
    for i, image_id in enumerate(ids):
        row: dict[str, object] = {"id": image_id}
        if split is not None:
            row["split"] = split[i] or ""
        if y_true is not None:
            row["true"] = class_names[int(y_true[i])]
        row["predicted"] = class_names[int(pred[i])]
        row.update({f"prob_{name}": f"{probs[i, c]:.6f}" for c, name in enumerate(class_names)})
        rows.append(row)
    return rows


def write_predictions_csv(
    path: str | os.PathLike[str],
    *,
    ids: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    y_true: np.ndarray | None = None,
    split: Sequence[str | None] | None = None,
) -> Path:
    """predictions.csv of `prediction_rows`."""
    rows = prediction_rows(ids=ids, probs=probs, class_names=class_names, y_true=y_true, split=split)
    columns = ["id", *(["split"] if split is not None else []), *(["true"] if y_true is not None else [])]
    columns += ["predicted", *(f"prob_{name}" for name in class_names)]
    return write_csv_rows(path, rows, columns=columns)
