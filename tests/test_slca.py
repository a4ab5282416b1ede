"""SLCA module and its integration into timm backbones of every family: shapes, attention alignment,
gradients reach the backbone and SLCA but never the frozen SAM encoder, local backbone weights load."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from samadapt.encoders import RandomWeightsWarning, load_encoder
from samadapt.errors import CheckpointError, ConfigError
from samadapt.tasks.classify.backbone import build_backbone, resolve_stages, stage_infos
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.features import flip_pair, pooled_sam_features, valid_cells
from samadapt.tasks.classify.slca import SLCA, window_pool
from samadapt.tasks.classify.train import build_model

FAMILIES = [
    "resnet18",
    "legacy_seresnet18",  # squeeze-excitation family (timm's SENet class, as legacy_senet154)
    "seresnext26d_32x4d",  # squeeze-excitation ResNeXt (timm's ResNet class with SE blocks)
    "densenet121",
    "efficientnet_b0",
    "swinv2_cr_tiny_ns_224",  # Swin-V2 with NCHW stages
    "swinv2_tiny_window8_256",  # Swin-V2 with NHWC token grids
]


@pytest.fixture(scope="module")
def tiny_sam():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_encoder("sam_vit_b", arch="tiny", image_size=64)


def test_window_pool_and_slca_modes():
    sam = torch.randn(2, 8, 8, 8)
    avg = window_pool(sam, window=4, pooling="avg")
    both = window_pool(sam, window=4, pooling="avgmax")
    assert avg.shape == (2, 8, 2, 2) and both.shape == (2, 16, 2, 2)
    assert torch.allclose(avg[0, :, 0, 0], sam[0, :, :4, :4].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(both[0, 8:, 1, 1], sam[0, :, 4:, 4:].amax(dim=(1, 2)))
    assert window_pool(sam, window=3, pooling="avg").shape[-2:] == (3, 3)  # ceil(8 / 3)
    x = torch.randn(2, 5, 6, 6)
    for mode in ("multiply", "residual"):
        block = SLCA(in_channels=8, out_channels=5, reduction=2, pooling="avg", mode=mode)
        a = block.attention(avg)
        assert a.shape == (2, 5, 2, 2) and bool(((a > 0) & (a < 1)).all())
        up = torch.nn.functional.interpolate(a, size=(6, 6), mode="bilinear", align_corners=False)
        expected = x * up if mode == "multiply" else x * (1 + up)
        assert torch.allclose(block(x, avg), expected, atol=1e-6)
        nhwc = block(x.permute(0, 2, 3, 1), avg, channels_last=True)
        assert torch.allclose(nhwc.permute(0, 3, 1, 2), expected, atol=1e-6)


def test_attention_is_spatially_local():
    """A change in one SAM window changes the attention only around that window."""
    torch.manual_seed(0)
    block = SLCA(in_channels=4, out_channels=3, reduction=1)
    sam = torch.randn(1, 4, 8, 8)
    changed = sam.clone()
    changed[..., :2, :2] += 5.0
    a, b = (
        block.attention(window_pool(sam, window=2, pooling="avg")),
        block.attention(window_pool(changed, window=2, pooling="avg")),
    )
    diff = (a - b).abs().sum(dim=1)[0]
    assert diff[0, 0] > 0 and float(diff[1:, :].sum() + diff[:, 1:].sum()) == 0.0


def test_flip_keeps_image_and_sam_grid_aligned():
    images = torch.zeros(6, 3, 8, 8)
    images[:, :, 0, 0] = 1.0  # a marker in the top-left corner of the image ...
    sam = torch.zeros(6, 2, 4, 4)
    sam[:, :, 0, 0] = 1.0  # ... and of its SAM window grid
    out_img, out_sam = flip_pair(images, sam, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        r, c = divmod(int(out_img[i, 0].argmax()), 8)
        rs, cs = divmod(int(out_sam[i, 0].argmax()), 4)
        assert (r // 2, c // 2) == (rs, cs)
    assert len({int(out_img[i, 0].argmax()) for i in range(6)}) > 1  # some were flipped


def test_padded_sam_grid_is_cropped_to_the_image():
    assert valid_cells((100, 200), preprocessing="sam", input_size=1024, grid=(64, 64)) == (32, 64)
    assert valid_cells((100, 200), preprocessing="sam2", input_size=1024, grid=(64, 64)) == (64, 64)
    emb = np.zeros((1, 1, 8, 8), np.float32)
    emb[..., :4, :] = 1.0  # the image occupies the top half; the rest is padding
    pooled = pooled_sam_features(
        emb, window=4, pooling="avg", image_shapes=[(50, 100)], preprocessing="sam", input_size=128
    )
    assert pooled.shape == (1, 1, 2, 2) and torch.allclose(pooled, torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("backbone", FAMILIES)
def test_backbone_family_shapes_and_gradients(backbone, tiny_sam, real_images):
    images = [real_images["ihc"][:128, :128], real_images["microaneurysms"]]
    sam = tiny_sam.embed(images)  # [2, 256, 4, 4] through the frozen encoder
    pooled = window_pool(sam, window=2, pooling="avgmax")
    cfg = ClassifyConfig(
        data="x",
        method="slca",
        backbone=backbone,
        backbone_image_size=64,
        slca_reduction=32,
        slca_pooling="avgmax",
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3, sam_channels=256)
    stages = resolve_stages("all", stage_infos(model.backbone))
    assert len(model.slca) == len(stages) >= 3
    x = torch.randn(2, 3, 64, 64)
    logits = model(x, pooled)
    assert logits.shape == (2, 3)
    # SLCA is really in the forward path: other SAM features give other logits
    model.eval()
    assert not torch.allclose(model(x, pooled), model(x, pooled.flip(-1) * 3))
    model.train()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    backbone_grads = [p.grad for n, p in model.backbone.named_parameters() if p.grad is not None]
    slca_grads = [p.grad for p in model.slca.parameters() if p.grad is not None]
    assert len(backbone_grads) > 10 and any(float(g.abs().sum()) > 0 for g in backbone_grads)
    assert len(slca_grads) == len(list(model.slca.parameters())) and all(
        float(g.abs().sum()) > 0 for g in slca_grads
    )
    assert all(p.grad is None and not p.requires_grad for p in tiny_sam.module.parameters())
    assert model.attention_map(pooled).shape == (2, 2, 2)


def test_baseline_has_no_slca_and_ignores_sam():
    cfg = ClassifyConfig(data="x", method="baseline", backbone="resnet18", backbone_image_size=32)
    model = build_model(cfg, num_classes=2, sam_channels=0)
    assert not model.uses_sam and model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_stage_selection():
    stages = stage_infos(timm.create_model("resnet18", num_classes=2))
    assert [s.module for s in resolve_stages("all", stages)] == ["layer1", "layer2", "layer3", "layer4"]
    assert [s.module for s in resolve_stages("last", stages)] == ["layer4"]
    assert [s.module for s in resolve_stages("2,-1", stages)] == ["layer2", "layer4"]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_stages("7", stages)


def test_local_backbone_weights(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "resnet18.safetensors"))
    torch.save(
        {"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "r18.pth"
    )
    for name in ("resnet18.safetensors", "r18.pth"):
        model = build_backbone("resnet18", num_classes=3, image_size=64, weights=tmp_path / name)
        assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    with pytest.raises(CheckpointError, match="resnet18.safetensors.*does not fit backbone"):
        build_backbone("resnet50", num_classes=3, image_size=64, weights=tmp_path / "resnet18.safetensors")
    with pytest.raises(ConfigError, match="not_a_model"):
        build_backbone("not_a_model", num_classes=3, image_size=64)
