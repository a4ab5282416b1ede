"""MobileSAM image encoder (`vit_t`): timm's TinyViT trunk with MobileSAM's two changes, plus SAM's neck.

MobileSAM (Zhang et al. 2023) distils SAM's ViT-H encoder into TinyViT-5M. Its encoder differs from the ImageNet
TinyViT that timm ships in two places, both reproduced here:
- the last patch merging uses stride 1 (MobileSAM keys this on out_dim in {320, 448, 576}, i.e. the last merging of
  every TinyViT size), so the trunk ends at stride 16: 64 x 64 tokens for a 1024 input, like SAM's ViT;
- SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d, no biases) maps the last stage to 256 channels.
The classification head is dropped. Weight layout of the official `mobile_sam.pt` (`image_encoder.layers.*`,
`Conv2d_BN` children `c`/`bn`, patch merging at the end of each layer) is renamed to timm's by
`select_mobilesam_encoder_state`. Preprocessing is SAM's.

The official forward reshapes the last stage to a fixed 64 x 64 grid, so it only runs at 1024; timm's blocks infer
the grid from the input, so other sizes (multiples of 16) run here too, with the
attention biases of each window unchanged (they are relative offsets inside a window, not absolute positions).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from timm.layers import LayerNorm2d
from timm.models.tiny_vit import TinyVit
from torch import Tensor, nn

from samadapt.errors import CheckpointError, ConfigError

SIZE_MULTIPLE = 16  # stride-2 convs halve exactly (S/4 and S/8 even) when S is a multiple of 16


class MobileSamEncoder(nn.Module):
    """MobileSAM TinyViT encoder: `forward(x, layers) -> (neck [B,256,S/16,S/16], {stage_index: [B,C,h,w]})`."""

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_sizes: Sequence[int],
        mlp_ratio: float,
        mbconv_expand_ratio: float,
        local_conv_size: int,
        out_chans: int,
        img_size: int = 1024,
    ) -> None:
        """Build the trunk from timm's TinyVit with MobileSAM's numbers; `img_size` is the preprocessed input side."""
        super().__init__()
        if img_size <= 0 or img_size % SIZE_MULTIPLE:
            raise ConfigError(
                f"MobileSAM image size must be a positive multiple of {SIZE_MULTIPLE}; got {img_size}"
            )
        tiny_vit = TinyVit(
            num_classes=0,
            embed_dims=tuple(embed_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_sizes=tuple(window_sizes),
            mlp_ratio=mlp_ratio,
            drop_path_rate=0.0,
            mbconv_expand_ratio=mbconv_expand_ratio,
            local_conv_size=local_conv_size,
        )
        self.patch_embed = tiny_vit.patch_embed
        self.stages = tiny_vit.stages
        # MobileSAM's stride-1 last merging: same depthwise 3x3 conv (same weight shape), stride 1.
        last = self.stages[-1].downsample.conv2
        last.conv = nn.Conv2d(
            last.conv.in_channels,
            last.conv.out_channels,
            3,
            stride=1,
            padding=1,
            groups=last.conv.groups,
            bias=False,
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )
        self.img_size = img_size
        self.num_stages = len(depths)

    def forward(self, x: Tensor, layers: Sequence[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """x: [B,3,S,S] SAM-preprocessed images -> (neck embedding, {stage index: stage output})."""
        layers = list(layers or [])
        unknown = [n for n in layers if not (isinstance(n, int) and 0 <= n < self.num_stages)]
        if unknown:
            raise ConfigError(
                f"unknown MobileSAM layers {unknown}; known layers: {list(range(self.num_stages))}"
            )
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"MobileSAM input sides must be multiples of {SIZE_MULTIPLE}; got {h}x{w}")
        x = self.patch_embed(x)
        out: dict[int, Tensor] = {}
        for index, stage in enumerate(self.stages):
            x = stage(x)  # [B, C, h, w]
            if index in layers:
                out[index] = x
        return self.neck(x), out


# Official MobileSAM key (after `image_encoder.`) -> timm TinyVit key; applied in order.
_RENAMES = (
    (re.compile(r"^patch_embed\.seq\.0\."), "patch_embed.conv1."),
    (re.compile(r"^patch_embed\.seq\.2\."), "patch_embed.conv2."),
    # MobileSAM merges at the end of layer i; timm at the start of stage i+1.
    (re.compile(r"^layers\.(\d+)\.downsample\."), lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), r"stages.\1.blocks."),
    (
        re.compile(r"\.c\.(weight)$"),
        r".conv.\1",
    ),  # Conv2d_BN's conv child is `c`, timm's ConvNorm calls it `conv`
)
_DROPPED = re.compile(r"^(head|norm_head)\.|\.attention_bias_idxs$")  # unused classifier; derived buffers


def select_mobilesam_encoder_state(
    state: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The image-encoder part of an official MobileSAM state dict (flat, `image_encoder.*`), in our module's keys."""
    if "image_encoder.patch_embed.seq.0.c.weight" not in state:
        sample = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{source}: expected a MobileSAM state dict with 'image_encoder.patch_embed.seq.*' keys; "
            f"found keys like {sample}"
        )
    selected = {}
    for key, value in state.items():
        if not key.startswith("image_encoder."):
            continue
        key = key[len("image_encoder.") :]
        if _DROPPED.search(key):
            continue
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        selected[key] = value
    return selected
