"""Sam2HieraEncoder on the tiny registry configuration, checked against the official sam2 SAM2Base built by hydra
from the packaged configs with the same tiny trunk (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from sam2.build_sam import build_sam2

from samadapt.encoders.registry import ENCODERS, TINY_ARCHS
from samadapt.encoders.sam2_hiera import (
    Sam2HieraEncoder,
    describe_sam2_state,
    detect_sam2_arch,
    select_sam2_encoder_state,
)
from samadapt.errors import CheckpointError, ConfigError

TINY = TINY_ARCHS["sam2"]


def _official_tiny(config: str, seed: int) -> torch.nn.Module:
    """Official SAM2Base with the tiny trunk, every parameter perturbed so zero-initialised ones matter too."""
    listed = lambda values: "[" + ",".join(str(v) for v in values) + "]"  # noqa: E731
    overrides = [
        f"++model.image_encoder.trunk.embed_dim={TINY['embed_dim']}",
        f"++model.image_encoder.trunk.num_heads={TINY['num_heads']}",
        f"++model.image_encoder.trunk.stages={listed(TINY['stages'])}",
        f"++model.image_encoder.trunk.global_att_blocks={listed(TINY['global_att_blocks'])}",
        f"++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size={listed(TINY['window_pos_embed_bkg_spatial_size'])}",
        f"++model.image_encoder.trunk.window_spec={listed(TINY['window_spec'])}",
        f"++model.image_encoder.neck.backbone_channel_list={listed(TINY['backbone_channel_list'])}",
    ]
    torch.manual_seed(seed)
    model = build_sam2(config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _official_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """SAM2ImagePredictor.set_image's feature path, with the feature sizes taken from the input (any size)."""
    backbone_out = model.forward_image(x)
    _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
    feats[-1] = feats[-1] + model.no_mem_embed
    return [f.permute(1, 2, 0).reshape(x.shape[0], -1, *s) for f, s in zip(feats, sizes)]


@pytest.fixture(scope="module")
def official() -> torch.nn.Module:
    return _official_tiny("configs/sam2/sam2_hiera_t.yaml", seed=0)


@pytest.fixture(scope="module")
def ours(official: torch.nn.Module) -> Sam2HieraEncoder:
    enc = Sam2HieraEncoder(**TINY, img_size=256).eval()
    enc.load_state_dict(select_sam2_encoder_state(official.state_dict()), strict=True)
    return enc


def test_keys_are_the_official_encoder_keys(official: torch.nn.Module) -> None:
    ours_keys = set(Sam2HieraEncoder(**TINY).state_dict())
    official_state = official.state_dict()
    assert ours_keys == set(select_sam2_encoder_state(official_state))
    expected = {k.removeprefix("image_encoder.") for k in official_state if k.startswith("image_encoder.")}
    expected |= {"no_mem_embed"} | {
        k.removeprefix("sam_mask_decoder.") for k in official_state if k.startswith("sam_mask_decoder.conv_s")
    }
    assert ours_keys == expected
    selected = select_sam2_encoder_state(official_state)
    assert selected["conv_s1.weight"] is official_state["sam_mask_decoder.conv_s1.weight"]


@pytest.mark.parametrize("size", [256, 512, 160])
def test_matches_official_at_image_sizes(
    official: torch.nn.Module, ours: Sam2HieraEncoder, size: int
) -> None:
    torch.manual_seed(size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        high0, high1, embed_ref = _official_features(official, x)
        embed, layers = ours(x, layers=["high_res0", "high_res1", "fpn2"])
    assert embed.shape == (1, 256, size // 16, size // 16)
    assert torch.equal(embed, embed_ref)
    assert torch.equal(layers["high_res0"], high0) and torch.equal(layers["high_res1"], high1)
    # fpn2 is the embedding before no_mem_embed is added.
    assert torch.equal(layers["fpn2"] + official.no_mem_embed.view(1, -1, 1, 1), embed)


def test_layers_shapes_and_batch(ours: Sam2HieraEncoder) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 256, 256)
    names = ours.layer_names()
    assert names == [0, 1, 2, 3, "fpn0", "fpn1", "fpn2", "high_res0", "high_res1"]
    with torch.no_grad():
        embed, layers = ours(x, layers=names)
        single, _ = ours(x[1:])
    assert list(layers) == names
    for name, value in layers.items():
        assert tuple(value.shape) == (2, *ours.layer_shape(name)), name
    assert layers[0].shape[1] == TINY["embed_dim"] and layers[3].shape[1] == TINY["backbone_channel_list"][0]
    torch.testing.assert_close(embed[1:], single, rtol=1e-5, atol=1e-5)


def test_bf16_runs_close_to_fp32(ours: Sam2HieraEncoder) -> None:
    # Encoder.embed's CPU bf16 path casts module and input; the official neck upsamples in fp32 in between.
    torch.manual_seed(2)
    x = torch.randn(1, 3, 128, 128)
    low = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        ref, _ = ours(x)
        out, layers = low(x.to(torch.bfloat16), layers=["high_res0"])
    assert out.shape == ref.shape and layers["high_res0"].dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_invalid_layers_and_sizes(ours: Sam2HieraEncoder) -> None:
    with pytest.raises(ConfigError, match="unknown SAM 2 layer"):
        ours(torch.zeros(1, 3, 64, 64), layers=["fpn3"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        Sam2HieraEncoder(**TINY, img_size=1000)
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.zeros(1, 3, 100, 100))


def test_sam2_1_extra_keys_ignored() -> None:
    model = _official_tiny("configs/sam2.1/sam2.1_hiera_t.yaml", seed=1)
    state = model.state_dict()
    extra = {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}
    assert extra <= set(state)
    selected = select_sam2_encoder_state(state)
    assert not extra & set(selected)
    enc = Sam2HieraEncoder(**TINY)
    enc.load_state_dict(selected, strict=True)
    assert torch.equal(enc.no_mem_embed, model.no_mem_embed)


def test_select_rejects_non_sam2_state() -> None:
    sam1_like = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    with pytest.raises(CheckpointError, match=r"sam_vit_b\.pth: expected a SAM 2 state dict"):
        select_sam2_encoder_state(sam1_like, source="sam_vit_b.pth")
    assert detect_sam2_arch(sam1_like) is None


@pytest.mark.parametrize("name", ["sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"])
def test_detect_registry_archs(name: str) -> None:
    state = Sam2HieraEncoder(**ENCODERS[name].arch).state_dict()
    assert detect_sam2_arch(state) == name
    depth = sum(ENCODERS[name].arch["stages"])
    assert f"{depth} blocks" in describe_sam2_state(state)


def test_detect_tiny_only_when_asked(official: torch.nn.Module) -> None:
    state = official.state_dict()
    assert detect_sam2_arch(state) is None
    assert detect_sam2_arch(state, archs={"tiny": TINY}) == "tiny"
