"""LiteMedSAM (TinyViT distilled from MedSAM, 256 px) against its published architecture on random weights.

LiteMedSAM is not on PyPI. Its `tiny_vit_sam.py` (MedSAM repository, LiteMedSAM branch) is MobileSAM's file with one
architectural change: the patch embedding's two `Conv2d_BN` are 1x1 / stride 1 / no padding instead of 3x3 / stride 2
(it also drops the unused classifier head). So the oracle is the official MobileSAM `TinyViT` from `mobile_sam`
(PyPI `mobilesam-mirror`) with exactly that change, built with LiteMedSAM's numbers: its `img_size=256` with an
un-strided patch embedding means 256 x 256 first-stage tokens, which is MobileSAM's `img_size=1024` grid, and its
forward's fixed 64 x 64 reshape then holds for a 256 input. The model is saved whole, as `lite_medsam.pth` is (a flat
state dict with `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import samadapt
from samadapt.encoders.mobilesam import MobileSamEncoder, select_mobilesam_encoder_state
from samadapt.encoders.registry import ENCODERS, TINY_ARCHS
from samadapt.errors import CheckpointError
from samadapt.store import embed_dataset

cv2 = pytest.importorskip("cv2")
modeling = pytest.importorskip("mobile_sam.modeling")


def _official_litemedsam_tinyvit(arch: dict) -> torch.nn.Module:
    """mobile_sam's TinyViT with LiteMedSAM's patch embedding (1x1 stride-1 Conv2d_BN pair)."""
    from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN

    lists = {k: list(v) for k, v in arch.items() if isinstance(v, tuple)}
    scalars = {
        k: v
        for k, v in arch.items()
        if not isinstance(v, tuple) and k not in ("out_chans", "patch_embed_stride")
    }
    # img_size=1024 here gives patches_resolution 256, i.e. LiteMedSAM's img_size=256 with its un-strided embedding
    model = modeling.TinyViT(img_size=1024, num_classes=1000, drop_path_rate=0.0, **lists, **scalars)
    n = arch["embed_dims"][0]
    model.patch_embed.seq[0] = Conv2d_BN(3, n // 2, 1, 1, 0)
    model.patch_embed.seq[2] = Conv2d_BN(n // 2, n, 1, 1, 0)
    del model.head, model.norm_head  # LiteMedSAM's TinyViT has no classifier
    return model


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
    model.eval()  # the official Attention caches its biases on eval(): after the weights are final


def _lite_medsam_file(path: Path, arch: dict, seed: int = 0) -> torch.nn.Module:
    """The whole LiteMedSAM model (encoder + MobileSAM prompt encoder and mask decoder at 256) as a flat state dict."""
    torch.manual_seed(seed)
    encoder = _official_litemedsam_tinyvit(arch)
    _perturb(encoder)
    prompt = modeling.PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()})
    torch.save(state, path)
    return encoder


def _litemedsam_reference_preprocess(img_3c: np.ndarray, size: int = 256) -> torch.Tensor:
    """CVPR24_LiteMedSAM_infer.py's steps: resize_longest_side (INTER_AREA), min-max, pad_image, to tensor."""
    oldh, oldw = img_3c.shape[:2]
    scale = size * 1.0 / max(oldh, oldw)
    neww, newh = int(oldw * scale + 0.5), int(oldh * scale + 0.5)
    img = cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    img = np.pad(img, ((0, size - newh), (0, size - neww), (0, 0)))
    return torch.tensor(img).float().permute(2, 0, 1)


def test_registry_entry() -> None:
    spec = ENCODERS["litemedsam_vit_t"]
    assert spec.default_image_size == 256 and spec.official_files == ("lite_medsam.pth",)
    assert spec.arch["patch_embed_stride"] == 1 and spec.preprocessing == "litemedsam"


def test_preprocessing_equals_litemedsam_script(real_images: dict) -> None:
    encoder = samadapt.load_encoder("litemedsam_vit_t", arch="tiny")
    for key in ("retina", "cell", "microaneurysms"):
        image = real_images[key]
        rgb = (
            image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        )  # the npz inputs are HxWx3
        ours, meta = encoder.preprocess(image)
        assert torch.equal(ours, _litemedsam_reference_preprocess(rgb)), key
        assert meta.input_size == 256 and max(meta.resized_size) == 256


def test_tiny_encoder_matches_reference() -> None:
    tiny = TINY_ARCHS["litemedsam"]
    torch.manual_seed(0)
    official = _official_litemedsam_tinyvit(tiny)
    _perturb(official)
    state = {"image_encoder." + k: v for k, v in official.state_dict().items()}
    enc = MobileSamEncoder(**tiny, img_size=256).eval()
    enc.load_state_dict(select_mobilesam_encoder_state(state), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        want = official(x)
        got, _ = enc(x)
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.e2e
def test_lite_medsam_file_embedding_matches_reference(tmp_path: Path, real_images: dict) -> None:
    path = tmp_path / "lite_medsam.pth"
    official = _lite_medsam_file(path, ENCODERS["litemedsam_vit_t"].arch)
    image = real_images["retina"]
    with torch.no_grad():
        want = official(_litemedsam_reference_preprocess(image)[None])
    encoder = samadapt.load_encoder("litemedsam_vit_t", checkpoint=path, precision="fp32")
    out = encoder.embed([image], layers=[0, 3])
    got = out["neck"]
    assert encoder.embedding_grid == 64
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert out["0"].shape == (1, 64, 256, 256) and out["3"].shape == (1, 320, 64, 64)


def test_mismatched_checkpoints_are_named(tmp_path: Path) -> None:
    lite = tmp_path / "lite_medsam.pth"
    _lite_medsam_file(lite, TINY_ARCHS["litemedsam"])
    with pytest.raises(
        CheckpointError, match=r"lite_medsam\.pth: holds a LiteMedSAM TinyViT.*mobilesam_vit_t"
    ):
        samadapt.load_encoder("mobilesam_vit_t", checkpoint=lite, arch="tiny")
    with pytest.raises(CheckpointError, match=r"lite_medsam\.pth: holds a LiteMedSAM TinyViT.*sam_vit_b"):
        samadapt.load_encoder("sam_vit_b", checkpoint=lite)
    mobile = tmp_path / "mobile_sam.pt"
    torch.manual_seed(0)
    official = modeling.TinyViT(img_size=1024, num_classes=1000, **{
        k: list(v) if isinstance(v, tuple) else v
        for k, v in TINY_ARCHS["mobilesam"].items() if k != "out_chans"
    })  # fmt: skip
    torch.save({f"image_encoder.{k}": v for k, v in official.state_dict().items()}, mobile)
    with pytest.raises(CheckpointError, match=r"mobile_sam\.pt: holds a MobileSAM TinyViT.*litemedsam_vit_t"):
        samadapt.load_encoder("litemedsam_vit_t", checkpoint=mobile, arch="tiny")
    medsam = tmp_path / "medsam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, medsam)
    with pytest.raises(
        CheckpointError, match=r"medsam_vit_b\.pth: holds a SAM vit_b image encoder.*litemedsam"
    ):
        samadapt.load_encoder("litemedsam_vit_t", checkpoint=medsam)


def test_store_holds_litemedsam_embeddings(tmp_path: Path, real_images: dict) -> None:
    path = tmp_path / "lite_medsam.pth"
    _lite_medsam_file(path, TINY_ARCHS["litemedsam"])
    # a smaller input keeps the test fast; the grid is S / 4 (64 x 64 at the default 256)
    encoder = samadapt.load_encoder("litemedsam_vit_t", checkpoint=path, arch="tiny", image_size=128)
    images = [real_images["microaneurysms"], real_images["cell"]]
    table = embed_dataset(images, encoder, tmp_path / "store", progress=False, store_dtype="float32")  # exact
    neck = np.asarray(table["neck"])
    assert neck.shape == (2, 256, 32, 32)
    np.testing.assert_allclose(neck, encoder.embed(images).numpy(), rtol=0, atol=1e-6)
    assert encoder.cache_key_fields()["preprocessing"] == "litemedsam"
