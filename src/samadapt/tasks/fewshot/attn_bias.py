"""medfocus-attn: SAM 2 masks as an additive attention bias on CLIP's patch grid (FALIP-style), not painted pixels.

A focus map in [0, 1] (the union of the image's masks, leaving out near-whole-image "background" masks) is
resized and cropped like the image, then averaged over each ViT patch. In the chosen blocks the [CLS] query's
attention logits to patch k get ``-strength * (1 - focus_k)``: fully masked-in patches are untouched, patches
outside every mask are damped. With no usable mask the focus is 1 everywhere and the bias is zero, so the model
falls back to plain CLIP. The bias enters through a forward pre-hook on each open_clip resblock that fills its
``attn_mask`` argument, so open_clip's code stays the official one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samadapt.errors import ConfigError


def focus_map(masks: np.ndarray, *, max_area_fraction: float = 0.9) -> np.ndarray:
    """[K, H, W] boolean masks -> HxW float32 focus in {0, 1}; all ones when no mask is usable."""
    masks = np.asarray(masks, dtype=bool)
    h, w = masks.shape[1:]
    if len(masks):
        area = masks.reshape(len(masks), -1).mean(axis=1)
        masks = masks[area < max_area_fraction]  # whole-image masks say nothing about where to look
    if len(masks) == 0:
        return np.ones((h, w), np.float32)
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


def attention_bias(
    grids: torch.Tensor, *, strength: float, num_heads: int, rows: str = "cls"
) -> torch.Tensor:
    """[B, G*G] patch focus -> additive mask [B*num_heads, L, L] for nn.MultiheadAttention (L = 1 + G*G)."""
    b, n = grids.shape
    length = n + 1
    bias = torch.zeros(b, length, length, dtype=grids.dtype, device=grids.device)
    key_bias = -strength * (1.0 - grids)  # [B, N]
    if rows == "cls":
        bias[:, 0, 1:] = key_bias
    elif rows == "all":
        bias[:, :, 1:] = key_bias[:, None, :]
    else:
        raise ConfigError(f"attention bias rows must be 'cls' or 'all', got {rows!r}")
    return bias.repeat_interleave(num_heads, dim=0)


class FocusAttention:
    """Installs the bias hooks on an open_clip VisionTransformer; `set(grids)` before each forward."""

    def __init__(
        self, visual: nn.Module, *, strength: float = 5.0, layers: list[int] | None = None, rows: str = "cls"
    ):
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise ConfigError(f"medfocus-attn needs a ViT image tower; found {type(visual).__name__}")
        self.blocks = list(blocks)
        bad = [i for i in layers or [] if not -len(self.blocks) <= i < len(self.blocks)]
        if bad:
            raise ConfigError(
                f"--attn-layers {bad[0]}: the CLIP image tower has {len(self.blocks)} blocks "
                f"(indices 0..{len(self.blocks) - 1}, or negative from the end)"
            )
        self.layers = (
            list(range(len(self.blocks))) if layers is None else [i % len(self.blocks) for i in layers]
        )
        self.strength = strength
        self.rows = rows
        self.num_heads = self.blocks[0].attn.num_heads
        self._bias: torch.Tensor | None = None
        self._handles = [
            self.blocks[i].register_forward_pre_hook(self._hook, with_kwargs=True) for i in self.layers
        ]

    def set(self, grids: torch.Tensor | None) -> None:
        self._bias = (
            None
            if grids is None
            else attention_bias(grids, strength=self.strength, num_heads=self.num_heads, rows=self.rows)
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
