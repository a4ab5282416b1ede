"""From dataset images to what a method's CLIP sees: plain images, mask-overlay images, or images + patch focus.

- "plain": open_clip's eval preprocessing of the image.
- "overlay": SAM 2 masks painted on the image at its own resolution (`overlay.render_overlay`), then preprocessed.
- "attn": the plain image, plus the chosen masks' coverage of CLIP's patch grid (`attn_bias.patch_focus`; which
  masks: `attn_bias.MaskChoice`, by default the largest non-background mask).
Masks come from the masker's cache when present, so every method and fraction of a sweep computes them once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from samadapt.encoders.clip import ClipModel
from samadapt.encoders.masks import SamMasker
from samadapt.errors import ConfigError
from samadapt.tasks.fewshot.attn_bias import MaskChoice, patch_focus
from samadapt.tasks.fewshot.overlay import OverlayStyle, render_overlay

INPUT_KINDS = ("plain", "overlay", "attn")


@dataclass
class Inputs:
    """images [N, 3, S, S] float32; grids [N, G*G] patch focus ("attn" only); mask_counts [N]."""

    images: torch.Tensor
    grids: torch.Tensor | None
    mask_counts: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.images,) if self.grids is None else (self.images, self.grids)


def prepare_one(
    image: np.ndarray,
    *,
    clip: ClipModel,
    kind: str,
    masker: SamMasker | None = None,
    style: OverlayStyle | None = None,
    max_area_fraction: float = 0.9,
    transform=None,
    choice: MaskChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(image tensor, patch focus or None, number of masks) for one uint8 image. `choice` picks the masks of
    the "attn" region (default: the largest mask under `max_area_fraction` of the image)."""
    if kind not in INPUT_KINDS:
        raise ConfigError(f"unknown input kind {kind!r}; expected one of {INPUT_KINDS}")
    transform = transform or clip.transform()
    if kind == "plain":
        from samadapt.encoders.clip import to_pil_rgb

        return transform(to_pil_rgb(image)), None, 0
    if masker is None:
        raise ConfigError(f"input kind {kind!r} needs a SAM 2 masker (--masker and --masker-checkpoint)")
    found = masker(image)
    masks = found.masks
    from samadapt.encoders.clip import to_pil_rgb

    if kind == "overlay":
        return transform(to_pil_rgb(render_overlay(image, masks, style=style))), None, len(masks)
    grid = patch_focus(
        masks,
        found.scores,
        choice=choice or MaskChoice(max_area_fraction=max_area_fraction),
        image_size=clip.image_size,
        grid=clip.patch_grid,
        resize_mode=clip.preprocess_cfg.get("resize_mode", "shortest"),
    )
    return transform(to_pil_rgb(image)), grid, len(masks)


def prepare_inputs(
    images: Sequence[np.ndarray],
    *,
    clip: ClipModel,
    kind: str,
    masker: SamMasker | None = None,
    style: OverlayStyle | None = None,
    max_area_fraction: float = 0.9,
    desc: str = "inputs",
    progress: bool = True,
    choice: MaskChoice | None = None,
) -> Inputs:
    """Prepare every image; `images` may be a lazy sequence (decoded one at a time)."""
    transform = clip.transform()
    tensors, grids, counts = [], [], []
    for image in tqdm(images, desc=desc, disable=not progress, leave=False):
        x, g, n = prepare_one(
            image, clip=clip, kind=kind, masker=masker, style=style, max_area_fraction=max_area_fraction,
            transform=transform, choice=choice,
        )  # fmt: skip
        tensors.append(x)
        grids.append(g)
        counts.append(n)
    size = clip.image_size
    return Inputs(
        images=torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size),
        grids=torch.stack(grids) if (kind == "attn" and grids) else None,
        mask_counts=np.asarray(counts, np.int64),
    )


class LazyImages(Sequence):
    """dataset.image(i) for the given indices, decoded on access."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):  # type: ignore[override]
        return self.dataset.image(self.indices[k])
