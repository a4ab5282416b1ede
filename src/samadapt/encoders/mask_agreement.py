"""Agreement of two automatic mask sets of one image: every reference mask's best IoU among the other set."""

from __future__ import annotations

from typing import Any

import numpy as np


def best_ious(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each of the [K, H, W] `reference` masks, the highest IoU with any of the [L, H, W] `other` masks."""
    if len(reference) == 0:
        return np.zeros(0)
    if len(other) == 0:
        return np.zeros(len(reference))
    a = reference.reshape(len(reference), -1).astype(np.float32)
    b = other.reshape(len(other), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return iou.max(axis=1)


def agreement(reference: np.ndarray, other: np.ndarray, *, iou: float = 0.9) -> dict[str, Any]:
    """Counts, the fraction of reference masks matched at `iou` by the other set, and the worst best-IoU."""
    ious = best_ious(reference, other)
    n_ref, n_other = len(reference), len(other)
    return {
        "reference_masks": n_ref,
        "masks": n_other,
        "count_ratio": (n_other / n_ref) if n_ref else (1.0 if n_other == 0 else float("inf")),
        "matched_fraction": float((ious >= iou).mean()) if n_ref else 1.0,
        "min_best_iou": float(ious.min()) if n_ref else 1.0,
        "iou_bar": iou,
    }


def agrees(stats: dict[str, Any], *, count_tolerance: float = 0.05) -> bool:
    """Every reference mask matched and the counts within `count_tolerance` of each other."""
    return stats["matched_fraction"] == 1.0 and abs(stats["count_ratio"] - 1.0) <= count_tolerance
