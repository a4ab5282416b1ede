"""Our preprocessing equals each checkpoint's official preprocessing, on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.encoders.preprocessing import PREPROCESSORS, longest_side_shape
from samadapt.errors import DataError


@pytest.mark.parametrize("name", ["retina", "cell", "microaneurysms"])
def test_sam_preprocessing_matches_official(real_images, name):
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    img = real_images[name]
    rgb = img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)
    resized = ResizeLongestSide(1024).apply_image(rgb)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]

    class _Fake:  # Sam.preprocess reads only these attributes
        pixel_mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
        pixel_std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)

        class image_encoder:  # noqa: N801
            img_size = 1024

    expected = Sam.preprocess(_Fake(), x)[0]
    ours, meta = PREPROCESSORS["sam"](img, 1024)
    assert ours.shape == (3, 1024, 1024) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    assert meta.resized_size == tuple(resized.shape[:2])


def test_longest_side_rounding_matches_official():
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(1, 1000), (333, 777), (1024, 1024), (2000, 15), (102, 102)]:
        assert longest_side_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


@pytest.mark.parametrize("name", ["retina", "cell"])
def test_sam2_preprocessing_matches_official(real_images, name):
    from sam2.utils.transforms import SAM2Transforms

    img = real_images[name]
    rgb = img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)
    expected = SAM2Transforms(resolution=1024, mask_threshold=0.0)(rgb)
    ours, _ = PREPROCESSORS["sam2"](img, 1024)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_medsam_preprocessing_matches_official_script(real_images):
    from skimage import transform

    img = real_images["cell"]
    # MedSAM_Inference.py, verbatim in effect:
    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    img_1024 = transform.resize(
        img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True
    ).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    expected = torch.tensor(img_1024).float().permute(2, 0, 1)
    ours, _ = PREPROCESSORS["medsam"](img, 1024)
    assert torch.equal(ours, expected)
    assert float(ours.min()) == 0.0 and float(ours.max()) == 1.0


def test_small_image_size_and_bad_inputs(real_images):
    out, meta = PREPROCESSORS["sam"](real_images["ihc"], 256)
    assert out.shape == (3, 256, 256) and meta.input_size == 256
    with pytest.raises(DataError, match="uint8"):
        PREPROCESSORS["sam"](np.zeros((8, 8), dtype=np.float32), 256)
    with pytest.raises(DataError, match="shape"):
        PREPROCESSORS["sam2"](np.zeros((8, 8, 4), dtype=np.uint8), 256)
