"""Heat-map overlays on images (attention maps, probability maps) for reports and prediction outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from samadapt.utils.atomic import atomic_write_with


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend a [h, w] heat map (any range; min-max scaled) over a uint8 HxW or HxWx3 image -> uint8 HxWx3.

    The heat map is resized bilinearly to the image size, so any grid (a 16x16 attention map) works.
    """
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = rgb[..., :3].astype(np.float32)
    heat = np.asarray(heatmap, dtype=np.float32)
    span = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    heat = np.asarray(Image.fromarray(heat).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    colour = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * colour, 0, 255).astype(np.uint8)


def save_overlay(
    path: str | os.PathLike[str], *, image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45
) -> Path:
    """Write `overlay_heatmap(image, heatmap)` as a PNG (atomically)."""
    blended = Image.fromarray(overlay_heatmap(image, heatmap, alpha=alpha))
    atomic_write_with(path, lambda tmp: blended.save(tmp, format="PNG"))
    return Path(path)
