"""Turn label strings from folders and CSV files into class indices and class names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.errors import DataError


def encode_labels(
    values: Sequence[str], *, class_names: Sequence[str] | None, source: Path
) -> tuple[np.ndarray, list[str]]:
    """Map label strings to (N,) int64 indices; return them with the class names.

    With ``class_names`` given, each value must be one of the names or an index into them (so a new
    test set keeps the training set's class order). Without: all-integer labels are indices and the
    names are "0".."max"; otherwise the names are the sorted distinct values.
    """
    values = [value.strip() for value in values]
    if class_names is not None:
        names = list(class_names)
        lookup = {name: i for i, name in enumerate(names)}
        lookup.update({str(i): i for i in range(len(names)) if str(i) not in lookup})
        unknown = sorted({value for value in values if value not in lookup})
        if unknown:
            raise DataError(f"{source}: label(s) {unknown[:5]} not among the class names {names}")
        return np.array([lookup[value] for value in values], dtype=np.int64), names
    if values and all(_is_int(value) for value in values):
        indices = np.array([int(value) for value in values], dtype=np.int64)
        if indices.min() < 0:
            raise DataError(f"{source}: integer labels must be >= 0, found {int(indices.min())}")
        return indices, [str(i) for i in range(int(indices.max()) + 1)]
    names = sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[value] for value in values], dtype=np.int64), names


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True
