"""Per-volume segmentation metrics: Dice and HD95 (mm, at the volume's voxel spacing) per structure, via MONAI.

Conventions (stated because papers differ):
- Dice per structure over the whole volume. A structure absent from both prediction and ground truth scores 1,
  present in only one of them 0 (MONAI ``ignore_empty=False``): false positives are penalised.
- HD95: the symmetric 95th-percentile Hausdorff distance in millimetres (MONAI, with ``spacing``). When the
  structure is absent from both it is undefined (NaN, left out of means); when it is absent from exactly one of
  them it is set to the volume's diagonal in mm, the largest distance possible, so a missed structure is not
  silently dropped from the mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0).unsqueeze(0).to(torch.uint8)


def volume_scores(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    spacing: Sequence[float],
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) of one volume, per foreground class 1..num_classes-1: two float arrays [C-1]."""
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    p, y = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, y)[0].numpy()
    sp = [float(s) for s in spacing][: pred.ndim]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, sp)))
    hd95 = np.full(num_classes - 1, np.nan, dtype=np.float64)
    for c in range(1, num_classes):
        has_p, has_y = bool(p[0, c].any()), bool(y[0, c].any())
        if not has_p and not has_y:
            continue
        if has_p != has_y:
            hd95[c - 1] = diagonal
            continue
        with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
            warnings.simplefilter("ignore", FutureWarning)
            d = compute_hausdorff_distance(
                p[:, c : c + 1], y[:, c : c + 1], include_background=True, percentile=95, spacing=sp
            )
        hd95[c - 1] = float(d.reshape(-1)[0])
    return dice.astype(np.float64), hd95


def summarize(per_volume: list[dict], label_names: Sequence[str]) -> dict:
    """Mean over volumes per structure and over structures: the ``metrics.json`` block for one split."""
    dice = np.array([v["dice"] for v in per_volume], dtype=np.float64).reshape(
        len(per_volume), len(label_names)
    )
    hd = np.array([v["hd95"] for v in per_volume], dtype=np.float64).reshape(
        len(per_volume), len(label_names)
    )
    dice_by = {n: _nanmean(dice[:, i]) for i, n in enumerate(label_names)}
    hd_by = {n: _nanmean(hd[:, i]) for i, n in enumerate(label_names)}
    return {
        "dice": dice_by,
        "dice_mean": _nanmean(np.array(list(dice_by.values()), dtype=np.float64)),  # None -> nan
        "hd95": hd_by,
        "hd95_mean": _nanmean(np.array(list(hd_by.values()), dtype=np.float64)),
        "num_volumes": len(per_volume),
    }


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
