"""SAM 3 image encoder against the official `sam3` package: same random weights, official sam3.pt container.

`sam3` (PyPI 0.1.x) needs numpy < 2.4, so it cannot live in the project venv: these tests run in `.venv-sam3`
(`.ci/run` builds it and runs ``pytest -m sam3 tests/test_sam3_identity.py`` with ``PYTHONPATH=src``) and skip
elsewhere. The oracle is the official vision backbone, ``SAM3VLBackbone(visual=Sam3DualViTDetNeck(ViT(...)),
scalp=1).forward_image``: exactly what ``Sam3Processor.set_image`` runs on the image.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from samadapt.encoders import load_encoder
from samadapt.encoders.preprocessing import preprocess_sam3
from samadapt.encoders.registry import TINY_ARCHS

pytestmark = pytest.mark.sam3

with warnings.catch_warnings():
    warnings.simplefilter(
        "ignore"
    )  # sam3 warns about CUDA autocast decorators at import on CPU-only machines
    sam3 = pytest.importorskip(
        "sam3",
        reason="the official `sam3` package is not installed (it needs numpy<2.4; .ci/run builds .venv-sam3 for "
        "these tests: PYTHONPATH=src .venv-sam3/bin/python -m pytest -m sam3 tests/test_sam3_identity.py)",
    )

from sam3.model.necks import Sam3DualViTDetNeck  # noqa: E402
from sam3.model.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam3.model.vitdet import ViT  # noqa: E402
from sam3.model.vl_combiner import SAM3VLBackbone  # noqa: E402

TOLERANCE = 1e-4  # fp32: max abs difference relative to the reference's max abs value


def official_backbone(arch: dict[str, Any], img_size: int) -> SAM3VLBackbone:
    """The official vision backbone with `arch`'s numbers, every other argument as in
    `sam3.model_builder._create_vit_backbone` / `_create_vit_neck` / `_create_vision_backbone`."""
    trunk = ViT(
        img_size=img_size,
        pretrain_img_size=arch["pretrain_grid"] * arch["patch_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=arch["global_attn_indexes"],
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=arch["window_size"],
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    position = PositionEmbeddingSine(num_pos_feats=256, normalize=True, scale=None, temperature=10000)
    neck = Sam3DualViTDetNeck(
        trunk=trunk,
        position_encoding=position,
        d_model=arch["out_chans"],
        scale_factors=list(arch["scale_factors"]),
        add_sam2_neck=True,
    )
    return SAM3VLBackbone(visual=neck, text=None, scalp=1).eval()


def perturb(model: torch.nn.Module, *, scale: float = 0.02) -> None:
    """Random values in every parameter (zero-initialised biases and LayerNorm affines included)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_sam3_pt(backbone: SAM3VLBackbone, path: Path) -> Path:
    """The container and key layout of the official sam3.pt: {"model": {"detector.backbone.vision_backbone...."}}
    (what `sam3.model_builder._load_checkpoint` reads), with a few unrelated detector/tracker tensors around."""
    state = {"detector.backbone." + k: v for k, v in backbone.state_dict().items()}
    state["detector.transformer.decoder.norm.weight"] = torch.ones(256)
    state["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    torch.save({"model": state}, path)
    return path


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize("img_size", [112, 98])  # 98: windows padded (7 x 7 grid, 4 x 4 windows)
def test_tiny_matches_official(tmp_path: Path, img_size: int) -> None:
    torch.manual_seed(0)
    arch = dict(TINY_ARCHS["sam3"])
    official = official_backbone(arch, img_size)
    perturb(official, scale=0.05)
    path = save_sam3_pt(official, tmp_path / "sam3.pt")
    ours = load_encoder("sam3", path, arch="tiny", image_size=img_size)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ref = official.forward_image(x)
    out = ours.embed_tensor(x, layers=["fpn0", "fpn1", "fpn2"])[1]
    for level, expected in enumerate(ref["backbone_fpn"]):
        assert out[f"fpn{level}"].shape == expected.shape
        assert relative_error(out[f"fpn{level}"], expected) <= TOLERANCE
    neck, _ = ours.embed_tensor(x)
    assert relative_error(neck, ref["vision_features"]) <= TOLERANCE


def test_preprocessing_matches_sam3_processor() -> None:
    from sam3.model.sam3_image_processor import Sam3Processor
    from torchvision.transforms import v2

    processor = Sam3Processor(model=None, device="cpu")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (60, 45, 3)), np.ones((23, 23, 1))).astype(np.uint8)  # 1380 x 1035
    for name, image in {
        "down": smooth,
        "up": smooth[:500:7, :400:5],
        "noise": rng.integers(0, 256, (333, 1111, 3)),
    }.items():
        image = image.astype(np.uint8)
        expected = processor.transform(v2.functional.to_image(image))  # what set_image does before the model
        ours, _ = preprocess_sam3(image, 1008)
        assert torch.equal(ours, expected.as_subclass(torch.Tensor)), name


@pytest.mark.slow
def test_real_size_matches_official(tmp_path: Path) -> None:
    """The real configuration (454M parameters, 1008 px, 72 x 72 grid) built by the official builder."""
    from sam3.model_builder import _create_position_encoding, _create_vit_backbone, _create_vit_neck

    from samadapt.encoders.registry import ENCODERS

    torch.manual_seed(0)
    # _create_vision_backbone with its position-encoding cache off (precomputing it needs CUDA); with the SAM 2-style
    # neck (enable_inst_interactivity) that sam3.pt carries, which the selection must drop.
    neck = _create_vit_neck(
        _create_position_encoding(), _create_vit_backbone(), enable_inst_interactivity=True
    )
    official = SAM3VLBackbone(visual=neck, text=None, scalp=1).eval()
    perturb(official)
    path = save_sam3_pt(official, tmp_path / "sam3.pt")
    ours = load_encoder("sam3", path)
    assert ours.spec is ENCODERS["sam3"]
    # the registry's numbers build the official builder's module: same keys and shapes
    official_shapes = {
        k.removeprefix("vision_backbone."): v.shape
        for k, v in official.state_dict().items()
        if ".sam2_convs." not in "." + k and not k.endswith("freqs_cis")
    }
    assert {k: v.shape for k, v in ours.module.state_dict().items()} == official_shapes
    image = (np.random.default_rng(0).random((700, 900, 3)) * 255).astype(np.uint8)
    x = ours.preprocess(image)[0][None]
    with torch.no_grad():
        ref = official.forward_image(x)
    del official
    neck, extra = ours.embed_tensor(x, layers=["fpn0", "fpn1"])
    assert neck.shape == (1, 256, 72, 72)
    assert relative_error(neck, ref["vision_features"]) <= TOLERANCE
    assert relative_error(extra["fpn0"], ref["backbone_fpn"][0]) <= TOLERANCE
    assert relative_error(extra["fpn1"], ref["backbone_fpn"][1]) <= TOLERANCE
