"""MobileSAM encoder (timm TinyViT + MobileSAM's changes) against the MobileSAM reference code.

The oracle is `mobile_sam` from the PyPI package `mobilesam-mirror` (a packaging of the official MobileSAM repository;
MobileSAM itself is not on PyPI). Those tests skip where it is not installed.
"""

from __future__ import annotations

import pytest
import skimage.data
import torch

from samadapt.encoders.mobilesam import MobileSamEncoder, select_mobilesam_encoder_state
from samadapt.encoders.registry import TINY_ARCHS
from samadapt.errors import CheckpointError, ConfigError

# Tiny: the official code needs last dim 320 (its stride-1 rule) and a 1024 input (fixed 64x64 reshape).
TINY = TINY_ARCHS["mobilesam"]


def _perturb(model: torch.nn.Module) -> None:
    """Random weights everywhere, including zero-initialised biases and BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.rand_like(b) + 0.5)
    model.eval()  # MobileSAM caches its attention biases when eval() is called: after the weights are final


def test_shapes_and_layers_at_other_sizes() -> None:
    torch.manual_seed(0)
    enc = MobileSamEncoder(**TINY, img_size=128).eval()
    with torch.no_grad():
        neck, layers = enc(torch.randn(2, 3, 128, 128), layers=[0, 3])
    assert neck.shape == (2, 256, 8, 8)
    assert layers[0].shape == (2, 16, 32, 32) and layers[3].shape == (2, 320, 8, 8)
    with pytest.raises(ConfigError, match="unknown MobileSAM layers"):
        enc(torch.zeros(1, 3, 128, 128), layers=[4])
    with pytest.raises(ConfigError, match="multiple of 16"):
        MobileSamEncoder(**TINY, img_size=1000)


def test_select_rejects_other_checkpoints() -> None:
    sam2_like = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}
    with pytest.raises(CheckpointError, match=r"x\.pt: expected a MobileSAM state dict"):
        select_mobilesam_encoder_state(sam2_like, source="x.pt")


def test_tiny_trunk_and_neck_match_reference() -> None:
    modeling = pytest.importorskip("mobile_sam.modeling")
    torch.manual_seed(0)
    lists = {k: list(v) for k, v in TINY.items() if isinstance(v, tuple)}
    scalars = {k: v for k, v in TINY.items() if not isinstance(v, tuple) and k != "out_chans"}
    official = modeling.TinyViT(img_size=1024, num_classes=1000, drop_path_rate=0.0, **lists, **scalars)
    _perturb(official)
    state = {"image_encoder." + k: v for k, v in official.state_dict().items()}
    enc = MobileSamEncoder(**TINY).eval()
    enc.load_state_dict(select_mobilesam_encoder_state(state), strict=True)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        want = official(x)
        got, _ = enc(x)
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.e2e
def test_vit_t_embedding_matches_reference_predictor(tmp_path) -> None:
    import samadapt

    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(0)
    model = mobile_sam.sam_model_registry["vit_t"]()
    _perturb(model)
    path = tmp_path / "mobile_sam.pt"
    torch.save(model.state_dict(), path)  # the official release is a flat state dict
    image = skimage.data.retina()
    predictor = mobile_sam.SamPredictor(model)
    predictor.set_image(image)
    enc = samadapt.load_encoder("mobilesam_vit_t", checkpoint=path, precision="fp32")
    got = enc.embed([image])
    want = predictor.features
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(CheckpointError, match=r"mobile_sam\.pt: holds a MobileSAM TinyViT image encoder"):
        samadapt.load_encoder("sam_vit_b", checkpoint=path)
