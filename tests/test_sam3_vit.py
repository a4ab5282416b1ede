"""SAM 3 image encoder: our module without the `sam3` package (identity against it: test_sam3_identity.py).

Checkpoints here are our own module's random weights saved in the official sam3.pt layout
(``{"model": {"detector.backbone.vision_backbone.trunk...": ...}}``, with the RoPE ``freqs_cis`` buffers, the
``sam2_convs`` neck and unrelated detector/tracker tensors the real file carries).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt.encoders import get_spec, load_encoder
from samadapt.encoders.preprocessing import preprocess_sam3
from samadapt.encoders.registry import ENCODERS, SAM_VIT_B, TINY_ARCHS
from samadapt.encoders.sam3_vit import Sam3ViTEncoder, rope_tables, select_sam3_encoder_state
from samadapt.errors import CheckpointError, ConfigError

TINY = TINY_ARCHS["sam3"]
PREFIX = "detector.backbone.vision_backbone."


def _random_encoder(img_size: int, seed: int = 0) -> Sam3ViTEncoder:
    torch.manual_seed(seed)
    enc = Sam3ViTEncoder(**TINY, img_size=img_size)
    with torch.no_grad():
        for p in enc.parameters():  # non-trivial values everywhere, including zero-initialised biases
            p.add_(torch.randn_like(p) * 0.05)
    return enc.eval()


def _save_official_layout(enc: Sam3ViTEncoder, path: Path) -> Path:
    """Our weights under the keys sam3.pt uses, plus what else the official file holds around them."""
    state = {PREFIX + k: v.clone() for k, v in enc.state_dict().items()}
    for i, block in enumerate(enc.trunk.blocks):
        state[f"{PREFIX}trunk.blocks.{i}.attn.freqs_cis"] = block.attn._rope.clone()
    state.update({PREFIX + "sam2_" + k: v.clone() for k, v in enc.convs.state_dict(prefix="convs.").items()})
    state["detector.transformer.decoder.norm.weight"] = torch.ones(256)
    state["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    torch.save({"model": state}, path)
    return path


def test_registry_entry_and_aliases() -> None:
    spec = ENCODERS["sam3"]
    assert spec.official_files == ("sam3.pt",) and spec.default_image_size == 1008
    assert spec.arch["embed_dim"] == 1024 and spec.arch["depth"] == 32 and spec.arch["patch_size"] == 14
    assert get_spec("sam3_vit") is spec and get_spec("facebook/sam3") is spec


def test_shapes_layers_and_padded_windows() -> None:
    enc = _random_encoder(112)
    assert enc.grid == 8
    with torch.no_grad():
        neck, extra = enc(torch.randn(2, 3, 112, 112), layers=[0, "3", "fpn0", "fpn1", "fpn2"])
    assert neck.shape == (2, 256, 8, 8)
    assert extra[0].shape == (2, 64, 8, 8) and extra["3"].shape == (2, 64, 8, 8)
    assert extra["fpn0"].shape == (2, 256, 32, 32) and extra["fpn1"].shape == (2, 256, 16, 16)
    assert torch.equal(extra["fpn2"], neck)
    for name in (0, "fpn0", "fpn1"):
        assert tuple(extra[name].shape[1:]) == enc.layer_shape(name)
    # 98 px: a 7 x 7 grid, not a multiple of the 4 x 4 window: padded windows, finite output
    with torch.no_grad():
        small, _ = _random_encoder(98)(torch.randn(1, 3, 98, 98))
    assert small.shape == (1, 256, 7, 7) and bool(torch.isfinite(small).all())
    with pytest.raises(ConfigError, match="unknown SAM 3 layer"):
        enc(torch.zeros(1, 3, 112, 112), layers=["fpn3"])
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        Sam3ViTEncoder(**TINY, img_size=100)


def test_rope_tables_follow_the_official_axial_layout() -> None:
    freqs = rope_tables(head_dim=8, side=3, theta=100.0, scale=0.5)
    assert freqs.shape == (9, 4) and freqs.dtype == torch.complex64
    # token 5 is (row 1, col 2): x angles use the column, y angles the row; frequencies theta^(-4i/dim)
    base = torch.tensor([1.0, 100.0 ** (-0.5)])
    torch.testing.assert_close(freqs[5].angle(), torch.cat([2 * 0.5 * base, 1 * 0.5 * base]))


def test_official_layout_loads_back(tmp_path: Path) -> None:
    enc = _random_encoder(112)
    path = _save_official_layout(enc, tmp_path / "sam3.pt")
    loaded = load_encoder("sam3", path, arch="tiny", image_size=112)
    assert loaded.embedding_grid == 8 and loaded.checkpoint == path
    for key, value in enc.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    out = loaded.embed([image, image[:, :, 0]], layers=["fpn1"])
    assert out["neck"].shape == (2, 256, 8, 8) and out["fpn1"].shape == (2, 256, 16, 16)
    with torch.no_grad():
        direct, _ = enc(torch.stack([preprocess_sam3(image, 112)[0]]))
    torch.testing.assert_close(out["neck"][:1], direct)
    # selection keeps exactly the encoder's tensors
    raw = torch.load(path, weights_only=True)["model"]
    assert set(select_sam3_encoder_state(raw)) == set(enc.state_dict())


def test_encoder_only_file_loads(tmp_path: Path) -> None:
    enc = _random_encoder(112)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, tmp_path / "sam3_encoder.safetensors")
    loaded = load_encoder("sam3", tmp_path / "sam3_encoder.safetensors", arch="tiny", image_size=112)
    assert torch.equal(loaded.module.trunk.pos_embed, enc.trunk.pos_embed)


def test_mismatch_errors_name_the_file_and_the_model(tmp_path: Path) -> None:
    sam3_file = _save_official_layout(_random_encoder(112), tmp_path / "sam3.pt")
    with pytest.raises(CheckpointError, match=r"sam3\.pt: holds a SAM 3 ViT image encoder \(embed dim 64, 4 "
                       r"blocks\); you asked for sam_vit_b$"):  # fmt: skip
        load_encoder("sam_vit_b", sam3_file)
    with pytest.raises(CheckpointError, match=r"holds a SAM 3 ViT image encoder \(embed dim 64, 4 blocks\); you "
                       r"asked for sam3 \(embed dim 1024, 32 blocks\)"):  # fmt: skip
        load_encoder("sam3", sam3_file)
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    vit_b = ImageEncoderViT(**{k: v for k, v in SAM_VIT_B.items()}, img_size=64)
    sam_file = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder." + k: v for k, v in vit_b.state_dict().items()}, sam_file)
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64\.pth: holds a SAM vit_b image encoder .*; "
                       r"you asked for sam3$"):  # fmt: skip
        load_encoder("sam3", sam_file)


def test_transformers_layout_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(
        {"vision_encoder.backbone.embeddings.patch_embeddings.projection.weight": torch.zeros(8, 3, 14, 14)},
        path,
    )
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: holds a Hugging Face transformers SAM 3 model"
    ):
        load_encoder("sam3", path)


def test_image_size_must_be_a_multiple_of_14() -> None:
    with pytest.raises(ConfigError, match="multiple of 14"):
        load_encoder("sam3", arch="tiny", image_size=1024)


def test_preprocessing_square_resize_to_minus_one_one() -> None:
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, 30:] = 255
    x, meta = preprocess_sam3(image, 56)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and type(x) is torch.Tensor
    assert meta.resized_size == (56, 56) and meta.original_size == (30, 60)
    assert x.min() == -1.0 and x.max() == 1.0
    grey, _ = preprocess_sam3(image[:, :, 0], 56)
    assert torch.equal(grey, x)


def test_bf16_is_close_to_fp32() -> None:
    enc = _random_encoder(112)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ref, _ = enc(x)
        fast, _ = enc.to(torch.bfloat16)(x.to(torch.bfloat16))
    err = (fast.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)


def test_embed_cli_stores_sam3_embeddings_and_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from samadapt.cli.main import main
    from samadapt.data.readers import read_dataset
    from samadapt.store import open_store

    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")
    }
    arrays.update({f"{s}_labels": rng.integers(0, 2, (2, 1)) for s in ("train", "val", "test")})
    np.savez(tmp_path / "tiny.npz", **arrays)
    ckpt = _save_official_layout(_random_encoder(112), tmp_path / "sam3.pt")
    flags = [
        "embed",
        "--encoder",
        "sam3",
        "--arch",
        "tiny",
        "--no-progress",
        "--data",
        str(tmp_path / "tiny.npz"),
    ]
    flags += ["--store", str(tmp_path / "cache"), "--encoder-image-size", "112", "--checkpoint", str(ckpt)]
    flags += ["--precision", "fp32", "--store-dtype", "float32"]  # exact comparison below
    assert main([*flags, "--layers", "3,fpn1"]) == 0
    assert "computed 6, reused 0" in capsys.readouterr().out
    encoder = load_encoder("sam3", ckpt, arch="tiny", image_size=112)
    dataset = read_dataset(str(tmp_path / "tiny.npz"))
    with open_store(tmp_path / "cache", create=False) as store:
        stored = store.view(encoder)[dataset.ids[4]]
        assert store.get_by_id(dataset.ids[4], encoder, "fpn1").shape == (256, 16, 16)
    np.testing.assert_allclose(stored, encoder.embed([dataset.image(4)])[0].numpy(), rtol=0, atol=1e-5)
