"""Segmentation at AutoSAM's reference operating point: augmentation, mask tokens, splits, the U-Net's input size."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from samadapt.data.volumes import patient_splits, split_patients, training_subset
from samadapt.errors import ConfigError
from samadapt.tasks.segment.augment import (
    AUGMENTATIONS,
    RandReferenceSpatiald,
    gaussian_smoothing_matrix,
    get_augmentation,
    reference_augment,
)
from samadapt.tasks.segment.autosam import AutoSamHead
from samadapt.tasks.segment.heads import build_head, input_size
from samadapt.tasks.segment.slices import augment_pair, loss_grid, unet_input

OFF = {
    "p_brightness": 0.0,
    "p_gamma": 0.0,
    "p_noise": 0.0,
    "p_mirror": 0.0,
    "p_elastic": 0.0,
    "p_rotation": 0.0,
    "p_scale": 0.0,
}


def _slice(side: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth grey image (values 40-215) with a 3-structure label map, not symmetric under flips."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    image = np.rint(40 + 175 * (0.6 * xx + 0.4 * yy**2)).astype(np.uint8)
    image = np.clip(image.astype(int) + np.random.default_rng(seed).integers(-3, 4, image.shape), 0, 255)
    label = np.zeros((side, side), dtype=np.uint8)
    label[side // 5 : side // 2, side // 6 : side // 2] = 1
    label[side // 2 : 4 * side // 5, side // 3 : 3 * side // 4] = 2
    label[side // 8 : side // 4, 2 * side // 3 : 5 * side // 6] = 5
    return image.astype(np.uint8), label


# --- augmentation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [64, 97])
def test_reference_augment_keeps_shapes_types_and_label_values(side: int) -> None:
    image, label = _slice(side)
    for seed in range(12):
        img, lab = reference_augment(image, label, np.random.default_rng(seed))
        assert img.shape == image.shape and lab.shape == label.shape
        assert img.dtype == np.uint8 and lab.dtype == label.dtype
        assert set(np.unique(lab)) <= set(np.unique(label)), "a label value was blended"


def test_reference_augment_is_deterministic_given_the_rng() -> None:
    image, label = _slice()
    a = reference_augment(image, label, np.random.default_rng([3, 7]))
    b = reference_augment(image, label, np.random.default_rng([3, 7]))
    c = reference_augment(image, label, np.random.default_rng([3, 8]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # the light augmentation, kept under its name, is deterministic too
    assert AUGMENTATIONS["light"] is augment_pair
    d = augment_pair(image, label, np.random.default_rng(1))
    e = augment_pair(image, label, np.random.default_rng(1))
    assert np.array_equal(d[0], e[0]) and np.array_equal(d[1], e[1])


def test_with_every_probability_zero_the_slice_is_unchanged() -> None:
    image, label = _slice()
    img, lab = reference_augment(image, label, np.random.default_rng(0), **OFF)
    assert np.array_equal(img, image) and np.array_equal(lab, label)
    img, lab = AUGMENTATIONS["none"](image, label, np.random.default_rng(0))
    assert img is image and lab is label


def test_mirror_flips_the_columns_of_image_and_label() -> None:
    image, label = _slice()
    img, lab = reference_augment(image, label, np.random.default_rng(0), **{**OFF, "p_mirror": 1.0})
    assert np.array_equal(img, image[:, ::-1]) and np.array_equal(lab, label[:, ::-1])


@pytest.mark.parametrize("step", ["p_brightness", "p_gamma", "p_noise"])
def test_each_intensity_step_changes_the_image_only(step: str) -> None:
    image, label = _slice()
    changed = 0
    for seed in range(4):
        img, lab = reference_augment(image, label, np.random.default_rng(seed), **{**OFF, step: 1.0})
        assert np.array_equal(lab, label)
        changed += int(np.abs(img.astype(int) - image.astype(int)).max() >= 2)
    assert changed >= 3


@pytest.mark.parametrize("step", ["p_elastic", "p_rotation", "p_scale"])
def test_each_spatial_step_moves_image_and_label_together(step: str) -> None:
    image, label = _slice(side=128)
    for seed in range(3):
        img, lab = reference_augment(image, label, np.random.default_rng(seed), **{**OFF, step: 1.0})
        assert not np.array_equal(img, image)
        assert set(np.unique(lab)) <= set(np.unique(label))
    if step != "p_elastic":  # the reference elastic field moves pixels by ~0.1-1 px only
        assert not np.array_equal(lab, label)


def test_gaussian_smoothing_matrix_is_scipys_constant_mode_filter() -> None:
    noise = np.random.default_rng(0).random((70, 70)) * 2 - 1
    for sigma in (3.3, 17.0, 40.0):
        m = gaussian_smoothing_matrix(70, sigma)
        np.testing.assert_allclose(
            m @ noise @ m.T, gaussian_filter(noise, sigma, mode="constant", cval=0), atol=1e-12
        )


def test_spatial_coordinates_follow_batchgenerators() -> None:
    """Scale and rotation about the centre as batchgenerators' augment_spatial; the elastic field's size."""
    n = 50
    t = RandReferenceSpatiald()
    t.elastic, t.rotation, t.zoom = None, None, 1.5
    centre = (n - 1) / 2
    mesh = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij")).astype(float)
    np.testing.assert_allclose(t.coordinates(n), (mesh - centre) * 1.5 + centre)
    t.zoom, t.rotation = None, 0.1
    flat = (mesh - centre).reshape(2, -1)
    rot = np.array([[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]])
    expected = np.dot(flat.T, rot).T.reshape(mesh.shape) + centre  # rotate_coords_2d
    np.testing.assert_allclose(t.coordinates(n), expected)
    # scale draws: half below 1 (0.5-1), half above (1-1.9), as batchgenerators
    t = RandReferenceSpatiald(p_elastic=0.0, p_rotation=0.0, p_scale=1.0)
    t.set_random_state(seed=0)
    zooms = []
    for _ in range(400):
        t.randomize()
        zooms.append(t.zoom)
    zooms = np.array(zooms)
    assert zooms.min() >= 0.5 and zooms.max() <= 1.9
    assert 0.4 < (zooms < 1).mean() < 0.6
    # elastic offsets on the 224 grid: alpha * gaussian_filter(U(-1, 1)); scaled with the side
    for side in (224, 448):
        t = RandReferenceSpatiald(p_elastic=1.0, p_rotation=0.0, p_scale=0.0)
        t.set_random_state(seed=1)
        t.randomize()
        a, s, noise = t.elastic
        offsets = t.coordinates(side) - np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"))
        assert noise.shape == (2, 224, 224)  # drawn on the reference grid whatever the side
        reference = np.stack([gaussian_filter(noise[d], s, mode="constant") * a for d in range(2)])
        if side == 224:
            np.testing.assert_allclose(offsets, reference, atol=1e-9)
        else:  # the same field resized: pixel 2i+1 lies a quarter pixel from pixel i; x2 in size
            np.testing.assert_allclose(
                offsets[:, 1::2, 1::2][:, 1:-1, 1:-1] / 2,
                reference[:, 1:-1, 1:-1],
                rtol=0.05,
                atol=0.05 * np.abs(reference).max(),
            )
        assert 0.05 * side / 224 < offsets.std() < 1.5 * side / 224


def test_zero_deformation_is_the_identity_unlike_monais_elastic_grid() -> None:
    """Why the spatial step is ours: MONAI's Rand2DElastic moves pixels at magnitude 0 (bicubic control grid)."""
    from monai.transforms import Rand2DElastic

    n = 224
    ramp = np.tile(np.arange(n, dtype=np.float32), (n, 1))[None]  # value = column index
    ours = RandReferenceSpatiald(alpha=(0.0, 0.0), p_elastic=1.0, p_rotation=0.0, p_scale=0.0)
    ours.set_random_state(seed=0)
    out = ours({"image": ramp, "label": np.zeros((1, n, n), dtype=np.uint8)})["image"]
    np.testing.assert_allclose(out, ramp, atol=1e-4)
    monai = Rand2DElastic(spacing=56, magnitude_range=(0.0, 0.0), prob=1.0, padding_mode="border")
    moved = np.asarray(monai(torch.from_numpy(ramp)))[0] - ramp[0]
    assert np.abs(moved[20:-20, 20:-20]).max() > 1.0  # pixels, more than the reference field's typical offset


def test_cached_views_with_the_reference_augmentation_are_reproducible() -> None:
    from samadapt.tasks.segment.slices import SliceSet, augmented_views

    pairs = [_slice(side=64, seed=s) for s in range(2)]
    slices = SliceSet(
        images=[p[0] for p in pairs], labels=[p[1] for p in pairs], case_index=[0, 0], z=[0, 1],
        cases=[type("Case", (), {"id": "patient001_frame01"})()], volumes=[],
    )  # fmt: skip
    a = augmented_views(slices, views=2, seed=5, augment=reference_augment)
    b = augmented_views(slices, views=2, seed=5, augment=reference_augment)
    assert a[2] == [[0, 1, 2], [3, 4, 5]] and a[3][1] == "patient001_frame01#z0#view1"
    assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert np.array_equal(a[0][0], pairs[0][0]) and not np.array_equal(a[0][1], pairs[0][0])
    assert not np.array_equal(a[0][1], a[0][2])


def test_unknown_augmentation_is_a_config_error() -> None:
    assert get_augmentation("reference") is reference_augment
    with pytest.raises(ConfigError, match="unknown augmentation 'strong'"):
        get_augmentation("strong")


def test_reference_augment_speed_per_slice(capsys: pytest.CaptureFixture[str]) -> None:
    image, label = _slice(side=224)
    reference_augment(image, label, np.random.default_rng(0))
    start = time.perf_counter()
    for seed in range(5):
        reference_augment(image, label, np.random.default_rng(seed))
    per_slice = (time.perf_counter() - start) / 5
    with capsys.disabled():
        print(f"\nreference_augment: {1000 * per_slice:.1f} ms per 224 x 224 slice")
    assert per_slice < 5.0


# --- AutoSAM head: token layout -------------------------------------------------------------------------------


def _paper_autosam(head: AutoSamHead, embeddings: torch.Tensor) -> torch.Tensor:
    """AutoSAM from the paper's description, one image and one class at a time.

    Per class c the tokens are [iou_c, mask_c1, mask_c2]; the two-way transformer runs once per class on the
    image embedding (plus SAM's no-mask embedding); the first mask token goes through hypernetwork MLP 0 and
    is dotted with the upscaled image embedding."""
    b, d, h, w = embeddings.shape
    k = head.mask_tokens_per_class
    out = torch.zeros(b, head.num_classes, 4 * h, 4 * w)
    pos = head.pe_layer((h, w))[None]
    for i in range(b):
        src = embeddings[i : i + 1] + head.no_mask_embed.weight.reshape(1, d, 1, 1)
        for c in range(head.num_classes):
            tokens = torch.stack(
                [head.iou_token.weight[c], *[head.mask_tokens.weight[c * k + j] for j in range(k)]]
            )[None]
            hs, keys = head.transformer(src, pos, tokens)
            upscaled = head.output_upscaling(keys.transpose(1, 2).reshape(1, d, h, w))[0]
            weights = head.output_hypernetworks_mlps[0](hs[0, 1])  # the first mask token
            out[i, c] = torch.einsum("c,chw->hw", weights, upscaled)
    return out


def test_autosam_head_has_two_mask_tokens_per_class_and_uses_the_first() -> None:
    torch.manual_seed(0)
    head = AutoSamHead(num_classes=3, transformer_dim=32, num_heads=2, mlp_dim=64).eval()
    assert head.mask_tokens_per_class == 2
    assert head.mask_tokens.weight.shape == (6, 32) and head.iou_token.weight.shape == (3, 32)
    assert len(head.output_hypernetworks_mlps) == 2
    emb = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        ours = head(emb)
        assert ours.shape == (2, 3, 20, 20)
        torch.testing.assert_close(ours, _paper_autosam(head, emb), rtol=1e-4, atol=1e-5)
        # class 1's second token (row 3) changes class 1 only: the rows are [c0m1, c0m2, c1m1, c1m2, ...]
        head.mask_tokens.weight[3] += 1.0
        moved = head(emb)
    assert not torch.allclose(moved[:, 1], ours[:, 1])
    torch.testing.assert_close(moved[:, [0, 2]], ours[:, [0, 2]])


def test_iou_tokens_stay_frozen_as_in_the_reference_unless_asked() -> None:
    torch.manual_seed(0)
    head = AutoSamHead(num_classes=2, transformer_dim=32, num_heads=2, mlp_dim=64)
    before = head.iou_token.weight.detach().clone()
    optimizer = torch.optim.Adam((p for p in head.parameters() if p.requires_grad), lr=1e-2)
    head(torch.randn(1, 32, 4, 4)).square().mean().backward()
    optimizer.step()
    assert head.iou_token.weight.grad is None and torch.equal(head.iou_token.weight, before)
    assert head.mask_tokens.weight.grad is not None
    assert build_head("autosam", num_classes=2, learn_iou_token=True).iou_token.weight.requires_grad


def test_build_head_passes_mask_tokens_per_class_through() -> None:
    assert build_head("autosam", num_classes=4).mask_tokens.weight.shape == (8, 256)
    assert build_head("autosam", num_classes=4, mask_tokens_per_class=1).mask_tokens.weight.shape == (4, 256)
    assert build_head("autosam", num_classes=2, mask_tokens_per_class=3).mask_tokens.weight.shape == (6, 256)
    assert (
        build_head("cnn", num_classes=2, mask_tokens_per_class=3) is not None
    )  # ignored by token-free heads
    with pytest.raises(ConfigError, match="mask_tokens_per_class"):
        build_head("autosam", num_classes=2, mask_tokens_per_class=0)


# --- splits -----------------------------------------------------------------------------------------------------


def test_training_seeds_share_val_and_test_patients_and_subsets_nest() -> None:
    patients = [f"patient{i:03d}" for i in range(1, 41)]
    subsets: dict[int, list[list[str]]] = {}
    held_out = []
    for seed in (0, 1, 2):
        splits = patient_splits(list(reversed(patients)) if seed % 2 else patients, split_seed=11)
        held_out.append((splits["val"], splits["test"]))
        assert splits == split_patients(patients, seed=11)
        subsets[seed] = [
            training_subset(splits["train"], n, seed=seed) for n in (1, 2, 5, 10, len(splits["train"]))
        ]
        for small, large in zip(subsets[seed], subsets[seed][1:]):
            assert large[: len(small)] == small  # nested: smaller budgets inside larger ones
        assert set(subsets[seed][-1]) == set(splits["train"])
        assert not set(subsets[seed][-1]) & (set(splits["val"]) | set(splits["test"]))
    assert held_out[0] == held_out[1] == held_out[2]
    assert subsets[0][2] != subsets[1][2]  # the training seed picks which training patients
    assert patient_splits(patients, split_seed=12)["test"] != held_out[0][1]
    with pytest.raises(ConfigError, match="asked for 29 training patients"):
        training_subset(patient_splits(patients, split_seed=11)["train"], 29, seed=0)


# --- U-Net at its own input size -----------------------------------------------------------------------------


def test_unet_input_and_loss_grid_follow_the_model_not_the_encoder() -> None:
    images = [_slice(side=96)[0], _slice(side=150)[0]]
    x = unet_input(images)
    assert x.shape == (2, 1, 224, 224) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert unet_input(images, unet_image_size=128).shape == (2, 1, 128, 128)
    assert input_size("unet", image_size=1024) == 224
    assert input_size("unet", image_size=1024, unet_image_size=160) == 160
    assert input_size("autosam", image_size=1024) == 1024
    assert loss_grid(input_size("unet", image_size=1024)) == 224
    assert loss_grid(input_size("autosam", image_size=1024)) == 256
    unet = build_head("unet", num_classes=4, unet_channels=(4, 8, 16)).eval()
    with torch.no_grad():
        assert unet(x).shape == (2, 4, 224, 224)
