"""MedSAM2 (SAM 2.1 Hiera-T at 512 px) against the official `sam2` package, on random weights in the official file.

MedSAM2's own repository ships a top-level `sam2` that clashes with the official one, so the oracle is the official
`sam2` package built from its `sam2.1_hiera_t.yaml` with hydra overrides reproducing MedSAM2's
`sam2.1_hiera_t512.yaml` (image_size 512, the memory attention's RoPE grid 32x32; nothing else differs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.misc import load_video_frames_from_jpg_images

import samadapt
from samadapt.encoders.registry import ENCODERS
from samadapt.errors import CheckpointError
from samadapt.store import embed_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

MEDSAM2_512 = [
    "++model.image_size=512",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
]


@pytest.fixture(scope="module")
def medsam2_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random-weight official SAM 2.1 Hiera-T at 512 px, saved as MedSAM2 ships it: {"model": state_dict}."""
    torch.manual_seed(0)
    model = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", hydra_overrides_extra=MEDSAM2_512
    )
    assert model.image_size == 512
    with torch.no_grad():  # Hiera starts its position embeddings at zero: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_latest.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model.eval()


def test_registry_entry() -> None:
    spec = ENCODERS["medsam2"]
    assert spec.default_image_size == 512 and spec.preprocessing == "medsam2"
    assert spec.arch == ENCODERS["sam2_hiera_t"].arch
    assert spec.official_files[0] == "MedSAM2_latest.pt"


def test_preprocessing_equals_official_frame_loader(tmp_path: Path, real_images: dict) -> None:
    """MedSAM2 feeds frames through sam2's own loader (PIL resize to 512, /255, ImageNet mean/std)."""
    encoder = samadapt.load_encoder("medsam2", arch="tiny")
    for key in ("retina", "cell"):
        image = real_images[key]
        frames = tmp_path / key
        frames.mkdir()
        # the loader lists *.jpg names; PIL reads by content, so a lossless PNG under that name keeps pixels exact
        Image.fromarray(image).convert("RGB").save(frames / "0.jpg", format="PNG")
        official, _, _ = load_video_frames_from_jpg_images(
            str(frames), 512, offload_video_to_cpu=True, compute_device=torch.device("cpu")
        )
        ours, meta = encoder.preprocess(image)
        assert ours.dtype == official.dtype == torch.float32
        assert torch.equal(ours, official[0]), key
        assert meta.input_size == 512 and meta.original_size == image.shape[:2]


@pytest.mark.e2e
def test_embedding_equals_official_predictor_at_512(medsam2_file, real_images: dict) -> None:
    path, model = medsam2_file
    image = real_images["retina"]
    predictor = SAM2ImagePredictor(model)
    # The official predictor hard-codes the 1024-px feature grids; MedSAM2's copy of it derives them from
    # model.image_size (image_size // 4 halved per level), the one change needed at 512.
    predictor._bb_feat_sizes = [[model.image_size // 4 // 2**k] * 2 for k in range(3)]
    predictor.set_image(image)
    reference = predictor._features["image_embed"]
    high_res = predictor._features["high_res_feats"]
    encoder = samadapt.load_encoder("medsam2", checkpoint=path, precision="fp32")
    assert encoder.image_size == 512
    # the same input tensor through both: the module is the official computation at 512
    neck, extra = encoder.embed_tensor(predictor._transforms(image)[None], layers=["high_res0", "high_res1"])
    assert neck.shape == reference.shape == (1, 256, 32, 32)
    assert (neck - reference).abs().max() <= 1e-4 * reference.abs().max()
    for level in (0, 1):
        want = high_res[level]
        assert extra[f"high_res{level}"].shape == want.shape
        assert (extra[f"high_res{level}"] - want).abs().max() <= 1e-4 * want.abs().max()
    # embed(): MedSAM2's own preprocessing, then the same module
    got = encoder.embed([image])
    want, _ = encoder.embed_tensor(encoder.preprocess(image)[0][None])
    assert got.shape == (1, 256, 32, 32) and torch.equal(got, want)


def test_store_holds_medsam2_embeddings(real_images: dict, tmp_path: Path) -> None:
    encoder = samadapt.load_encoder("medsam2", arch="tiny")  # same builder and preprocessing, small trunk
    images = [real_images["microaneurysms"], real_images["ihc"]]
    table = embed_dataset(images, encoder, tmp_path / "store", progress=False, store_dtype="float32")  # exact
    neck = np.asarray(table["neck"])
    assert neck.shape == (2, 256, 32, 32)
    np.testing.assert_allclose(neck, encoder.embed(images).numpy(), rtol=0, atol=1e-6)
    assert encoder.cache_key_fields()["preprocessing"] == "medsam2"


@pytest.mark.e2e
def test_medsam2_file_works_as_the_automatic_masker(medsam2_file) -> None:
    from samadapt.encoders.masks import MaskerSettings, load_masker

    path, model = medsam2_file
    settings = MaskerSettings(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masker = load_masker("medsam2", path, settings=settings)
    assert masker.image_size == 512 and masker.model.image_size == 512
    saved = model.state_dict()
    assert all(torch.equal(masker.model.state_dict()[k], saved[k]) for k in saved)
    image = np.zeros((40, 60), np.uint8)
    image[10:30, 15:45] = 200
    masks = masker(image)
    assert masks.masks.shape[1:] == (40, 60)


def test_other_checkpoints_are_named(tmp_path: Path) -> None:
    small = tmp_path / "sam2.1_hiera_small.pt"
    torch.manual_seed(0)
    torch.save(
        {
            "model": build_sam2(
                "configs/sam2.1/sam2.1_hiera_s.yaml", ckpt_path=None, device="cpu"
            ).state_dict()
        },
        small,
    )
    with pytest.raises(
        CheckpointError, match=r"sam2\.1_hiera_small\.pt: holds sam2_hiera_s.*asked for medsam2"
    ):
        samadapt.load_encoder("medsam2", checkpoint=small)
    medsam = tmp_path / "medsam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, medsam)
    with pytest.raises(CheckpointError, match=r"medsam_vit_b\.pth: holds a SAM vit_b image encoder.*medsam2"):
        samadapt.load_encoder("medsam2", checkpoint=medsam)
