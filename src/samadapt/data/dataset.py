"""`ImageDataset`: what every reader returns: ids, labels, splits, class names and lazy image access."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.data.splits import SPLITS, fill_splits
from samadapt.errors import ConfigError, DataError


class ImageDataset:
    """A labelled (or unlabelled) list of 2D images; images are decoded only when asked for.

    ``ids`` are stable strings (a path relative to the dataset source, or ``file.npz#train/12``);
    ``labels`` is None, (N,) int64 class indices, or (N, C) int64 0/1 multi-label; ``splits`` holds
    "train" / "val" / "test" / None per example.
    """

    def __init__(
        self,
        *,
        ids: Sequence[str],
        labels: np.ndarray | None,
        splits: Sequence[str | None],
        class_names: Sequence[str],
        source: Path,
        format: str,
        locators: Sequence[Any],
        load: Callable[[Any], np.ndarray],
        paths: Sequence[Path | None] | None = None,
    ) -> None:
        self.ids = list(ids)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.splits = list(splits)
        self.class_names = list(class_names)
        self.source = Path(source)
        self.format = format
        # A locator is whatever `load` needs to decode one image (a Path, or (split, row) for npz).
        self._locators = list(locators)
        self._load = load
        self._paths = list(paths) if paths is not None else [None] * len(self.ids)
        self._validate()

    def _validate(self) -> None:
        n = len(self.ids)
        if not (len(self.splits) == len(self._locators) == len(self._paths) == n):
            raise ValueError("ids, splits, locators and paths must have one entry per example")
        if len(set(self.ids)) != n:
            duplicate = next(key for key, count in Counter(self.ids).items() if count > 1)
            raise DataError(f"{self.source}: example id {duplicate!r} appears more than once")
        bad = sorted({str(s) for s in self.splits if s not in SPLITS and s is not None})
        if bad:
            raise DataError(f"{self.source}: unknown split name(s) {bad}; expected one of {list(SPLITS)}")
        if self.labels is None:
            return
        k = len(self.class_names)
        if len(self.labels) != n:
            raise DataError(f"{self.source}: {len(self.labels)} labels for {n} images")
        if self.labels.ndim == 1:
            if n and (self.labels.min() < 0 or self.labels.max() >= k):
                raise DataError(
                    f"{self.source}: labels must be class indices 0..{k - 1} ({k} classes), "
                    f"found values {self.labels.min()}..{self.labels.max()}"
                )
        elif self.labels.ndim == 2:
            if self.labels.shape[1] != k:
                raise DataError(f"{self.source}: {self.labels.shape[1]} label columns for {k} class names")
            if not np.isin(self.labels, (0, 1)).all():
                raise DataError(f"{self.source}: multi-label labels must be 0/1, found other values")
        else:
            raise DataError(f"{self.source}: labels must be (N,) or (N, C), found shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ImageDataset(format={self.format!r}, source={str(self.source)!r}, n={len(self)})"

    @property
    def multilabel(self) -> bool:
        return self.labels is not None and self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, i: int) -> np.ndarray:
        """Decode example ``i`` as uint8 ``HxW`` or ``HxWx3``."""
        return self._load(self._locators[i])

    def path(self, i: int) -> Path | None:
        """The image file of example ``i``, or None for images stored inside an array file."""
        return self._paths[i]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A dataset of the given examples, in the given order (ids, labels and splits follow)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return self._replace(idx, [self.splits[i] for i in idx])

    def _replace(self, idx: list[int], splits: list[str | None]) -> ImageDataset:
        return ImageDataset(
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            splits=splits,
            class_names=self.class_names,
            source=self.source,
            format=self.format,
            locators=[self._locators[i] for i in idx],
            load=self._load,
            paths=[self._paths[i] for i in idx],
        )

    def split_indices(self, name: str) -> np.ndarray:
        """Sorted indices of the examples in split ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return np.array([i for i, s in enumerate(self.splits) if s == name], dtype=np.int64)

    def ensure_splits(
        self, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
    ) -> ImageDataset:
        """A copy where missing splits are filled by a seeded split stratified by label.

        Existing assignments are kept; see `samadapt.data.splits.fill_splits` for the rule.
        """
        try:
            splits = fill_splits(
                self.splits, self.labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
            )
        except ValueError as error:
            raise DataError(f"{self.source}: cannot fill missing splits: {error}") from error
        return self._replace(list(range(len(self))), splits)

    def summary(self) -> str:
        """Counts per split and class, one line each, for logs and the CLI."""
        lines = [f"{self.format} dataset {self.source}: {len(self)} images, {self.num_classes} classes"]
        for name in (*SPLITS, None):
            idx = [i for i, s in enumerate(self.splits) if s == name]
            if not idx:
                continue
            if self.labels is None:
                counts = ""
            elif self.multilabel:
                counts = ", ".join(
                    f"{c}: {int(v)}" for c, v in zip(self.class_names, self.labels[idx].sum(0))
                )
            else:
                hist = np.bincount(self.labels[idx], minlength=self.num_classes)
                counts = ", ".join(f"{c}: {int(v)}" for c, v in zip(self.class_names, hist))
            lines.append(f"  {name or 'unassigned'}: {len(idx)}" + (f" ({counts})" if counts else ""))
        return "\n".join(lines)
