"""`SlcaClassifier`: a timm backbone whose chosen stages are re-weighted by SLCA attention from SAM features.

With no SLCA stages it is the plain backbone (the `baseline` method), so both methods share one code path.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn

from samadapt.tasks.classify.backbone import StageInfo, channels_last_stages
from samadapt.tasks.classify.slca import SLCA

# The attention of the forward in progress, per thread / task: the hooks read it, so the model keeps no per-call
# state on itself and concurrent or nested forwards cannot see each other's attention.
_ATTENTION: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("slca_attention", default=None)


class SlcaClassifier(nn.Module):
    """Backbone + one SLCA block per target stage, applied through forward hooks on the stage modules.

    `forward(images, sam)`: `images` [B, 3, S, S] normalised for the backbone; `sam` [B, C, gh, gw]
    window-pooled SAM features (`slca.window_pool`), aligned with the images; returns logits [B, classes].
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        stages: list[StageInfo],
        sam_channels: int,
        reduction: int = 16,
        pooling: str = "avg",
        mode: str = "multiply",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.stage_modules = {str(s.index): s.module for s in stages}
        self.channels_last = channels_last_stages(backbone)
        self.slca = nn.ModuleDict(
            {
                str(s.index): SLCA(
                    in_channels=sam_channels,
                    out_channels=s.channels,
                    reduction=reduction,
                    pooling=pooling,
                    mode=mode,
                )
                for s in stages
            }
        )
        for key, name in self.stage_modules.items():
            backbone.get_submodule(name).register_forward_hook(self._hook(key))

    @property
    def uses_sam(self) -> bool:
        return len(self.slca) > 0

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            attention = _ATTENTION.get()
            if attention is None or key not in attention:
                return None
            return self.slca[key].attend(output, attention[key], channels_last=self.channels_last)

        return hook

    def attention(self, sam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention per target stage, [B, C_stage, gh, gw] each."""
        return {key: block.attention(sam) for key, block in self.slca.items()}

    def attention_map(self, sam: torch.Tensor) -> torch.Tensor:
        """One [B, gh, gw] map for display: the attention averaged over channels and target stages."""
        maps = [a.mean(dim=1) for a in self.attention(sam).values()]
        return torch.stack(maps).mean(dim=0)

    def forward(self, images: torch.Tensor, sam: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_sam:
            return self.backbone(images)
        if sam is None:
            raise ValueError("this model has SLCA stages: pass the window-pooled SAM features")
        token = _ATTENTION.set(self.attention(sam))
        try:
            return self.backbone(images)
        finally:
            _ATTENTION.reset(token)
