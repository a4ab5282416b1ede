"""Seeded, stratified splits: filling missing train/val/test splits, and label-fraction subsets.

Stratification uses each example's class (single-label) or its label combination (multi-label), through
scikit-learn. When a class is too small for a stratified split (fewer than two examples), the split falls
back to a seeded unstratified one and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Folder and CSV spellings users have, mapped to our three names.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def normalize_split(name: str) -> str | None:
    """Map spellings such as "Training" or "valid" to train/val/test; "" -> None; unknown names unchanged."""
    key = name.strip().lower()
    return SPLIT_ALIASES.get(key, key) if key else None


def _strata(labels: np.ndarray | None, indices: np.ndarray) -> np.ndarray | None:
    if labels is None:
        return None
    if labels.ndim == 1:
        return labels[indices]
    # Multi-label: one stratum per distinct label combination.
    return np.array(["".join(map(str, row)) for row in labels[indices].astype(np.int8)])


def carve(
    indices: np.ndarray, labels: np.ndarray | None, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, carved) with ``fraction`` of them carved, stratified by label."""
    indices = np.asarray(indices, dtype=np.int64)
    if fraction <= 0 or len(indices) == 0:
        return np.sort(indices), np.empty(0, dtype=np.int64)
    if len(indices) < 2:
        raise ValueError(f"cannot split {len(indices)} example(s) into two non-empty parts")
    from sklearn.model_selection import train_test_split  # lazy: keeps `import samadapt.data` fast

    strata = _strata(labels, indices)
    try:
        kept, carved = train_test_split(indices, test_size=fraction, random_state=seed, stratify=strata)
    except ValueError as error:
        if strata is None:
            raise
        warnings.warn(
            f"stratified split impossible ({error}); using an unstratified seeded split", stacklevel=2
        )
        kept, carved = train_test_split(indices, test_size=fraction, random_state=seed)
    return np.sort(kept), np.sort(carved)


def fill_splits(
    splits: Sequence[str | None],
    labels: np.ndarray | None,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> list[str | None]:
    """Return ``splits`` with missing ones filled; existing assignments are never changed.

    The pool is the unassigned examples, or the train split when every example is assigned. Each split
    absent from the dataset ("val", "test") is carved from the pool with its fraction *of the pool*;
    the rest of the pool becomes "train". So an ImageFolder with train/ and test/ gets val = 15 % of
    train/, and an unsplit dataset becomes 70/15/15.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must sum below 1")
    out = list(splits)
    present = {name for name in out if name is not None}
    unassigned = np.array([i for i, name in enumerate(out) if name is None], dtype=np.int64)
    pool = (
        unassigned if len(unassigned) else np.array([i for i, n in enumerate(out) if n == "train"], np.int64)
    )
    remaining = 1.0
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if name in present or fraction == 0:
            continue
        # Fractions are of the original pool: rescale for what earlier carvings removed.
        pool, carved = carve(pool, labels, fraction=fraction / remaining, seed=seed)
        remaining -= fraction
        for i in carved:
            out[i] = name
    for i in pool:
        out[i] = "train"
    return out


def label_fraction_indices(
    train_indices: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int
) -> np.ndarray:
    """A seeded subset of ``train_indices`` holding ``fraction`` of each class, at least one per class.

    ``labels`` is the whole dataset's label array (``labels[train_indices]`` are the training labels):
    (N,) class indices or (N, C) multi-label 0/1. Subsets are nested: for one seed, the 5 % subset is
    inside the 10 % subset, so label-efficiency curves compare like with like. Per class,
    ``max(1, round(fraction * n_class))`` examples are kept (multi-label: ``round(fraction * n)`` examples,
    plus the first positive of any class left without one). Returns sorted dataset indices.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1 or len(train_indices) == 0:
        return np.sort(train_indices)
    rng = np.random.default_rng(seed)
    if labels is None or labels.ndim == 2:
        order = train_indices[rng.permutation(len(train_indices))]
        chosen = list(order[: max(1, round(fraction * len(order)))])
        if labels is not None:
            for column in range(labels.shape[1]):
                if not labels[chosen, column].any():
                    positives = order[labels[order, column] > 0]
                    chosen.extend(positives[:1])
        return np.unique(np.asarray(chosen, dtype=np.int64))
    chosen = []
    train_labels = labels[train_indices]
    for cls in np.unique(train_labels):
        members = train_indices[train_labels == cls]
        members = members[rng.permutation(len(members))]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def few_shot_val_indices(
    val_indices: np.ndarray, labels: np.ndarray, *, per_class: int, seed: int
) -> np.ndarray:
    """A seeded, stratified subset of ``val_indices`` with at most ``per_class`` examples of each class.

    The few-shot protocol (CoOp, Tip-Adapter) picks hyper-parameters on a validation set as small as the
    training set: ``per_class = min(K, 4)`` for K training shots per class. ``labels`` is the whole dataset's
    (N,) class array. Classes with fewer examples keep all of theirs; the same arguments give the same subset.
    Returns sorted dataset indices.
    """
    val_indices = np.asarray(val_indices, dtype=np.int64)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if len(val_indices) == 0:
        return val_indices
    rng = np.random.default_rng(seed)
    val_labels = np.asarray(labels)[val_indices]
    chosen = []
    for cls in np.unique(val_labels):
        members = val_indices[val_labels == cls]
        chosen.append(members[rng.permutation(len(members))[:per_class]])
    return np.sort(np.concatenate(chosen))
