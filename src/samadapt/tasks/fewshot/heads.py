"""Classifier heads on L2-normalised CLIP image features, and the model that puts a CLIP image tower before them.

Every few-shot method is `ClipClassifier(visual, head)`: the methods differ in the head (class-prompt similarity,
a linear probe, learned prompt context, a Tip-Adapter cache) and in which weights train. Heads hold everything
they learned as parameters or persistent buffers, so a run's weights file is `learned_state(model)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.tasks.fewshot.attn_bias import FocusAttention


class PromptHead(nn.Module):
    """logits = scale * f @ T^T with fixed class-prompt text embeddings T [C, D] (zero-shot, fine-tuning)."""

    def __init__(self, text_features: torch.Tensor, *, scale: float) -> None:
        super().__init__()
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.text_features.T


class LinearHead(nn.Module):
    """logits = f W^T + b (the linear probe; weights come from scikit-learn)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class ClipClassifier(nn.Module):
    """CLIP image tower (optionally with a focus-attention bias) -> normalised features -> head."""

    def __init__(self, visual: nn.Module, head: nn.Module, *, focus: FocusAttention | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.focus = focus

    def features(self, images: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.visual.parameters()).device  # inputs are prepared on the CPU
        images = images.to(device)
        grids = grids.to(device) if grids is not None else None
        if self.focus is not None:
            self.focus.set(grids)
        try:
            out = self.visual(images)
        finally:
            if self.focus is not None:
                self.focus.set(None)
        return F.normalize(out.float(), dim=-1)

    def forward(self, images: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(images, grids))


def learned_state(model: ClipClassifier) -> dict[str, torch.Tensor]:
    """What a run must save: the head's whole state, plus the image-tower parameters that were trained."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    state.update({f"visual.{k}": p for k, p in model.visual.named_parameters() if p.requires_grad})
    return state


def load_learned_state(model: ClipClassifier, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Inverse of `learned_state`: every saved tensor must land in the model with the same shape."""
    from samadapt.errors import CheckpointError

    own = model.state_dict()
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        found = tuple(own[k].shape) if k in own else "no such tensor"
        raise CheckpointError(
            f"{source}: weight {k!r} of shape {tuple(state[k].shape)} does not fit ({found})"
        )
    model.load_state_dict(state, strict=False)
