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

LiteMedSAM (the MedSAM team's TinyViT distilled from MedSAM, `tiny_vit_sam.py` on MedSAM's LiteMedSAM branch) is
the same encoder with one change, `patch_embed_stride=1` here: its patch embedding's two Conv2d_BN are 1x1 with
stride 1 instead of 3x3 with stride 2, so a 256 input keeps 256 x 256 tokens in the first stage and ends, like
MobileSAM at 1024, at a 64 x 64 grid (stride 4 overall). Same state-dict layout, 1x1 kernels in `patch_embed.seq`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from timm.layers import LayerNorm2d
from timm.models.tiny_vit import ConvNorm, TinyVit
from torch import Tensor, nn

from samadapt.errors import CheckpointError, ConfigError

SIZE_MULTIPLE = 16  # stride-2 convs halve exactly (S/4 and S/8 even) when S is a multiple of 16
# MobileSAM / TinyViT: two 3x3 stride-2 convs; LiteMedSAM: two 1x1 stride-1 convs
PATCH_EMBED_STRIDES = (4, 1)


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
        patch_embed_stride: int = 4,
    ) -> None:
        """Build the trunk from timm's TinyVit with MobileSAM's numbers; `img_size` is the preprocessed input side.

        `patch_embed_stride=1` builds LiteMedSAM's patch embedding (1x1 stride-1 convs) instead of TinyViT's.
        """
        super().__init__()
        if patch_embed_stride not in PATCH_EMBED_STRIDES:
            raise ConfigError(
                f"patch_embed_stride must be one of {PATCH_EMBED_STRIDES}; got {patch_embed_stride}"
            )
        # the two stride-2 merges after the patch embedding halve exactly when S / patch stride is a multiple of 4
        multiple = 4 * patch_embed_stride  # SIZE_MULTIPLE for MobileSAM
        if img_size <= 0 or img_size % multiple:
            raise ConfigError(
                f"MobileSAM image size must be a positive multiple of {multiple}; got {img_size}"
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
        if patch_embed_stride == 1:
            half = embed_dims[0] // 2
            self.patch_embed.conv1 = ConvNorm(3, half, 1, 1, 0)
            self.patch_embed.conv2 = ConvNorm(half, embed_dims[0], 1, 1, 0)
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
        self.size_multiple = multiple
        # patch embedding, then two stride-2 merges (the last merging is stride 1)
        self.embedding_stride = patch_embed_stride * 4

    def forward(self, x: Tensor, layers: Sequence[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """x: [B,3,S,S] SAM-preprocessed images -> (neck embedding, {stage index: stage output})."""
        layers = list(layers or [])
        unknown = [n for n in layers if not (isinstance(n, int) and 0 <= n < self.num_stages)]
        if unknown:
            raise ConfigError(
                f"unknown MobileSAM layers {unknown}; known layers: {list(range(self.num_stages))}"
            )
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"MobileSAM input sides must be multiples of {self.size_multiple}; got {h}x{w}")
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


def tinyvit_patch_embed_stride(state: Mapping[str, Tensor]) -> int | None:
    """4 for a MobileSAM TinyViT (3x3 stride-2 patch embedding), 1 for LiteMedSAM's (1x1), None for neither.

    Accepts a full official state dict (`image_encoder.patch_embed.seq.0.c.weight`) or our module's keys.
    """
    weight = state.get("image_encoder.patch_embed.seq.0.c.weight", state.get("patch_embed.conv1.conv.weight"))
    if weight is None or weight.ndim != 4:
        return None
    return {3: 4, 1: 1}.get(int(weight.shape[-1]))


def describe_tinyvit_state(state: Mapping[str, Tensor]) -> str:
    """E.g. 'a LiteMedSAM TinyViT image encoder (first stage width 64, 1x1 patch embedding)', for errors."""
    weight = state.get("image_encoder.patch_embed.seq.0.c.weight", state.get("patch_embed.conv1.conv.weight"))
    width = int(weight.shape[0]) * 2 if weight is not None else "?"
    stride = tinyvit_patch_embed_stride(state)
    kind = {1: "LiteMedSAM", 4: "MobileSAM"}.get(stride or 0, "TinyViT-like")
    kernel = {1: "1x1", 4: "3x3 stride-2"}.get(stride or 0, "unknown")
    return f"a {kind} TinyViT image encoder (first stage width {width}, {kernel} patch embedding)"
