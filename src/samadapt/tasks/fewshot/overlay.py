"""MedFocusCLIP's "segmented image": SAM 2 masks painted on the image as coloured, semi-transparent overlays.

Masks are painted largest first, so small structures stay visible on top of large ones (as SAM's own demo
does). Pixels outside every mask keep their exact values; pixels inside get ``(1 - alpha) * pixel +
alpha * colour`` and, with outlines on, the mask's boundary pixels take the outline colour. The same picture is
the model's input and the explanation shown to the user, so rendering is deterministic (fixed palette order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from skimage.segmentation import find_boundaries

from samadapt.errors import ConfigError


@dataclass(frozen=True)
class OverlayStyle:
    """palette: a matplotlib colormap name ("tab20") or comma-separated colours ("red,#00ff00"); alpha in [0, 1];
    outline_color: a colour, or "mask" for the mask's own colour at full opacity."""

    palette: str = "tab20"
    alpha: float = 0.5
    outline: bool = True
    outline_color: str = "white"
    outline_width: int = 1
    max_masks: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"overlay alpha must be in [0, 1], got {self.alpha}")
        if self.outline_width < 1:
            raise ConfigError(f"overlay outline width must be >= 1, got {self.outline_width}")
        palette_colors(self.palette, 1)  # fail early on a bad palette


def palette_colors(palette: str, n: int) -> np.ndarray:
    """n RGB colours in [0, 255] (float), cycling through the palette."""
    try:
        if "," in palette or palette.startswith("#") or palette not in colormaps:
            base = np.array([to_rgb(c.strip()) for c in palette.split(",") if c.strip()])
        else:
            cmap = colormaps[palette]
            count = getattr(cmap, "N", 256)
            count = count if count <= 32 else 12  # continuous maps: 12 evenly spaced colours
            base = np.array([cmap(i / max(count - 1, 1))[:3] for i in range(count)])
    except ValueError as exc:
        raise ConfigError(f"overlay palette {palette!r}: {exc}") from None
    if len(base) == 0:
        raise ConfigError(f"overlay palette {palette!r} holds no colours")
    return base[np.arange(n) % len(base)] * 255.0


def render_overlay(image: np.ndarray, masks: np.ndarray, *, style: OverlayStyle | None = None) -> np.ndarray:
    """uint8 HxW or HxWx3 image and [K, H, W] boolean masks -> uint8 HxWx3 overlay image.

    Zero masks give the image itself (as RGB).
    """
    style = style or OverlayStyle()
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    masks = np.asarray(masks, dtype=bool)
    if masks.size == 0:
        masks = np.zeros((0, *rgb.shape[:2]), bool)
    if masks.ndim != 3 or masks.shape[1:] != rgb.shape[:2]:
        raise ConfigError(
            f"masks of shape {masks.shape} do not match the image {rgb.shape[:2]} (expected [K, H, W])"
        )
    order = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")
    if style.max_masks is not None:
        order = order[: style.max_masks]
    out = rgb.astype(np.float32)
    colors = palette_colors(style.palette, len(order))
    outline_rgb = None if style.outline_color == "mask" else np.array(to_rgb(style.outline_color)) * 255.0
    for color, k in zip(colors, order):
        mask = masks[k]
        out[mask] = (1.0 - style.alpha) * rgb[mask].astype(np.float32) + style.alpha * color
        if style.outline:
            edge = find_boundaries(mask, mode="inner")
            for _ in range(style.outline_width - 1):
                edge |= find_boundaries(mask & ~edge, mode="inner")
            out[edge] = color if outline_rgb is None else outline_rgb
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
