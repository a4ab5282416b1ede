"""SAM features for SLCA and the linear probe, read from the embedding store (the encoder runs once per image).

The store holds full [C, h, w] maps; SLCA needs only window statistics, so they are computed here, chunk by
chunk from the memory-mapped store, and kept in memory: [N, C(x2), h/k, w/k]. For SAM's padded preprocessing
(longest side resized, zero pad right/bottom) only the cells covering the image are pooled, so the window grid
lines up with the backbone's square-resized view of the same image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.encoders.preprocessing import longest_side_shape
from samadapt.tasks.classify.slca import pooled_grid, window_pool

CHUNK = 64


def parse_sam_feature(text: str) -> str | int:
    """ "neck", a SAM block index ("5") or a SAM 2 output name, as `Encoder.embed(layers=...)` takes it."""
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def embed_into_store(
    dataset: Any,
    *,
    encoder: Any,
    store_dir: str | Path,
    feature: str = "neck",
    batch_size: int = 4,
    progress: bool = False,
) -> Any:
    """Embed `dataset` (store hits reused); return the dataset-ordered memory-mapped array of `feature`."""
    from samadapt.store import embed_dataset

    layer = parse_sam_feature(feature)
    layers = None if layer == "neck" else [layer]
    table = embed_dataset(
        dataset, encoder, store_dir, layers=layers, batch_size=batch_size, progress=progress
    )
    return table[str(layer)]


def valid_cells(
    image_shape: Sequence[int], *, preprocessing: str, input_size: int, grid: tuple[int, int]
) -> tuple[int, int]:
    """Rows and columns of the SAM grid that hold image content (all of it unless the input was padded)."""
    if preprocessing != "sam":
        return grid
    h, w = longest_side_shape(int(image_shape[0]), int(image_shape[1]), input_size)
    stride = input_size / grid[0]
    return (min(grid[0], max(1, math.ceil(h / stride))), min(grid[1], max(1, math.ceil(w / stride))))


def pooled_sam_features(
    embeddings: Any,
    *,
    window: int,
    pooling: str,
    image_shapes: Sequence[Sequence[int]] | None = None,
    preprocessing: str = "sam2",
    input_size: int = 1024,
) -> torch.Tensor:
    """[N, C, h, w] embeddings (array-like, e.g. the store's EmbeddingArray) -> [N, C(x2), gh, gw] float32.

    `image_shapes` (H, W per image) and `preprocessing`/`input_size` crop the padding of SAM's preprocessing.
    """
    n = len(embeddings)
    grid = tuple(int(v) for v in embeddings.shape[-2:])
    out_size = pooled_grid(grid, window)
    chunks = []
    for start in range(0, n, CHUNK):
        block = torch.from_numpy(np.asarray(embeddings[start : start + CHUNK], dtype=np.float32))
        if not image_shapes or preprocessing != "sam":
            chunks.append(window_pool(block, window=window, pooling=pooling, out_size=out_size))
            continue
        rows = []
        for j in range(block.shape[0]):
            vh, vw = valid_cells(
                image_shapes[start + j], preprocessing=preprocessing, input_size=input_size, grid=grid
            )
            rows.append(
                window_pool(block[j : j + 1, :, :vh, :vw], window=window, pooling=pooling, out_size=out_size)
            )
        chunks.append(torch.cat(rows))
    return torch.cat(chunks)


def global_sam_features(embeddings: Any) -> np.ndarray:
    """[N, C, h, w] -> [N, 2C] (global average and max), the linear probe's input."""
    parts = []
    for start in range(0, len(embeddings), CHUNK):
        block = torch.from_numpy(np.asarray(embeddings[start : start + CHUNK], dtype=np.float32))
        parts.append(torch.cat([block.mean(dim=(2, 3)), block.amax(dim=(2, 3))], dim=1))
    return torch.cat(parts).numpy()


def resize_for_backbone(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 images of any size and channel count -> uint8 [N, 3, size, size] (square resize, PIL bilinear)."""
    from PIL import Image

    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for i, image in enumerate(images):
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        resized = np.asarray(
            Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((size, size), Image.BILINEAR)
        )
        out[i] = torch.from_numpy(resized.copy()).permute(2, 0, 1)
    return out


def normalise(images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 normalised with the backbone's mean/std (on [0, 1])."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def flip_pair(
    images: torch.Tensor, sam: torch.Tensor | None, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random horizontal and vertical flips, the same per sample for the image [B, 3, H, W] and its SAM window
    grid [B, C, gh, gw], so the attention stays on the region it was computed from."""
    for dim in (3, 2):  # width, then height
        mask = torch.rand(images.shape[0], generator=generator) < 0.5
        if mask.any():
            images = torch.where(mask.view(-1, 1, 1, 1), images.flip(dim), images)
            if sam is not None:
                sam = torch.where(mask.view(-1, 1, 1, 1), sam.flip(dim), sam)
    return images, sam


def photometric(images: torch.Tensor, *, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Random brightness and contrast per sample on normalised images (no geometry change)."""
    b = images.shape[0]
    scale = 1.0 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * strength
    shift = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * strength
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * scale + mean + shift
