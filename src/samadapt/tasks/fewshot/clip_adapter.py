"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the frozen CLIP image feature.

    f' = ratio * A(f) + (1 - ratio) * f,   A = Linear(D, D/4, no bias) -> ReLU -> Linear(D/4, D, no bias) -> ReLU
    logits = scale * normalise(f') @ T^T

with ratio = 0.2, T the class-prompt text embeddings and `scale` CLIP's logit scale; only A trains. The reference
applies A to the raw feature; A is positively homogeneous (no bias, ReLU), so A(c f) = c A(f) for c > 0 and
applying it to the L2-normalised feature gives the same logits after the final normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTION = 4  # the reference's bottleneck: D -> D / 4 -> D
RATIO = 0.2  # the reference's residual ratio


class ClipAdapterHead(nn.Module):
    def __init__(
        self, text_features: torch.Tensor, *, scale: float, reduction: int = REDUCTION, ratio: float = RATIO
    ) -> None:
        super().__init__()
        dim = text_features.shape[1]
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("ratio", torch.tensor(float(ratio)))

    def mixed(self, features: torch.Tensor) -> torch.Tensor:
        """The adapted feature ratio * A(f) + (1 - ratio) * f, before normalisation."""
        return self.ratio * self.adapter(features) + (1.0 - self.ratio) * features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.mixed(features), dim=-1) @ self.text_features.T
