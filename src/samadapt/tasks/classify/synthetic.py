"""A generated medical-like classification dataset whose class depends on small local lesions (demo, tests).

Fundus-like RGB discs with smooth texture and vessels-like streaks; class 0 has no lesion, class 1 a few small
bright spots (exudate-like), class 2 (when asked for 3 classes) small dark spots (haemorrhage-like). Lesions
cover about 1 % of the image, so a global summary of the image barely shows them: local attention matters.
Written as a MedMNIST-style `.npz` (train/val/test images and (N, 1) labels), read by the standard reader.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from samadapt.utils.atomic import atomic_write_bytes

CLASS_NAMES = ("normal", "bright_lesions", "dark_lesions")


def lesion_image(
    rng: np.random.Generator, *, size: int, label: int, lesion_contrast: float = 0.35
) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = 0.5 + rng.normal(0, 0.03, 2)
    disc = np.clip(1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / 0.22, 0, 1) ** 0.5
    texture = np.zeros((size, size), np.float32)
    for freq in (3, 6, 12):  # smooth random texture: a few random sinusoids per scale
        for _ in range(2):
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            texture += np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase) / freq
    streaks = np.zeros_like(texture)
    for _ in range(3):  # vessel-like dark curves
        a, b, c = rng.uniform(-2, 2), rng.uniform(0, 1), rng.uniform(0.002, 0.006)
        streaks += np.exp(-((yy - (b + a * (xx - 0.5) ** 2)) ** 2) / c)
    base = 0.55 * disc + 0.08 * texture - 0.15 * streaks * disc + rng.normal(0, 0.03, (size, size))
    lesions = np.zeros_like(base)
    if label > 0:
        for _ in range(rng.integers(2, 5)):
            r = rng.uniform(0.025, 0.045)
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.35)
            ly, lx = cy + dist * np.sin(angle), cx + dist * np.cos(angle)
            lesions += np.exp(-((yy - ly) ** 2 + (xx - lx) ** 2) / (r**2))
        lesions = np.clip(lesions, 0, 1) * lesion_contrast * (1 if label == 1 else -1)
    value = np.clip(base + lesions * disc, 0, 1)
    tint = np.array([1.0, 0.55, 0.3], np.float32)  # reddish fundus colour
    rgb = value[..., None] * tint + (lesions[..., None] > 0) * lesions[..., None] * np.array([0.0, 0.6, 0.5])
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def make_lesion_dataset(
    path: str | Path,
    *,
    n_train: int = 300,
    n_val: int = 80,
    n_test: int = 120,
    size: int = 64,
    num_classes: int = 2,
    seed: int = 0,
    lesion_contrast: float = 0.35,
) -> Path:
    """Write the dataset as a MedMNIST-style .npz at `path` (balanced classes) and return the path."""
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        arrays[f"{split}_images"] = np.stack(
            [lesion_image(rng, size=size, label=int(y), lesion_contrast=lesion_contrast) for y in labels]
        )
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
