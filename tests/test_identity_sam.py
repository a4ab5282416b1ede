"""Acceptance: load_encoder on an official-format vit_b checkpoint gives the official code's embeddings.

A random-weight ``sam_model_registry["vit_b"]()`` (with its zero-initialised position tables made random, so they
count) is saved as the official flat ``.pth``; samadapt loads that file and embeds real scikit-image images, and the
official ``SamPredictor`` / MedSAM inference code is the oracle. Each full-size official forward takes ~17 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from samadapt.encoders import load_encoder

pytestmark = pytest.mark.e2e


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def official_sam(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)  # the official release format: a flat state dict
    return sam, path


def grey_as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2)


def test_sam_vit_b_matches_official_predictor(official_sam, real_images) -> None:
    sam, path = official_sam
    predictor = SamPredictor(sam)
    ours = load_encoder("sam_vit_b", checkpoint=path, precision="fp32")
    ours_bf16 = load_encoder("sam_vit_b", checkpoint=path, precision="bf16")
    for name in ("retina", "cell"):  # RGB fundus photo, and a grey microscopy image
        image = real_images[name]
        predictor.set_image(image if image.ndim == 3 else grey_as_rgb(image))
        ref = predictor.features
        got = ours.embed([image])
        assert got.shape == ref.shape == (1, 256, 64, 64)
        assert rel_err(got, ref) <= 1e-4, name
        if name == "retina":
            got_bf16 = ours_bf16.embed([image])
            assert got_bf16.dtype == torch.float32
            assert rel_err(got_bf16, ref) <= 2e-2


def test_medsam_matches_official_inference_script(official_sam, real_images) -> None:
    from skimage import transform

    sam, path = official_sam
    image = real_images["ihc"]
    # MedSAM_Inference.py, verbatim apart from names.
    img_3c = image if image.ndim == 3 else grey_as_rgb(image)
    img_1024 = transform.resize(
        img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True
    ).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    tensor = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        ref = sam.image_encoder(tensor)
    got = load_encoder("medsam_vit_b", checkpoint=path, precision="fp32").embed([image])
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-4
