"""SLCA: Spatially Localized Channel Attention computed from frozen SAM features.

Our reading of the method (the paper publishes no internals; see docs): pool the SAM feature map over
non-overlapping k x k windows (average, optionally concatenated with max), a 1x1-conv bottleneck
C -> C/r -> C_stage and a sigmoid give channel attention that differs per window. The attention is resized
to a backbone stage's grid and applied to that stage's features: `x * a` (multiply) or `x * (1 + a)` (residual).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("avg", "avgmax")
MODES = ("multiply", "residual")


def pooled_grid(grid: tuple[int, int], window: int) -> tuple[int, int]:
    """Size of the window grid for a SAM feature grid: ceil(h / k) x ceil(w / k)."""
    return (max(1, math.ceil(grid[0] / window)), max(1, math.ceil(grid[1] / window)))


def window_pool(
    features: torch.Tensor, *, window: int, pooling: str, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """[B, C, h, w] SAM features -> [B, C (avg) or 2C (avg+max), h/k, w/k] window statistics.

    Adaptive pooling to `out_size` (default `pooled_grid`) covers grids not divisible by k and the valid
    (unpadded) region of a non-square image resized to the backbone's square input.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    size = out_size or pooled_grid(tuple(features.shape[-2:]), window)
    avg = F.adaptive_avg_pool2d(features, size)
    if pooling == "avg":
        return avg
    return torch.cat([avg, F.adaptive_max_pool2d(features, size)], dim=1)


class SLCA(nn.Module):
    """Per-window channel attention for one backbone stage, from window-pooled SAM features."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        reduction: int = 16,
        pooling: str = "avg",
        mode: str = "multiply",
    ) -> None:
        """in_channels: SAM feature channels (before pooling); out_channels: the stage's channels."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.mode = mode
        self.pooling = pooling
        pooled = in_channels * (2 if pooling == "avgmax" else 1)
        hidden = max(8, in_channels // max(1, reduction))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(pooled, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def attention(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, C_sam(x2), gh, gw] window statistics -> [B, C_stage, gh, gw] weights in (0, 1)."""
        return torch.sigmoid(self.bottleneck(pooled))

    def attend(
        self, x: torch.Tensor, attention: torch.Tensor, *, channels_last: bool = False
    ) -> torch.Tensor:
        """Apply attention to stage features `x` ([B, C, H, W], or [B, H, W, C] when channels_last)."""
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        a = F.interpolate(attention, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = x * a if self.mode == "multiply" else x * (1.0 + a)
        return out.permute(0, 2, 3, 1) if channels_last else out

    def forward(self, x: torch.Tensor, pooled: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        return self.attend(x, self.attention(pooled), channels_last=channels_last)
