"""2D slices of labelled volumes, in the geometry the heads work in.

Each slice (array axes 0, 1 of the volume, at index z of axis 2) is windowed to uint8 per volume
(`samadapt.data.volumes.to_uint8`), then zero-padded right/bottom to a square of side max(H, W). Every encoder's
preprocessing (SAM's longest-side resize + pad, MedSAM's and SAM 2's square resize) maps a square to the S x S
input the same way, so a prediction maps back by one resize (S/4 logits -> side x side) and one crop (H x W).

The U-Net baseline sees pixels at its own side U (`unet_input`, U = 224 by default, AutoSAM's U-Net input),
whatever S the encoders use. Training targets are the padded label resized (nearest) to the loss grid
L = min(side, 256) of the model being trained: side = S for the embedding heads, U for the U-Net
(`heads.input_size`).

Augmentation and the embedding cache: a training slice has view 0 (as is) and `aug_views` augmented views (an
augmentation of `augment.AUGMENTATIONS`, applied jointly to image and label, seeded by seed/slice/view). Each view
is encoded once and cached in the embedding store (its key is the image content, so reruns hit the cache); every
epoch draws one view per slice. `--online-encoder` instead augments afresh and encodes every batch (slow, exact).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from samadapt.data.volumes import Volume, VolumeCase, to_uint8

LOSS_GRID_MAX = 256
UNET_IMAGE_SIZE = 224  # AutoSAM's U-Net baseline input (its ACDC slices are resized to 224 x 224)


def loss_grid(image_size: int) -> int:
    return min(image_size, LOSS_GRID_MAX)


def square_pad(array: np.ndarray, side: int) -> np.ndarray:
    out = np.zeros((side, side), dtype=array.dtype)
    out[: array.shape[0], : array.shape[1]] = array
    return out


def volume_slices(volume: Volume) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """uint8 square images (and square label slices) of every slice of a volume."""
    u8 = to_uint8(volume.image)
    side = max(u8.shape[0], u8.shape[1])
    images = [square_pad(u8[:, :, z], side) for z in range(u8.shape[2])]
    labels = None
    if volume.label is not None:
        labels = [square_pad(volume.label[:, :, z].astype(np.uint8), side) for z in range(u8.shape[2])]
    return images, labels


def resize_label(label: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(label)).float()[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].to(torch.uint8)


def image_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 squares -> float [N, 1, S, S] in [0, 1] (the U-Net's input)."""
    t = torch.from_numpy(np.stack(images)).float()[:, None] / 255.0
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def unet_input(images: list[np.ndarray], *, unet_image_size: int = UNET_IMAGE_SIZE) -> torch.Tensor:
    """uint8 squares (sides may differ between volumes) -> the U-Net's input [N, 1, U, U], at its own side U
    (not the encoder's)."""
    return torch.cat([image_tensor([image], unet_image_size) for image in images])


def augment_pair(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation (+-20 deg), scale (0.85-1.15), translation (+-6 %) and flips, applied jointly."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    side = image.shape[0]
    angle = float(rng.uniform(-20, 20))
    scale = float(rng.uniform(0.85, 1.15))
    shift = [int(rng.integers(-round(0.06 * side), round(0.06 * side) + 1)) for _ in range(2)]
    img = torch.from_numpy(image)[None]
    lab = torch.from_numpy(label)[None]
    kwargs = {"angle": angle, "translate": shift, "scale": scale, "shear": [0.0, 0.0]}
    img = TF.affine(img, interpolation=InterpolationMode.BILINEAR, **kwargs)
    lab = TF.affine(lab, interpolation=InterpolationMode.NEAREST, **kwargs)
    if rng.random() < 0.5:
        img, lab = img.flip(-1), lab.flip(-1)
    if rng.random() < 0.5:
        img, lab = img.flip(-2), lab.flip(-2)
    return img[0].numpy().copy(), lab[0].numpy().copy()


@dataclass
class SliceSet:
    """Slices of some cases: uint8 square images, square labels, and where each came from."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    case_index: list[int]  # index into `cases`
    z: list[int]
    cases: list[VolumeCase]
    volumes: list[Volume]

    @property
    def ids(self) -> list[str]:
        return [f"{self.cases[c].id}#z{z}" for c, z in zip(self.case_index, self.z)]

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


def build_slices(cases: list[VolumeCase]) -> SliceSet:
    images, labels, case_index, zs, volumes = [], [], [], [], []
    for ci, case in enumerate(cases):
        volume = case.load()
        volumes.append(volume)
        imgs, labs = volume_slices(volume)
        for z, (img, lab) in enumerate(zip(imgs, labs or [None] * len(imgs))):
            images.append(img)
            labels.append(lab)
            case_index.append(ci)
            zs.append(z)
    return SliceSet(images, labels, case_index, zs, list(cases), volumes)


class ImageList:
    """Images with ids, the `ImageSource` the embedding store fills from."""

    def __init__(self, images: list[np.ndarray], ids: list[str]) -> None:
        self.images, self.ids = images, ids

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


def augmented_views(
    slices: SliceSet,
    *,
    views: int,
    seed: int,
    augment: Callable[
        [np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]
    ] = augment_pair,
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]], list[str]]:
    """View 0 (as is) plus `views` augmented copies of every slice: (images, labels, rows per slice, ids).

    `augment` is one of `augment.AUGMENTATIONS` (default: the light `augment_pair`). A view's randomness depends
    on (seed, slice id, view) only, so runs with other training subsets reuse it.
    """
    images, labels, rows, ids = [], [], [], []
    for img, lab, sid in zip(slices.images, slices.labels, slices.ids):
        mine = []
        for v in range(views + 1):
            if v == 0:
                a, b = img, lab
            else:
                a, b = augment(img, lab, np.random.default_rng([seed, zlib.crc32(sid.encode()), v]))
            mine.append(len(images))
            images.append(a)
            labels.append(b)
            ids.append(f"{sid}#view{v}")
        rows.append(mine)
    return images, labels, rows, ids
