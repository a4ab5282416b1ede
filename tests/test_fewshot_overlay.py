"""MedFocusCLIP overlays: tinted inside masks, untouched outside, outlines, palettes, zero masks."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from samadapt.errors import ConfigError
from samadapt.tasks.fewshot.overlay import OverlayStyle, palette_colors, render_overlay


def _image_and_masks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:30, 5:30] = True  # large square
    masks[1, 20:26, 35:45] = True  # small rectangle, disjoint
    return image, masks


def test_inside_tinted_outside_unchanged():
    image, masks = _image_and_masks()
    style = OverlayStyle(palette="red,blue", alpha=0.4, outline=False)
    out = render_overlay(image, masks, style=style)
    outside = ~masks.any(axis=0)
    np.testing.assert_array_equal(out[outside], image[outside])
    # largest mask is painted first and takes the palette's first colour
    for k, color in ((0, (255, 0, 0)), (1, (0, 0, 255))):
        expected = np.rint(0.6 * image[masks[k]].astype(np.float32) + 0.4 * np.array(color, np.float32))
        np.testing.assert_array_equal(out[masks[k]], expected.astype(np.uint8))
    assert np.abs(out[masks[0]].astype(int) - image[masks[0]]).max() > 0


def test_outline_pixels_take_outline_colour_and_interior_stays_tinted():
    image, masks = _image_and_masks()
    out = render_overlay(image, masks, style=OverlayStyle(palette="red", alpha=0.5, outline_color="lime"))
    lime = np.array(to_rgb("lime")) * 255
    assert (out[5, 5:30] == lime).all() and (out[29, 5:30] == lime).all()  # top and bottom edge of mask 0
    interior = np.rint(0.5 * image[15, 15].astype(np.float32) + 0.5 * np.array([255, 0, 0]))
    np.testing.assert_array_equal(out[15, 15], interior.astype(np.uint8))
    np.testing.assert_array_equal(out[0, 0], image[0, 0])
    thick = render_overlay(
        image, masks, style=OverlayStyle(palette="red", outline_color="lime", outline_width=2)
    )
    assert (thick[6, 6:29] == lime).all() and not (out[6, 6:29] == lime).all()


def test_grey_image_zero_masks_and_max_masks():
    grey = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20).astype(np.uint8)
    out = render_overlay(grey, np.zeros((0, 30, 20), bool))
    assert out.shape == (30, 20, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    image, masks = _image_and_masks()
    only_largest = render_overlay(image, masks, style=OverlayStyle(max_masks=1, outline=False))
    np.testing.assert_array_equal(only_largest[masks[1]], image[masks[1]])


def test_palettes_and_validation():
    tab = palette_colors("tab20", 25)
    assert tab.shape == (25, 3) and np.allclose(tab[0], tab[20])  # cycles after 20 colours
    assert np.allclose(palette_colors("#00ff00", 1)[0], (0, 255, 0))
    with pytest.raises(ConfigError, match="alpha"):
        OverlayStyle(alpha=1.5)
    with pytest.raises(ConfigError, match="palette"):
        OverlayStyle(palette="not-a-colour")
    image, masks = _image_and_masks()
    with pytest.raises(ConfigError, match="do not match"):
        render_overlay(image, masks[:, :10], style=OverlayStyle())
