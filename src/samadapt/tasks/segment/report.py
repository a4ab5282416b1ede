"""Segmentation figures: image / ground truth / prediction overlays of a few slices."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.data.volumes import Volume, to_uint8
from samadapt.reports.figures import new_figure, save_figure

COLOURS = (
    (0.9, 0.2, 0.2),
    (0.2, 0.8, 0.2),
    (0.2, 0.4, 1.0),
    (1.0, 0.8, 0.1),
    (0.8, 0.2, 0.9),
    (0.1, 0.9, 0.9),
)


def colour_labels(image_u8: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """RGB float image with each label value painted semi-transparently over the grey image."""
    rgb = np.repeat(image_u8[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    for value in range(1, int(labels.max()) + 1):
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.array(COLOURS[(value - 1) % len(COLOURS)])
    return rgb


def pick_slices(label: np.ndarray | None, prediction: np.ndarray, count: int) -> list[int]:
    """Slices with the most labelled voxels, spread over the stack."""
    ref = label if label is not None else prediction
    area = (ref > 0).reshape(-1, ref.shape[2]).sum(0)
    candidates = [z for z in np.argsort(-area) if area[z] > 0] or list(range(ref.shape[2]))
    return sorted(candidates[:count])


def plot_overlays(
    path: str | os.PathLike[str],
    *,
    volumes: Sequence[Volume],
    predictions: Sequence[np.ndarray],
    case_ids: Sequence[str],
    label_names: Sequence[str],
    max_volumes: int = 3,
    slices_per_volume: int = 1,
) -> Path:
    rows = []
    for volume, pred, cid in list(zip(volumes, predictions, case_ids))[:max_volumes]:
        u8 = to_uint8(volume.image)
        for z in pick_slices(volume.label, pred, slices_per_volume):
            rows.append(
                (cid, z, u8[:, :, z], None if volume.label is None else volume.label[:, :, z], pred[:, :, z])
            )
    ncols = 3
    fig = new_figure(width=3.0 * ncols, height=3.0 * max(1, len(rows)))
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), ncols))
    for r, (cid, z, img, lab, pred) in enumerate(rows):
        panels = (("image", np.repeat(img[..., None], 3, -1) / 255.0),
                  ("ground truth", colour_labels(img, lab) if lab is not None else None),
                  ("prediction", colour_labels(img, pred)))  # fmt: skip
        for c, (title, rgb) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if rgb is not None:
                ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower")  # NIfTI axis 0 is x: show x across
            ax.set_title(f"{cid} z={z}: {title}" if c == 0 else title, fontsize=8)
    legend = ", ".join(f"{name}={'rgb'[i] if i < 3 else i}" for i, name in enumerate(label_names))
    fig.suptitle(f"overlays ({legend})", fontsize=9)
    return save_figure(fig, path)
