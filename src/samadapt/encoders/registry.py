"""The encoder table: every architecture number and preprocessing convention lives here, nowhere else.

Modules (`sam_vit.py`, `sam2_hiera.py`) carry no numbers; builders receive them from `ENCODERS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: its architecture family and numbers, and the preprocessing its checkpoint was trained with."""

    name: str
    family: str  # "sam" (SAM-1 ViT), "sam2" (Hiera + FPN), "mobilesam" / "litemedsam" (TinyViT + SAM neck)
    arch: dict[str, Any]
    preprocessing: str  # key of samadapt.encoders.preprocessing.PREPROCESSORS
    default_image_size: int = 1024
    official_files: tuple[str, ...] = ()
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    embedding_stride: int = 16  # input pixels per embedding cell (the embedding grid is S / stride)


_SAM_VIT_COMMON = {"patch_size": 16, "window_size": 14, "out_chans": 256, "mlp_ratio": 4.0}

SAM_VIT_B = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "global_attn_indexes": (2, 5, 8, 11),
    **_SAM_VIT_COMMON,
}
SAM_VIT_L = {
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "global_attn_indexes": (5, 11, 17, 23),
    **_SAM_VIT_COMMON,
}
SAM_VIT_H = {
    "embed_dim": 1280,
    "depth": 32,
    "num_heads": 16,
    "global_attn_indexes": (7, 15, 23, 31),
    **_SAM_VIT_COMMON,
}

# SAM 2 / 2.1 Hiera trunks (numbers from the official sam2 configs); FPN neck to 256 channels.
_SAM2_NECK = {"d_model": 256, "fpn_top_down_levels": (2, 3), "fpn_interp_model": "nearest", "scalp": 1}
SAM2_HIERA_T = {
    "embed_dim": 96, "num_heads": 1, "stages": (1, 2, 7, 2), "global_att_blocks": (5, 7, 9),
    "window_pos_embed_bkg_spatial_size": (7, 7), "window_spec": (8, 4, 14, 7),
    "backbone_channel_list": (768, 384, 192, 96), **_SAM2_NECK,
}  # fmt: skip
SAM2_HIERA_S = {
    "embed_dim": 96, "num_heads": 1, "stages": (1, 2, 11, 2), "global_att_blocks": (7, 10, 13),
    "window_pos_embed_bkg_spatial_size": (7, 7), "window_spec": (8, 4, 14, 7),
    "backbone_channel_list": (768, 384, 192, 96), **_SAM2_NECK,
}  # fmt: skip
SAM2_HIERA_BP = {
    "embed_dim": 112, "num_heads": 2, "stages": (2, 3, 16, 3), "global_att_blocks": (12, 16, 20),
    "window_pos_embed_bkg_spatial_size": (14, 14), "window_spec": (8, 4, 14, 7),
    "backbone_channel_list": (896, 448, 224, 112), **_SAM2_NECK,
}  # fmt: skip
SAM2_HIERA_L = {
    "embed_dim": 144, "num_heads": 2, "stages": (2, 6, 36, 4), "global_att_blocks": (23, 33, 43),
    "window_pos_embed_bkg_spatial_size": (7, 7), "window_spec": (8, 4, 16, 8),
    "backbone_channel_list": (1152, 576, 288, 144), **_SAM2_NECK,
}  # fmt: skip

# MobileSAM vit_t (official build_sam_vit_t numbers): timm TinyViT-5M with a stride-1 last merging and SAM's neck.
MOBILESAM_VIT_T = {
    "embed_dims": (64, 128, 160, 320), "depths": (2, 2, 6, 2), "num_heads": (2, 4, 5, 10),
    "window_sizes": (7, 7, 14, 7), "mlp_ratio": 4.0, "mbconv_expand_ratio": 4.0, "local_conv_size": 3,
    "out_chans": 256,
}  # fmt: skip

# LiteMedSAM (MedSAM's LiteMedSAM branch, CVPR24_LiteMedSAM_infer.py): the same TinyViT numbers at img_size 256, with
# a 1x1 stride-1 patch embedding, so a 256 input ends at a 64 x 64 grid.
LITEMEDSAM_VIT_T = {**MOBILESAM_VIT_T, "patch_embed_stride": 1}
# SAM 3 (official sam3.model_builder._create_vit_backbone / _create_vit_neck): RoPE ViT-L-like trunk at 1008 px,
# patch 14 (72 x 72 grid), 24 x 24 windows, position table trained at 336 px (24 x 24) tiled; SimpleFPN neck.
SAM3_VIT = {
    "embed_dim": 1024, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31), "patch_size": 14,
    "window_size": 24, "mlp_ratio": 4.625, "pretrain_grid": 24, "rope_theta": 10000.0, "out_chans": 256,
    "scale_factors": (4.0, 2.0, 1.0, 0.5),
}  # fmt: skip

ENCODERS: dict[str, EncoderSpec] = {
    "sam_vit_b": EncoderSpec(
        "sam_vit_b", "sam", SAM_VIT_B, "sam", official_files=("sam_vit_b_01ec64.pth",),
        description="SAM ViT-B (91M encoder params)",
    ),
    "sam_vit_l": EncoderSpec(
        "sam_vit_l", "sam", SAM_VIT_L, "sam", official_files=("sam_vit_l_0b3195.pth",),
        description="SAM ViT-L (308M encoder params)",
    ),
    "sam_vit_h": EncoderSpec(
        "sam_vit_h", "sam", SAM_VIT_H, "sam", official_files=("sam_vit_h_4b8939.pth",),
        description="SAM ViT-H (637M encoder params)",
    ),
    "medsam_vit_b": EncoderSpec(
        "medsam_vit_b", "sam", SAM_VIT_B, "medsam", official_files=("medsam_vit_b.pth",),
        description="MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs)",
    ),
    "sam2_hiera_t": EncoderSpec(
        "sam2_hiera_t", "sam2", SAM2_HIERA_T, "sam2",
        official_files=("sam2_hiera_tiny.pt", "sam2.1_hiera_tiny.pt"), description="SAM 2 / 2.1 Hiera-T",
    ),
    "sam2_hiera_s": EncoderSpec(
        "sam2_hiera_s", "sam2", SAM2_HIERA_S, "sam2",
        official_files=("sam2_hiera_small.pt", "sam2.1_hiera_small.pt"), description="SAM 2 / 2.1 Hiera-S",
    ),
    "sam2_hiera_b+": EncoderSpec(
        "sam2_hiera_b+", "sam2", SAM2_HIERA_BP, "sam2",
        official_files=("sam2_hiera_base_plus.pt", "sam2.1_hiera_base_plus.pt"),
        description="SAM 2 / 2.1 Hiera-B+", aliases=("sam2_hiera_bp", "sam2_hiera_base_plus"),
    ),
    "sam2_hiera_l": EncoderSpec(
        "sam2_hiera_l", "sam2", SAM2_HIERA_L, "sam2",
        official_files=("sam2_hiera_large.pt", "sam2.1_hiera_large.pt"), description="SAM 2 / 2.1 Hiera-L",
    ),
    # MedSAM2 (Ma et al. 2025): SAM 2.1 Hiera-T fine-tuned at 512 px. Its config `sam2.1_hiera_t512.yaml` differs
    # from the official `sam2.1_hiera_t.yaml` only in `image_size` (512) and the memory attention's RoPE grid
    # (32x32, not part of the image encoder): trunk, neck and windows are Hiera-T's.
    "medsam2": EncoderSpec(
        "medsam2", "sam2", SAM2_HIERA_T, "medsam2", default_image_size=512,
        official_files=("MedSAM2_latest.pt", "MedSAM2_2411.pt", "MedSAM2_CTLesion.pt", "MedSAM2_MRI_LiverLesion.pt",
                        "MedSAM2_US_Heart.pt"),
        description="MedSAM2 (SAM 2.1 Hiera-T fine-tuned on medical volumes and videos, 512 px)",
    ),
    "mobilesam_vit_t": EncoderSpec(
        "mobilesam_vit_t", "mobilesam", MOBILESAM_VIT_T, "sam", official_files=("mobile_sam.pt",),
        description="MobileSAM TinyViT-5M distilled from SAM ViT-H (5M encoder params)",
    ),
    "litemedsam_vit_t": EncoderSpec(
        "litemedsam_vit_t", "litemedsam", LITEMEDSAM_VIT_T, "litemedsam", default_image_size=256,
        official_files=("lite_medsam.pth",),
        description="LiteMedSAM TinyViT distilled from MedSAM (256 px input, 64x64 embedding grid)",
    ),
    "sam3": EncoderSpec(
        "sam3", "sam3", SAM3_VIT, "sam3", default_image_size=1008, official_files=("sam3.pt",),
        description="SAM 3 image encoder (RoPE ViT + SimpleFPN neck, 454M params, 1008 px; [N,256,72,72] embedding)",
        aliases=("sam3_vit", "sam3_image", "facebook/sam3"), embedding_stride=14,
    ),
}  # fmt: skip

# Tiny configurations with the same builders, for tests and the CPU demo (random weights only).
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "sam": {"embed_dim": 64, "depth": 4, "num_heads": 2, "global_attn_indexes": (1, 3), **_SAM_VIT_COMMON},
    "sam2": {
        "embed_dim": 16, "num_heads": 1, "stages": (1, 1, 2, 1), "global_att_blocks": (3,),
        "window_pos_embed_bkg_spatial_size": (7, 7), "window_spec": (8, 4, 14, 7),
        "backbone_channel_list": (128, 64, 32, 16), **_SAM2_NECK,
    },
    # MobileSAM's stride-1 rule is keyed on a last width of 320, so the tiny trunk keeps it.
    "mobilesam": {**MOBILESAM_VIT_T, "embed_dims": (16, 32, 32, 320), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 5)},
    "litemedsam": {**LITEMEDSAM_VIT_T, "embed_dims": (16, 32, 32, 320), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 5)},
    # 4 x 4 windows over the 8 x 8 grid of a 112 px input (or padded ones at other sizes); last block global.
    "sam3": {**SAM3_VIT, "embed_dim": 64, "depth": 4, "num_heads": 2, "global_attn_indexes": (1, 3), "window_size": 4,
             "pretrain_grid": 4},
}  # fmt: skip


def get_spec(name: str) -> EncoderSpec:
    """Look an encoder up by name or alias, with a helpful error listing the known names."""
    if name in ENCODERS:
        return ENCODERS[name]
    for spec in ENCODERS.values():
        if name in spec.aliases:
            return spec
    from samadapt.errors import ConfigError

    raise ConfigError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}")
