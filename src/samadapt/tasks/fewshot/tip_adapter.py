"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the few-shot training features.

    logits = 100 * f W_c^T + alpha * exp(-beta * (1 - f F_train^T)) L_train

f: normalised test features [B, D]; W_c: class-prompt text embeddings [C, D]; F_train: cache keys (normalised
training features) [N, D]; L_train: one-hot training labels [N, C]. Tip-Adapter is training-free; -F makes the
keys learnable and fine-tunes them with cross-entropy (AdamW lr 1e-3, eps 1e-4, cosine schedule, as the paper).
alpha and beta are then picked on the validation set over a grid, as the paper searches them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_SCALE = 100.0  # the paper's fixed scale on the zero-shot term


class TipAdapterHead(nn.Module):
    def __init__(
        self,
        clip_weights: torch.Tensor,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        *,
        alpha: float = 1.0,
        beta: float = 5.5,
        learn_keys: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("clip_weights", clip_weights.float())
        self.register_buffer("cache_values", cache_values.float())
        self.cache_keys = nn.Parameter(cache_keys.float().clone(), requires_grad=learn_keys)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero-shot logits, cache logits) so alpha and beta can be searched without recomputing."""
        clip_logits = CLIP_SCALE * features @ self.clip_weights.T
        affinity = features @ self.cache_keys.T
        return clip_logits, affinity

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        clip_logits, affinity = self.parts(features)
        cache_logits = torch.exp(-self.beta * (1.0 - affinity)) @ self.cache_values
        return clip_logits + self.alpha * cache_logits


def one_hot(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes).float()


@torch.no_grad()
def search_alpha_beta(
    head: TipAdapterHead,
    features: torch.Tensor,
    labels: np.ndarray,
    *,
    alphas: np.ndarray | None = None,
    betas: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Grid search of (alpha, beta) by accuracy on held-out features; ties keep the earlier grid point.
    Sets them on `head` and returns (alpha, beta, accuracy)."""
    alphas = np.linspace(0.1, 5.0, 15) if alphas is None else alphas
    betas = np.linspace(0.5, 10.0, 15) if betas is None else betas
    clip_logits, affinity = head.parts(features)
    y = torch.as_tensor(labels, dtype=torch.long, device=features.device)
    best = (float(head.alpha), float(head.beta), -1.0)
    for beta in betas:
        cache = torch.exp(-float(beta) * (1.0 - affinity)) @ head.cache_values
        for alpha in alphas:
            acc = float(((clip_logits + float(alpha) * cache).argmax(1) == y).float().mean())
            if acc > best[2] + 1e-12:
                best = (float(alpha), float(beta), acc)
    head.alpha.fill_(best[0])
    head.beta.fill_(best[1])
    return best
