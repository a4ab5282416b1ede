"""medfocus-attn: SAM 2 masks as an additive attention bias on CLIP's patch grid, not painted pixels.

Two modes (`FewShotOptions.attn_mode`, applied by `FocusAttention`):

- "falip" (default; FALIP, Zhuang et al., ECCV 2024, training-free): the bias enters only the [CLS] query's row,
  on the patch columns inside the chosen region, as a positive Gaussian centred on the region's bounding box
  (sigma = half its extent per axis, on the patch grid) min-max scaled to [0, `bias_max` = 0.2] over the region's
  patches; zero elsewhere; identical across heads; in the last 4 of ViT-B's 12 blocks, i.e. the last
  round(4 * depth / 12) (at least one) blocks of other depths.
- "suppress" (the earlier variant): the [CLS] row gets ``-strength * (1 - focus_k)`` (focus_k = the patch's mask
  coverage), so patches outside the region are damped; every block by default.

The region is a CHOSEN set of masks, not the union of all of them (`select_masks`, `MaskChoice`): masks covering
at least `max_area_fraction` of the image are background and dropped; then rule "largest" (default) keeps the
`top_k` (default 1) largest remaining masks, "top-iou" the `top_k` with the highest SAM-predicted IoU, "union" all
of them (the earlier behaviour). The inputs carry the chosen region's coverage of each patch after the same
resize / crop as the image (`patch_focus`); a patch is inside the region when covered at least half. With no
usable mask the coverage is one everywhere and both modes give a zero bias, so the model is plain CLIP. The bias enters through a forward pre-hook on each open_clip
resblock that fills its ``attn_mask`` argument, so open_clip's code stays the official one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samadapt.errors import ConfigError

ATTN_MODES = ("falip", "suppress")
MASK_RULES = ("largest", "top-iou", "union")
FALIP_BIAS_MAX = 0.2  # FALIP's min-max range of the foveal bias
FALIP_BLOCKS, FALIP_DEPTH = 4, 12  # FALIP biases the last 4 of ViT-B's 12 blocks
INSIDE = 0.5  # a patch is in a mask when the mask covers at least this much of it


@dataclass(frozen=True)
class MaskChoice:
    """Which of an image's masks make its region: the background cut, the rule and how many masks."""

    select: str = "largest"
    top_k: int = 1
    max_area_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.select not in MASK_RULES:
            raise ConfigError(f"--attn-select must be one of {', '.join(MASK_RULES)}, got {self.select!r}")
        if self.top_k < 1:
            raise ConfigError(f"--attn-top-k must be at least 1, got {self.top_k}")


def select_masks(
    masks: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    rule: str = "largest",
    top_k: int = 1,
    max_area_fraction: float = 0.9,
) -> np.ndarray:
    """[K, H, W] masks (+ predicted IoU [K]) -> the chosen [k, H, W] masks (see the module docstring)."""
    masks = np.asarray(masks, dtype=bool)
    if len(masks) == 0:
        return masks
    area = masks.reshape(len(masks), -1).mean(axis=1)
    keep = np.flatnonzero((area < max_area_fraction) & (area > 0))  # whole-image masks say nothing
    if rule == "union":
        return masks[keep]
    if rule == "largest":
        order = keep[np.argsort(-area[keep], kind="stable")]
    elif rule == "top-iou":
        if scores is None:
            raise ConfigError("mask rule 'top-iou' needs the masks' predicted IoU scores")
        iou = np.asarray(scores, dtype=np.float64)
        order = keep[np.lexsort((-area[keep], -iou[keep]))]  # highest IoU first, larger area on ties
    else:
        raise ConfigError(f"unknown mask rule {rule!r}; choose one of {', '.join(MASK_RULES)}")
    return masks[order[:top_k]]


def focus_map(masks: np.ndarray, *, max_area_fraction: float = 0.9) -> np.ndarray:
    """[K, H, W] boolean masks -> HxW float32 union in {0, 1} of the non-background masks; all ones without."""
    masks = select_masks(masks, rule="union", max_area_fraction=max_area_fraction)
    if len(masks) == 0:
        return np.ones(np.asarray(masks).shape[1:], np.float32)
    return masks.any(axis=0).astype(np.float32)


def focus_grid(
    focus: np.ndarray, *, image_size: int, grid: int, resize_mode: str = "shortest"
) -> torch.Tensor:
    """HxW focus map -> [grid*grid] patch focus, with the geometry open_clip applies to the image."""
    t = torch.as_tensor(focus, dtype=torch.float32)[None, None]
    h, w = t.shape[-2:]
    if resize_mode == "squash":
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    elif resize_mode == "shortest":  # resize the short side, then center crop (open_clip's eval default)
        scale = image_size / min(h, w)
        t = F.interpolate(
            t, size=(max(image_size, round(h * scale)), max(image_size, round(w * scale))), mode="bilinear"
        )
        top, left = (t.shape[-2] - image_size) // 2, (t.shape[-1] - image_size) // 2
        t = t[..., top : top + image_size, left : left + image_size]
    elif resize_mode == "longest":  # resize the long side, pad (padding is not in focus)
        scale = image_size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        t = F.interpolate(t, size=(nh, nw), mode="bilinear")
        top, left = (image_size - nh) // 2, (image_size - nw) // 2
        t = F.pad(t, (left, image_size - nw - left, top, image_size - nh - top), value=0.0)
    else:
        raise ConfigError(f"unknown resize mode {resize_mode!r}")
    return F.adaptive_avg_pool2d(t, grid).reshape(-1).clamp(0.0, 1.0)


def foveal_weights(coverage: torch.Tensor, *, grid: int) -> torch.Tensor:
    """[G*G] patch coverage of the region -> FALIP's foveal weights in [0, 1] (times `bias_max` = the bias).

    Inside the region (coverage >= 0.5): a Gaussian centred on the region's bounding box on the patch grid, with
    sigma = half the box's extent per axis (at least half a patch), min-max scaled over the region's patches
    (a one-patch region gets 1); 0 outside. A region covering every patch (or none) has nothing to foveate: 0."""
    inside = coverage.reshape(grid, grid) >= INSIDE
    if not inside.any() or inside.all():
        return torch.zeros(grid * grid, dtype=coverage.dtype, device=coverage.device)
    ys, xs = torch.nonzero(inside, as_tuple=True)
    cy, cx = (ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0
    sy = max(float(ys.max() - ys.min() + 1) / 2.0, 0.5)
    sx = max(float(xs.max() - xs.min() + 1) / 2.0, 0.5)
    axis = torch.arange(grid, dtype=torch.float32, device=coverage.device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    gauss = torch.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
    values = gauss[inside]
    low, high = values.min(), values.max()
    scaled = (gauss - low) / (high - low) if high > low else torch.ones_like(gauss)
    weights = torch.where(inside, scaled.clamp(0.0, 1.0), torch.zeros_like(gauss))
    return weights.reshape(-1).to(coverage.dtype)


def patch_focus(
    masks: np.ndarray,
    scores: np.ndarray | None,
    *,
    choice: MaskChoice,
    image_size: int,
    grid: int,
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """An image's masks -> [G*G] coverage of the chosen region on CLIP's patch grid (all ones without a usable
    mask: both modes then give a zero bias). The attention mode turns it into the bias (`FocusAttention`)."""
    chosen = select_masks(
        masks, scores, rule=choice.select, top_k=choice.top_k, max_area_fraction=choice.max_area_fraction
    )
    if len(chosen) == 0:
        return torch.ones(grid * grid)
    region = chosen.any(axis=0).astype(np.float32)
    return focus_grid(region, image_size=image_size, grid=grid, resize_mode=resize_mode)


def attention_bias(
    grids: torch.Tensor,
    *,
    strength: float = 5.0,
    num_heads: int,
    rows: str = "cls",
    mode: str = "suppress",
    bias_max: float = FALIP_BIAS_MAX,
) -> torch.Tensor:
    """[B, G*G] patch values -> additive mask [B*num_heads, L, L] for nn.MultiheadAttention (L = 1 + G*G);
    "falip": ``bias_max * weights`` (foveal weights, `foveal_weights`) on the patch columns, "suppress":
    ``-strength * (1 - focus)`` (focus = the region's patch coverage)."""
    b, n = grids.shape
    length = n + 1
    bias = torch.zeros(b, length, length, dtype=grids.dtype, device=grids.device)
    if mode == "falip":
        key_bias = bias_max * grids
    elif mode == "suppress":
        key_bias = -strength * (1.0 - grids)  # [B, N]
    else:
        raise ConfigError(f"--attn-mode must be one of {', '.join(ATTN_MODES)}, got {mode!r}")
    if rows == "cls":
        bias[:, 0, 1:] = key_bias
    elif rows == "all":
        bias[:, :, 1:] = key_bias[:, None, :]
    else:
        raise ConfigError(f"attention bias rows must be 'cls' or 'all', got {rows!r}")
    return bias.repeat_interleave(num_heads, dim=0)  # the same bias in every head


def default_layers(depth: int, mode: str) -> list[int]:
    """FALIP's blocks scaled to `depth` (the last round(4 * depth / 12), at least one); every block to suppress."""
    if mode == "suppress":
        return list(range(depth))
    count = min(depth, max(1, round(FALIP_BLOCKS * depth / FALIP_DEPTH)))
    return list(range(depth - count, depth))


class FocusAttention:
    """Installs the bias hooks on an open_clip VisionTransformer; `set(grids)` before each forward."""

    def __init__(
        self,
        visual: nn.Module,
        *,
        strength: float = 5.0,
        layers: list[int] | None = None,
        rows: str = "cls",
        mode: str = "suppress",
        bias_max: float = FALIP_BIAS_MAX,
    ):
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise ConfigError(f"medfocus-attn needs a ViT image tower; found {type(visual).__name__}")
        if mode not in ATTN_MODES:
            raise ConfigError(f"--attn-mode must be one of {', '.join(ATTN_MODES)}, got {mode!r}")
        self.blocks = list(blocks)
        bad = [i for i in layers or [] if not -len(self.blocks) <= i < len(self.blocks)]
        if bad:
            raise ConfigError(
                f"--attn-layers {bad[0]}: the CLIP image tower has {len(self.blocks)} blocks "
                f"(indices 0..{len(self.blocks) - 1}, or negative from the end)"
            )
        self.layers = (
            default_layers(len(self.blocks), mode)
            if layers is None
            else sorted({i % len(self.blocks) for i in layers})
        )
        self.strength = strength
        self.rows = rows
        self.mode = mode
        self.bias_max = bias_max
        self.num_heads = self.blocks[0].attn.num_heads
        self._bias: torch.Tensor | None = None
        self._handles = [
            self.blocks[i].register_forward_pre_hook(self._hook, with_kwargs=True) for i in self.layers
        ]

    def set(self, grids: torch.Tensor | None) -> None:
        """`grids` [B, G*G]: each image's region coverage (`patch_focus`); None removes the bias."""
        if grids is not None and self.mode == "falip":
            side = round(grids.shape[1] ** 0.5)
            grids = torch.stack([foveal_weights(g, grid=side) for g in grids]) if len(grids) else grids
        self._bias = (
            None
            if grids is None
            else attention_bias(
                grids,
                strength=self.strength,
                num_heads=self.num_heads,
                rows=self.rows,
                mode=self.mode,
                bias_max=self.bias_max,
            )  # fmt: skip
        )

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._bias is not None:
            x = args[0] if args else kwargs["q_x"]
            bias = self._bias.to(dtype=x.dtype, device=x.device)
            # open_clip's gradient checkpointing passes (x, k_x, v_x, attn_mask) positionally
            if len(args) >= 4:
                args = (*args[:3], bias, *args[4:])
            else:
                kwargs = {**kwargs, "attn_mask": bias}
        return args, kwargs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
