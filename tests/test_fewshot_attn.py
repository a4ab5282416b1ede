"""medfocus-attn: the mask enters CLIP's attention as a bias on the patch grid, measured on real attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.encoders.clip import load_clip, write_tiny_clip
from samadapt.tasks.fewshot.attn_bias import FocusAttention, attention_bias, focus_grid, focus_map


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config, checkpoint = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return load_clip(str(config), checkpoint)


def _cls_attention(visual, images, block=0):
    """Attention probabilities of block `block` ([B, heads, L, L]), with whatever attn_mask it receives."""
    captured = {}
    attn = visual.transformer.resblocks[block].attn

    def grab(module, args, kwargs):
        captured["args"], captured["mask"] = args, kwargs.get("attn_mask")

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        visual(images)
    handle.remove()
    q, k, v = captured["args"]
    with torch.no_grad():
        _, weights = attn(q, k, v, need_weights=True, average_attn_weights=False, attn_mask=captured["mask"])
    return weights


def test_bias_lowers_attention_to_masked_out_patches(clip):
    visual = clip.model.visual
    grid_side = clip.patch_grid
    # the mask covers the left half of the image -> left half of the patch grid is in focus
    focus = np.zeros((64, 64), np.float32)
    focus[:, :32] = 1.0
    grid = focus_grid(focus, image_size=clip.image_size, grid=grid_side)[None]
    inside = grid[0] > 0.5
    images = torch.randn(1, 3, 64, 64)
    plain = _cls_attention(visual, images)[0, :, 0, 1:]  # per head: [CLS] query -> patch keys
    hooks = FocusAttention(visual, strength=4.0)
    try:
        hooks.set(grid)
        biased = _cls_attention(visual, images)[0, :, 0, 1:]
        hooks.set(None)
        again = _cls_attention(visual, images)[0, :, 0, 1:]
    finally:
        hooks.remove()
    assert (biased[:, ~inside].sum(1) < 0.5 * plain[:, ~inside].sum(1)).all()
    assert (biased[:, inside].sum(1) > plain[:, inside].sum(1)).all()
    # per head, masked-out patches are scaled down by exactly exp(-strength) relative to masked-in ones
    ratio = biased / plain
    expected = torch.full((ratio.shape[0],), float(np.exp(-4.0)))
    torch.testing.assert_close(
        ratio[:, ~inside].mean(1) / ratio[:, inside].mean(1), expected, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(again, plain)  # hooks are inert without a bias


def test_full_focus_or_no_masks_leave_clip_unchanged(clip):
    visual = clip.model.visual
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = visual(images)
    hooks = FocusAttention(visual, strength=5.0, layers=[-1])
    try:
        hooks.set(torch.ones(2, clip.patch_grid**2))
        with torch.no_grad():
            same = visual(images)
        hooks.set(torch.zeros(2, clip.patch_grid**2))
        with torch.no_grad():
            changed = visual(images)
    finally:
        hooks.remove()
    torch.testing.assert_close(same, reference)
    assert not torch.allclose(changed, reference)
    assert focus_map(np.zeros((0, 8, 8), bool)).min() == 1.0  # no masks: focus everywhere


def test_focus_map_drops_background_masks_and_follows_center_crop():
    masks = np.zeros((2, 40, 80), bool)
    masks[0] = True  # whole image: background, ignored
    masks[1, :, :20] = True  # left quarter of a wide image: cut away by the center crop
    focus = focus_map(masks, max_area_fraction=0.9)
    assert focus[:, :20].all() and not focus[:, 20:].any()
    grid = focus_grid(focus, image_size=64, grid=4, resize_mode="shortest")
    assert grid.max() < 0.05  # only bilinear leakage at the crop edge
    grid_squash = focus_grid(focus, image_size=64, grid=4, resize_mode="squash").reshape(4, 4)
    assert (grid_squash[:, 0] == 1).all() and (grid_squash[:, 1:] == 0).all()
    bias = attention_bias(grid_squash.reshape(1, -1), strength=2.0, num_heads=3)
    assert (
        bias.shape == (3, 17, 17)
        and bias[0, 0, 1] == 0
        and bias[0, 0, 2] == -2.0
        and (bias[:, 1:] == 0).all()
    )


def test_bias_survives_open_clip_gradient_checkpointing(clip):
    """With grad checkpointing open_clip passes attn_mask positionally; the focus bias must still apply."""
    import copy

    visual = copy.deepcopy(clip.model.visual)
    images = torch.randn(2, 3, 64, 64)
    grids = torch.zeros(2, clip.patch_grid**2)
    grids[:, :4] = 1.0
    hooks = FocusAttention(visual, strength=3.0)
    try:
        hooks.set(grids)
        with torch.no_grad():
            plain_path = visual(images)
            visual.set_grad_checkpointing(True)
            checkpointed = visual(images)
    finally:
        hooks.remove()
    with torch.no_grad():
        unbiased = visual(images)
    torch.testing.assert_close(checkpointed, plain_path)
    assert not torch.allclose(checkpointed, unbiased)
