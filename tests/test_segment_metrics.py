"""Per-volume Dice and HD95: HD95 is in millimetres at the volume's (anisotropic) spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samadapt.evaluation.segmentation import summarize, volume_scores


def _box(shape, lo, hi, value=1):
    out = np.zeros(shape, np.int64)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return out


@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"), [(0, (1.5, 1.0, 10.0), 3.0), (2, (1.5, 1.0, 10.0), 20.0)]
)
def test_hd95_is_in_millimetres_along_the_shifted_axis(axis, spacing, expected_mm):
    shape = (30, 30, 12)
    label = _box(shape, (10, 10, 3), (20, 20, 8))
    lo, hi = [10, 10, 3], [20, 20, 8]
    lo[axis] += 2
    hi[axis] += 2
    pred = _box(shape, lo, hi)
    dice, hd95 = volume_scores(pred, label, spacing=spacing, num_classes=2)
    assert hd95[0] == pytest.approx(expected_mm, rel=1e-6)
    assert dice[0] == pytest.approx(2 * (np.logical_and(pred, label).sum()) / (pred.sum() + label.sum()))


def test_perfect_missing_and_absent_structures():
    shape = (16, 16, 4)
    label = _box(shape, (2, 2, 0), (8, 8, 4), 1) + _box(shape, (10, 10, 0), (14, 14, 4), 2)
    dice, hd95 = volume_scores(label, label, spacing=(1.0, 1.0, 5.0), num_classes=4)
    assert list(dice[:2]) == [1.0, 1.0] and list(hd95[:2]) == [0.0, 0.0]
    assert dice[2] == 1.0 and math.isnan(hd95[2])  # class 3 absent from both: Dice 1, HD95 undefined
    missed = np.where(label == 2, 0, label)
    dice, hd95 = volume_scores(missed, label, spacing=(1.0, 1.0, 5.0), num_classes=3)
    assert dice[1] == 0.0
    assert hd95[1] == pytest.approx(math.sqrt(16**2 + 16**2 + 20**2))  # the volume diagonal in mm


def test_summarize_means_over_volumes_and_structures():
    rows = [{"dice": np.array([1.0, 0.5]), "hd95": np.array([2.0, np.nan])},
            {"dice": np.array([0.0, 0.5]), "hd95": np.array([4.0, 6.0])}]  # fmt: skip
    out = summarize(rows, ["A", "B"])
    assert out["dice"] == {"A": 0.5, "B": 0.5} and out["dice_mean"] == 0.5
    assert out["hd95"] == {"A": 3.0, "B": 6.0} and out["hd95_mean"] == 4.5
