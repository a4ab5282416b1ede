"""SAM 2 / 2.1 image encoder: the official `sam2` Hiera trunk and FPN neck, plus the two SAM2Base pieces that
`SAM2ImagePredictor.set_image` applies to the encoder output (`no_mem_embed`, the mask decoder's high-res convs).

The modules are the official classes (`sam2.modeling.backbones`), constructed with keyword arguments from
`registry.py` instead of hydra, so the arithmetic is Meta's and stays identical to the official predictor.
State-dict keys are the official model's with the `image_encoder.` prefix removed (`trunk.*`, `neck.*`), plus
`no_mem_embed`, and `conv_s0.*` / `conv_s1.*` for the official `sam_mask_decoder.conv_s0.*` / `conv_s1.*`;
`select_sam2_encoder_state` does that renaming, so a checkpoint's encoder part loads strictly.

Layers `forward(x, layers=...)` can return (S = input side, default 1024; shapes for one image):
- `0`..`3` (int): trunk stage outputs, `[B, C_i, S/4/2^i, S/4/2^i]` with C_i = embed_dim * 2^i.
- `"fpn0"`, `"fpn1"`, `"fpn2"`: FPN neck outputs, 256 channels at S/4, S/8, S/16 (`backbone_fpn` before the
  decoder convs; `"fpn2"` is `vision_features`, i.e. the image embedding without `no_mem_embed`).
- `"high_res0"`, `"high_res1"`: `"fpn0"`/`"fpn1"` after the decoder's `conv_s0`/`conv_s1` (32 ch at S/4, 64 ch
  at S/8), equal to `SAM2ImagePredictor._features["high_res_feats"]`.

Image sizes other than 1024: the official Hiera bicubically interpolates its background position embedding to the
patch grid (`Hiera._get_pos_embed`, done at 1024 too) and tiles the window embedding over it, which needs the S/4
grid to be a multiple of `window_spec[0]` (8); the neck's 2x top-down upsampling needs exact halving per stage.
Hence any S that is a multiple of 32 runs the official computation unchanged. The checkpoints were trained at 1024,
so features at other sizes are the official model's, not a validated operating point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import Tensor, nn

from samadapt.errors import CheckpointError, ConfigError

# Hiera downsamples by 4 at the patch embed and by 2 at each of 3 later stages, and tiles an 8x8 window embedding.
SIZE_MULTIPLE = 32

# Official SAM2Base key prefix -> ours. Everything else (prompt encoder, mask decoder, memory modules, SAM 2.1's
# extra `no_obj_embed_spatial`, `obj_ptr_tpos_proj.*`) is not part of the image encoder and is ignored.
_RENAME = {
    "image_encoder.": "",
    "no_mem_embed": "no_mem_embed",
    "sam_mask_decoder.conv_s0.": "conv_s0.",
    "sam_mask_decoder.conv_s1.": "conv_s1.",
}


class Sam2HieraEncoder(nn.Module):
    """SAM 2 image encoder returning the predictor's `image_embed` and optional intermediate feature maps."""

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        stages: Sequence[int],
        global_att_blocks: Sequence[int],
        window_pos_embed_bkg_spatial_size: Sequence[int],
        window_spec: Sequence[int],
        backbone_channel_list: Sequence[int],
        d_model: int,
        fpn_top_down_levels: Sequence[int],
        fpn_interp_model: str,
        scalp: int,
        img_size: int = 1024,
    ) -> None:
        """Build the official trunk and neck; `img_size` is the input side the preprocessing produces."""
        super().__init__()
        if img_size <= 0 or img_size % SIZE_MULTIPLE:
            raise ConfigError(
                f"SAM 2 image size must be a positive multiple of {SIZE_MULTIPLE}; got {img_size}"
            )
        trunk = Hiera(
            embed_dim=embed_dim,
            num_heads=num_heads,
            stages=tuple(stages),
            global_att_blocks=tuple(global_att_blocks),
            window_pos_embed_bkg_spatial_size=tuple(window_pos_embed_bkg_spatial_size),
            window_spec=tuple(window_spec),
        )
        if list(trunk.channel_list) != list(backbone_channel_list):
            raise ValueError(
                f"backbone_channel_list {list(backbone_channel_list)} != trunk's {trunk.channel_list}"
            )
        neck = FpnNeck(
            # Values of the official configs. warmup_cache=False: never touch CUDA while building on a CPU path.
            position_encoding=PositionEmbeddingSine(
                num_pos_feats=d_model, temperature=10000, normalize=True, scale=None, warmup_cache=False
            ),
            d_model=d_model,
            backbone_channel_list=list(backbone_channel_list),
            fpn_top_down_levels=list(fpn_top_down_levels),
            fpn_interp_model=fpn_interp_model,
        )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))
        # SAM2Base builds its MaskDecoder with transformer_dim = d_model; these are its high-res projections.
        self.conv_s0 = nn.Conv2d(d_model, d_model // 8, kernel_size=1, stride=1)
        self.conv_s1 = nn.Conv2d(d_model, d_model // 4, kernel_size=1, stride=1)
        self.img_size = img_size
        self.num_stages = len(stages)
        self.num_levels = len(backbone_channel_list) - scalp
        self._stage_channels = [int(c) for c in reversed(list(backbone_channel_list))]
        self._d_model = d_model

    def layer_names(self) -> list[int | str]:
        """Every name `forward(layers=...)` accepts."""
        names: list[int | str] = list(range(self.num_stages))
        names += [f"fpn{i}" for i in range(self.num_levels)] + ["high_res0", "high_res1"]
        return names

    def layer_shape(self, name: int | str, image_size: int | None = None) -> tuple[int, int, int]:
        """(channels, height, width) of one layer's output for a square input of `image_size` (default img_size)."""
        side = image_size or self.img_size
        if isinstance(name, int) and name in range(self.num_stages):
            return self._stage_channels[name], side // 4 // 2**name, side // 4 // 2**name
        if (
            isinstance(name, str)
            and name.startswith("fpn")
            and name[3:].isdigit()
            and int(name[3:]) < self.num_levels
        ):
            level = int(name[3:])
            return self._d_model, side // 4 // 2**level, side // 4 // 2**level
        if name in ("high_res0", "high_res1"):
            level = int(name[-1])
            return self._d_model // (8 // 2**level), side // 4 // 2**level, side // 4 // 2**level
        raise ConfigError(f"unknown SAM 2 layer {name!r}; known layers: {self.layer_names()}")

    def forward(
        self, x: Tensor, layers: Sequence[int | str] | None = None
    ) -> tuple[Tensor, dict[int | str, Tensor]]:
        """x: [B,3,S,S] preprocessed images -> (image_embed [B,256,S/16,S/16], {layer: tensor})."""
        layers = list(layers or [])
        for name in layers:
            self.layer_shape(name)  # validates the name
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"SAM 2 input sides must be multiples of {SIZE_MULTIPLE}; got {h}x{w}")

        # The official ImageEncoder.forward, unrolled to keep the trunk's stage outputs.
        stage_feats = self.trunk(x)  # highest resolution first
        fpn, _pos = self.neck(stage_feats)
        if self.scalp > 0:
            fpn = fpn[: -self.scalp]

        # SAM2ImagePredictor adds no_mem_embed ([1,1,C]) to the flattened (HW,B,C) lowest-resolution level;
        # the same element-wise sum in [B,C,H,W] layout.
        image_embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)

        out: dict[int | str, Tensor] = {}
        for name in layers:
            if isinstance(name, int):
                out[name] = stage_feats[name]
            elif name.startswith("fpn"):
                out[name] = fpn[int(name[3:])]
            else:
                level = int(name[-1])
                out[name] = (self.conv_s0 if level == 0 else self.conv_s1)(fpn[level])
        return image_embed, out


def select_sam2_encoder_state(
    state: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The image-encoder part of a full official SAM 2 / 2.1 state dict, renamed to `Sam2HieraEncoder`'s keys."""
    selected = {}
    for key, value in state.items():
        for official, ours in _RENAME.items():
            if key.startswith(official):
                selected[ours + key[len(official) :]] = value
                break
    if "trunk.patch_embed.proj.weight" not in selected:
        sample = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{source}: expected a SAM 2 state dict with 'image_encoder.trunk.*' keys; found keys like {sample}"
        )
    return selected


def sam2_state_arch(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """The trunk numbers a state dict's weights reveal (global-attention blocks and heads leave no trace).

    Accepts a full official state dict (`image_encoder.trunk.*`) or `Sam2HieraEncoder`'s own (`trunk.*`).
    """
    prefix = next((p for p in ("image_encoder.", "") if p + "trunk.patch_embed.proj.weight" in state), None)
    if prefix is None:
        return None
    trunk = prefix + "trunk."
    blocks = sorted(
        {int(k[len(trunk + "blocks.") :].split(".")[0]) for k in state if k.startswith(trunk + "blocks.")}
    )
    depth = len(blocks)
    # A block whose width changes carries a `proj` shortcut: that is the first block of every stage after the first.
    starts = [0] + [i for i in blocks if f"{trunk}blocks.{i}.proj.weight" in state] + [depth]
    channels, level = [], 0
    while f"{prefix}neck.convs.{level}.conv.weight" in state:
        channels.append(int(state[f"{prefix}neck.convs.{level}.conv.weight"].shape[1]))
        level += 1
    return {
        "embed_dim": int(state[trunk + "patch_embed.proj.weight"].shape[0]),
        "depth": depth,
        "stages": tuple(b - a for a, b in zip(starts[:-1], starts[1:])),
        "window_pos_embed_bkg_spatial_size": tuple(int(s) for s in state[trunk + "pos_embed"].shape[-2:]),
        "window0": int(state[trunk + "pos_embed_window"].shape[-1]),
        "backbone_channel_list": tuple(channels),
    }


def detect_sam2_arch(
    state: Mapping[str, Tensor], archs: Mapping[str, Mapping[str, Any]] | None = None
) -> str | None:
    """Name of the entry of `archs` (default: the registry's SAM 2 encoders) whose trunk the state dict holds."""
    found = sam2_state_arch(state)
    if found is None:
        return None
    if archs is None:
        from samadapt.encoders.registry import ENCODERS

        archs = {name: spec.arch for name, spec in ENCODERS.items() if spec.family == "sam2"}
    for name, arch in archs.items():
        expected = {
            "embed_dim": arch["embed_dim"],
            "depth": sum(arch["stages"]),
            "stages": tuple(arch["stages"]),
            "window_pos_embed_bkg_spatial_size": tuple(arch["window_pos_embed_bkg_spatial_size"]),
            "window0": arch["window_spec"][0],
            "backbone_channel_list": tuple(arch["backbone_channel_list"]),
        }
        if expected == found:
            return name
    return None


def describe_sam2_state(state: Mapping[str, Tensor]) -> str:
    """Short human description for mismatch errors, e.g. 'Hiera embed 96, 16 blocks (stages 1-2-11-2)'."""
    found = sam2_state_arch(state)
    if found is None:
        return "no SAM 2 image encoder"
    stages = "-".join(str(s) for s in found["stages"])
    return f"Hiera embed {found['embed_dim']}, {found['depth']} blocks (stages {stages})"
