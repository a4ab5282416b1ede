"""The mask-overlay gallery a few-shot run adds to its report: what MedFocusCLIP's CLIP saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samadapt.reports import new_figure, save_figure


def plot_overlay_gallery(
    path: Path,
    *,
    panels: list[tuple[np.ndarray, str]],
    focus: list[torch.Tensor | None] | None = None,
    columns: int = 4,
    title: str = "SAM 2 mask overlays (test images)",
) -> Path:
    """A grid of overlay images with captions; for medfocus-attn the patch focus is drawn as a contour."""
    rows = max(1, -(-len(panels) // columns))
    fig = new_figure(width=2.6 * columns, height=2.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(panels):
            continue
        image, caption = panels[k]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        grid = focus[k] if focus else None
        if grid is not None:
            g = int(round(grid.numel() ** 0.5))
            h, w = image.shape[:2]
            side = min(h, w)  # the focus lives on the center crop CLIP sees
            extent = ((w - side) / 2, (w + side) / 2, (h + side) / 2, (h - side) / 2)
            ax.imshow(grid.reshape(g, g).numpy(), cmap="magma", alpha=0.45, extent=extent, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
