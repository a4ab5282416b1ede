"""AutoSAM's training augmentation on (image, label) slices, as MONAI dictionary transforms; and the others by name.

AutoSAM (github.com/xhu248/AutoSAM, ``dataset/ACDC.py``, ``AcdcDataset.transform``) augments every training
slice at every iteration with batchgenerators: BrightnessTransform, GammaTransform, GaussianNoiseTransform,
ResizeTransform (to 224), MirrorTransform and one SpatialTransform (elastic deformation, rotation and scaling
in a single resampling), in that order, on the slice min-maxed to [0, 1]. We apply the same chain, in the same
order, to our uint8 square slice (scaled to [0, 1] by /255, the volume's window) and round back to uint8:

=============  ==========================================================  ==========================================
transform      reference (batchgenerators 0.25, AutoSAM's arguments)        ours
=============  ==========================================================  ==========================================
brightness     additive N(mu=1, sigma=1) per channel, p=0.5, unclipped      multiplicative x U(0.75, 1.25), p=0.5
                                                                            (``RandScaleIntensityd``); an offset of
                                                                            mean 1 (the whole [0, 1] range) turns a
                                                                            uint8 slice white, so we take
                                                                            batchgenerators' multiplicative
                                                                            brightness with nnU-Net's range
gamma          gamma from U(0.5, 1) or U(1, 2) (50/50), on the min-max      same: ``OneOf`` of two
               range, p=0.5                                                 ``RandAdjustContrastd`` (same formula)
noise          N(0, s), s ~ U(0, 0.1), p=0.5                                same (``RandGaussianNoised``,
                                                                            ``sample_std=True``)
resize         to 224 x 224 (bilinear)                                      none here: the encoder's preprocessing
                                                                            resizes (sizes below are in 224-grid
                                                                            units, scaled to the slice's side)
mirror         flip of the second spatial axis (columns), p=0.5             same (``RandFlipd``, axis 1, both keys)
elastic        p=1; offsets = gaussian_filter(U(-1, 1) noise, sigma,        same field on the 224 grid (the same
               mode constant) * alpha, alpha ~ U(100, 350),                 zero-padded truncated Gaussian, as a
               sigma ~ U(40, 60) px on the 224 grid                         matrix product), resized bilinearly to
                                                                            the slice's side n and scaled by n/224
rotation       p=0.5, angle ~ U(-0.1, 0.1) rad                              same
scale          p=0.5, coordinates x s, s ~ U(0.5, 1) or U(1, 1.9) (50/50),  same
               isotropic (s > 1 zooms out)
resampling     one ``map_coordinates`` per key; image order 3, label        same (``RandReferenceSpatiald``,
               order 0, both ``mode="nearest"``; centre kept                scipy ``map_coordinates``)
=============  ==========================================================  ==========================================

The spatial step is our own MONAI ``RandomizableTransform`` rather than ``Rand2DElasticd`` + ``RandAffined``:
MONAI's elastic grid is its control grid upsampled bicubically, and that upsampling alone (magnitude 0) moves
pixels periodically by up to about 3 % of the control spacing (measured: +-2.7 px at spacing 56 on 224 px), more
than the whole reference deformation (offset std 0.1-1.0 px, measured); three separate resamplings would also
blur the image three times where the reference resamples once.

`reference_augment(image, label, rng)` is deterministic given `rng` (it draws one MONAI seed from it), so cached
views are reproducible; labels stay the input's integers (nearest only) and the image stays uint8 in [0, 255].
`AUGMENTATIONS` names the choices for ``--augment``: "reference" (this), "light" (`slices.augment_pair`: small
affine and flips, the earlier default) and "none".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_numpy

from samadapt.tasks.segment.slices import augment_pair

REFERENCE_SIDE = 224  # AutoSAM resizes ACDC slices to 224 before its spatial transform
MAX_SEED = 2**32 - 1  # MONAI's set_random_state bound

Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def gaussian_smoothing_matrix(n: int, sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """[n, n] matrix M with M @ x == scipy.ndimage.gaussian_filter1d(x, sigma, axis=0, mode="constant")."""
    radius = int(truncate * float(sigma) + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]  # j - i
    inside = np.abs(offset) <= radius
    out = np.zeros((n, n))
    out[inside] = taps[offset[inside] + radius]
    return out


class RandReferenceSpatiald(RandomizableTransform, MapTransform):
    """batchgenerators' SpatialTransform as AutoSAM calls it (no crop: output side = input side), one resampling.

    Expects channel-first [1, n, n] arrays under `image_key` (float) and `label_key` (integers). `sigma` and
    `alpha` are in pixels of a `reference_side` grid; the field scales with the slice's side.
    """

    def __init__(
        self,
        *,
        image_key: Hashable = "image",
        label_key: Hashable = "label",
        alpha: tuple[float, float] = (100.0, 350.0),
        sigma: tuple[float, float] = (40.0, 60.0),
        p_elastic: float = 1.0,
        angle: tuple[float, float] = (-0.1, 0.1),
        p_rotation: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.9),
        p_scale: float = 0.5,
        image_order: int = 3,
        reference_side: int = REFERENCE_SIDE,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys=[image_key, label_key])
        self.image_key, self.label_key = image_key, label_key
        self.alpha, self.sigma, self.p_elastic = alpha, sigma, p_elastic
        self.angle, self.p_rotation = angle, p_rotation
        self.scale, self.p_scale = scale, p_scale
        self.image_order, self.reference_side = image_order, reference_side

    def randomize(self, data: Any = None) -> None:
        """Draw (alpha, sigma, noise or None, angle or None, scale or None) in batchgenerators' order."""
        r = self.R
        self.elastic = None
        if r.uniform() < self.p_elastic:
            a, s = r.uniform(*self.alpha), r.uniform(*self.sigma)
            side = self.reference_side
            self.elastic = (a, s, r.random_sample((2, side, side)) * 2 - 1)
        self.rotation = float(r.uniform(*self.angle)) if r.uniform() < self.p_rotation else None
        self.zoom = None
        if r.uniform() < self.p_scale:
            lo, hi = self.scale
            below = r.random_sample() < 0.5 and lo < 1
            self.zoom = float(r.uniform(lo, 1) if below else r.uniform(max(lo, 1), hi))

    def coordinates(self, n: int) -> np.ndarray | None:
        """Sampling coordinates [2, n, n] of the drawn deformation (None: nothing drawn, the slice stays)."""
        if self.elastic is None and self.rotation is None and self.zoom is None:
            return None
        centre = (n - 1) / 2.0
        coords = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij")).astype(np.float64) - centre
        if self.elastic is not None:
            coords += self.elastic_offsets(n)
        if self.rotation is not None:
            c, s_ = np.cos(self.rotation), np.sin(self.rotation)
            rot = np.array(
                [[c, s_], [-s_, c]]
            )  # batchgenerators' rotate_coords_2d: (coords^T @ [[c,-s],[s,c]])^T
            coords = np.einsum("ij,jhw->ihw", rot, coords)
        if self.zoom is not None:
            coords *= self.zoom
        return coords + centre

    def elastic_offsets(self, n: int) -> np.ndarray:
        """The drawn elastic field [2, n, n] in pixels of an n-pixel slice.

        Made as the reference makes it, on the reference grid (alpha * gaussian_filter(U(-1, 1) noise, sigma)),
        then resized bilinearly to n and scaled by n / reference_side (a field with sigma >= 40 px is smooth
        enough that the resize changes nothing visible; at n = reference_side it is the reference field)."""
        from scipy.ndimage import zoom

        a, s, noise = self.elastic
        m = gaussian_smoothing_matrix(self.reference_side, s)
        field = np.stack([m @ noise[d] @ m.T for d in range(2)]) * a
        if n == self.reference_side:
            return field
        k = n / self.reference_side
        return np.stack([zoom(f, k, order=1, mode="nearest", grid_mode=True) for f in field]) * k

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy.ndimage import map_coordinates

        d = dict(data)
        image = convert_to_numpy(d[self.image_key])
        n = image.shape[-1]
        self.randomize()
        coords = self.coordinates(n)
        if coords is None:
            return d
        d[self.image_key] = map_coordinates(
            image[0].astype(np.float64), coords, order=self.image_order, mode="nearest"
        )[None].astype(np.float32)
        label = convert_to_numpy(d[self.label_key])
        d[self.label_key] = map_coordinates(label[0], coords, order=0, mode="nearest")[None].astype(
            label.dtype
        )
        return d


@lru_cache(maxsize=8)
def reference_transform(
    *,
    p_brightness: float = 0.5,
    p_gamma: float = 0.5,
    p_noise: float = 0.5,
    p_mirror: float = 0.5,
    p_elastic: float = 1.0,
    p_rotation: float = 0.5,
    p_scale: float = 0.5,
) -> Any:
    """The MONAI chain of the module docstring (probabilities as keywords, for tests that isolate one step)."""
    from monai.transforms import (
        Compose,
        OneOf,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
    )

    return Compose(
        [
            RandScaleIntensityd(keys="image", factors=(-0.25, 0.25), prob=p_brightness),
            OneOf(
                [
                    RandAdjustContrastd(keys="image", gamma=(0.5, 1.0), prob=p_gamma),
                    RandAdjustContrastd(keys="image", gamma=(1.0, 2.0), prob=p_gamma),
                ]
            ),
            RandGaussianNoised(keys="image", prob=p_noise, mean=0.0, std=0.1, sample_std=True),
            RandFlipd(keys=("image", "label"), prob=p_mirror, spatial_axis=1),
            RandReferenceSpatiald(p_elastic=p_elastic, p_rotation=p_rotation, p_scale=p_scale),
        ]
    )


def reference_augment(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, **probabilities: float
) -> tuple[np.ndarray, np.ndarray]:
    """AutoSAM's augmentation of one uint8 square slice and its label (same shapes, label values kept).

    Deterministic given `rng`; `probabilities` (p_brightness, p_gamma, ...) override the reference ones."""
    if image.ndim != 2 or image.shape[0] != image.shape[1] or label.shape != image.shape:
        raise ValueError(
            f"expected a square 2D image and a label of its shape, got {image.shape}, {label.shape}"
        )
    chain = reference_transform(**probabilities)
    chain.set_random_state(seed=int(rng.integers(MAX_SEED)))
    out = chain({"image": image[None].astype(np.float32) / 255.0, "label": label[None].copy()})
    img = convert_to_numpy(out["image"])[0]
    lab = convert_to_numpy(out["label"])[0]
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8), lab.astype(label.dtype, copy=False)


def no_augment(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The slice as it is."""
    return image, label


AUGMENTATIONS: dict[str, Augment] = {
    "reference": reference_augment,
    "light": augment_pair,
    "none": no_augment,
}
DEFAULT_AUGMENTATION = "reference"


def get_augmentation(name: str) -> Augment:
    from samadapt.errors import ConfigError

    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
