"""A tiny synthetic MedMNIST-style dataset for tests and the CPU demo (no downloads).

Class 0 ("band") has a bright horizontal band, class 1 ("square") a bright centred square, both on dark noise:
shapes a segmenter separates from the background, so mask overlays carry the class signal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLASS_NAMES = ("band", "square")


def write_toy_npz(
    path: str | os.PathLike[str], *, counts: tuple[int, int, int] = (12, 6, 6), size: int = 64, seed: int = 0
) -> Path:
    """Write `train/val/test_images` (N, size, size) uint8 and `*_labels` (N, 1), classes alternating."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(("train", "val", "test"), counts):
        images, labels = [], []
        for i in range(count):
            image = (rng.random((size, size)) * 60).astype(np.uint8)
            if i % 2:
                image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 220
            else:
                image[3 * size // 8 : 5 * size // 8, :] = 220
            images.append(image)
            labels.append(i % 2)
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)[:, None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
