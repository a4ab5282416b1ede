"""SAM 2 automatic masks through the official sam2 package: strict loading of {"model": ...} files, SAM 2 vs 2.1,
masks at the image's resolution, zero masks, and the per-image cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.encoders.masks import MaskerSettings, Masks, load_masker, write_tiny_sam2
from samadapt.errors import CheckpointError

PERMISSIVE = MaskerSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    return write_tiny_sam2(tmp_path_factory.mktemp("sam2") / "tiny_sam2.1.pt")


def _image(h=48, w=72, rgb=False):
    rng = np.random.default_rng(1)
    image = (rng.random((h, w)) * 40).astype(np.uint8)
    image[10:30, 20:50] = 230
    return np.repeat(image[:, :, None], 3, axis=2) if rgb else image


def test_loads_official_file_strictly_and_detects_version(sam2_file, tmp_path):
    masker = load_masker("sam2_hiera_t", sam2_file, arch="tiny", image_size=128, settings=PERMISSIVE)
    saved = torch.load(sam2_file, weights_only=True)["model"]
    own = masker.model.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)
    assert "no_obj_embed_spatial" in saved  # a SAM 2.1 file
    old = write_tiny_sam2(tmp_path / "tiny_sam2.0.pt", version="2.0")
    old_masker = load_masker("sam2_hiera_t", old, arch="tiny", image_size=128, settings=PERMISSIVE)
    assert "no_obj_embed_spatial" not in old_masker.model.state_dict()
    assert (
        masker.cache_key_fields()["checkpoint_sha256"] != old_masker.cache_key_fields()["checkpoint_sha256"]
    )


def test_masks_have_the_image_resolution_and_are_cached(sam2_file, tmp_path):
    masker = load_masker(
        "sam2_hiera_t",
        sam2_file,
        arch="tiny",
        image_size=128,
        settings=PERMISSIVE,
        cache_dir=tmp_path / "cache",
    )
    image = _image()
    first = masker(image)
    assert len(first) >= 1  # seeded random weights with permissive thresholds give some masks
    assert first.masks.shape[1:] == (48, 72) and first.masks.dtype == bool
    assert len(first.scores) == len(first.areas) == len(first)
    assert list(first.areas) == sorted(first.areas, reverse=True)
    assert np.array_equal(first.areas, first.masks.sum(axis=(1, 2)))
    assert masker(_image(rgb=False)).masks.shape == first.masks.shape and (masker.hits, masker.misses) == (
        1,
        1,
    )
    np.testing.assert_array_equal(masker(image).masks, first.masks)
    entries = list((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 1
    # another setting is another entry; a corrupt entry is recomputed
    other = load_masker(
        "sam2_hiera_t", sam2_file, arch="tiny", image_size=128, cache_dir=tmp_path / "cache",
        settings=MaskerSettings(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    )  # fmt: skip
    assert other.key(image) != masker.key(image)
    entries[0].write_bytes(b"garbage")
    np.testing.assert_array_equal(masker(image).masks, first.masks)
    assert masker.misses == 2
    rgb = masker(_image(rgb=True))
    assert rgb.masks.shape[1:] == (48, 72)


def test_zero_masks_are_an_empty_result(sam2_file):
    strict = MaskerSettings(points_per_side=2, pred_iou_thresh=1.01)
    masks = load_masker("sam2_hiera_t", sam2_file, arch="tiny", image_size=128, settings=strict)(_image())
    assert len(masks) == 0 and masks.masks.shape == (0, 48, 72)
    round_trip = Masks.from_bytes(masks.to_bytes())
    assert round_trip.masks.shape == (0, 48, 72)


def test_wrong_checkpoints_name_file_and_architecture(sam2_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"tiny_sam2\.1\.pt.*expects embed dim 96"):
        load_masker("sam2_hiera_t", sam2_file, image_size=128)
    clip_like = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, clip_like)
    with pytest.raises(CheckpointError, match=r"clip\.pt: expected a SAM 2 model.*CLIP"):
        load_masker("sam2_hiera_t", clip_like, arch="tiny")
