"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the few-shot training features.

    logits = 100 * f W_c^T + alpha * exp(-beta * (1 - f F_train^T)) L_train

f: normalised test features [B, D]; W_c: class-prompt text embeddings [C, D]; F_train: cache keys (normalised
training features) [N, D]; L_train: one-hot training labels [N, C]. As the reference code, each key is the
normalised mean of the raw CLIP features of 10 augmented views of its image (`cache_keys_from_views`; views:
`augment.py`). Tip-Adapter is training-free; -F makes the keys learnable and fine-tunes them with cross-entropy on
augmented views (AdamW lr 1e-3, eps 1e-4, cosine schedule, 20 epochs, batch 256). alpha and beta are then
picked on the (few-shot) validation set over the reference grid: 200 betas x 20 alphas,
``v_i = 0.1 + i * (max - 0.1) / steps`` for i < steps, with (beta max, alpha max) = (7, 3) as its ImageNet config
(its other datasets use larger ranges: `search_grid`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_SCALE = 100.0  # the paper's fixed scale on the zero-shot term
SEARCH_SCALE = (7.0, 3.0)  # (beta, alpha) upper ends of the reference's ImageNet search
SEARCH_STEPS = (200, 20)  # (beta, alpha) grid sizes of the reference


def search_grid(scale: float, steps: int) -> np.ndarray:
    """The reference's search values: 0.1 + i * (scale - 0.1) / steps for i in range(steps)."""
    return 0.1 + np.arange(steps) * (scale - 0.1) / steps


def cache_keys_from_views(views: torch.Tensor) -> torch.Tensor:
    """[V, N, D] raw CLIP features of V augmented views -> [N, D] keys: the normalised mean over the views."""
    return F.normalize(views.float().mean(dim=0), dim=-1)


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
    """Grid search of (alpha, beta) by accuracy on held-out features (betas outer, alphas inner, as the
    reference; default: its 200 x 20 grid); ties keep the earlier grid point.
    Sets them on `head` and returns (alpha, beta, accuracy)."""
    betas = search_grid(SEARCH_SCALE[0], SEARCH_STEPS[0]) if betas is None else betas
    alphas = search_grid(SEARCH_SCALE[1], SEARCH_STEPS[1]) if alphas is None else alphas
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
