"""From head outputs back to label volumes in the input's own grid (shared by evaluation and `predict`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from samadapt.data.volumes import Volume
from samadapt.tasks.segment.slices import image_tensor, volume_slices


def head_inputs(
    head_name: str, images: list[np.ndarray], *, image_size: int, encoder: Any = None
) -> torch.Tensor:
    """What the head eats for these uint8 square slices: pixels for the U-Net, the encoder's embedding otherwise."""
    if head_name == "unet":
        return image_tensor(images, image_size)
    if encoder is None:
        raise ValueError(f"head {head_name!r} needs an encoder (or precomputed embeddings)")
    return encoder.embed(images, batch_size=4)


@torch.no_grad()
def predict_volume(
    head: nn.Module,
    *,
    head_name: str,
    volume: Volume,
    image_size: int,
    inputs: torch.Tensor | None = None,
    encoder: Any = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Label volume (int16, the volume's shape): per slice, logits -> side x side -> crop H x W -> argmax."""
    h, w, depth = volume.image.shape
    side = max(h, w)
    if inputs is None:
        images, _ = volume_slices(volume)
        inputs = head_inputs(head_name, images, image_size=image_size, encoder=encoder)
    head.eval()
    out = np.zeros((h, w, depth), dtype=np.int16)
    for start in range(0, depth, batch_size):
        logits = head(inputs[start : start + batch_size].float())
        up = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
        labels = up.argmax(1)[:, :h, :w].to(torch.int16).numpy()
        out[:, :, start : start + len(labels)] = np.moveaxis(labels, 0, -1)
    return out
