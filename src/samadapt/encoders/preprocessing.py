"""The preprocessing each checkpoint was trained with, reproduced exactly as the official code does it.

Every function takes one uint8 image (HxW grey or HxWx3 RGB) and the encoder's square input size S, and returns a
float32 tensor [3, S, S] plus `PreprocessMeta` (what was done, so masks can be mapped back to the input).

- ``sam``: SAM / MobileSAM (``SamPredictor.set_image``): longest side resized to S with PIL bilinear (the
  official ``ResizeLongestSide``), ``(x - mean) / std`` on 0-255 with mean [123.675, 116.28, 103.53] and std
  [58.395, 57.12, 57.375], then zero padding right/bottom to S x S.
- ``medsam``: MedSAM (``MedSAM_Inference.py``): ``skimage.transform.resize(img, (S, S), order=3,
  preserve_range=True, anti_aliasing=True).astype(uint8)`` (note: truncation to uint8, as the official script does),
  then min-max to [0, 1] over the whole image; no mean/std.
- ``sam2``: SAM 2 / 2.1 (``SAM2Transforms``): ``ToTensor`` (to [0, 1]), ``Resize((S, S))`` on the float tensor
  (bilinear, antialias), ImageNet ``Normalize`` mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225].
- ``medsam2``: MedSAM2 (its inference scripts, and the official ``sam2`` video frame loader
  ``sam2.utils.misc._load_img_as_tensor`` it inherits): PIL ``resize((S, S))`` on the uint8 RGB image (PIL's default
  filter, bicubic), ``/ 255`` in float64, then ImageNet mean/std in float32. No padding, aspect ratio not kept.
- ``litemedsam``: LiteMedSAM (``CVPR24_LiteMedSAM_infer.py``): longest side resized to S with OpenCV ``INTER_AREA``
  (sides rounded half up), min-max to [0, 1] over the resized image, then zero padding right/bottom to S x S.
- ``sam3``: SAM 3 (``Sam3Processor``): the image as a uint8 tensor, torchvision v2 ``Resize((S, S))`` on the uint8
  tensor (bilinear, antialias, rounded back to uint8), ``ToDtype(float32, scale=True)`` (to [0, 1]), ``Normalize``
  with mean = std = 0.5 (to [-1, 1]).

Grey images are replicated to three channels first, exactly as the official scripts do for grey inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from samadapt.errors import DataError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessMeta:
    """Geometry of the preprocessing: the input's size and the region of the S x S input that holds the image."""

    original_size: tuple[int, int]  # (H, W) of the uint8 input
    resized_size: tuple[int, int]  # (h, w) of the image inside the S x S input (top-left aligned)
    input_size: int  # S


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check an image and return it as HxWx3 uint8 (grey replicated to three channels)."""
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected a numpy uint8 image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(
            f"expected a uint8 image, got dtype {image.dtype}; read files with samadapt.data.read_image, "
            "which converts 16-bit and float images to uint8"
        )
    if image.size == 0 or min(image.shape[:2], default=0) == 0:
        raise DataError(f"expected a non-empty image, got shape {tuple(image.shape)}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    raise DataError(f"expected an HxW or HxWx3 image, got shape {tuple(image.shape)}")


def longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape`` (rounding half up, as the official code does)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_sam(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    from PIL import Image

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    new_h, new_w = longest_side_shape(h, w, size)
    if min(new_h, new_w) == 0:
        raise DataError(
            f"image of shape {h}x{w} is too elongated for input size {size} (a side would be 0 px)"
        )
    # torchvision's resize on a PIL image is PIL's bilinear resize with (w, h): the official path.
    resized = np.array(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, :new_h, :new_w] = x
    return out, PreprocessMeta((h, w), (new_h, new_w), size)


def preprocess_medsam(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    from skimage import transform

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    resized = transform.resize(rgb, (size, size), order=3, preserve_range=True, anti_aliasing=True).astype(
        np.uint8
    )
    lo, hi = resized.min(), resized.max()
    scaled = (resized - lo) / np.clip(hi - lo, a_min=1e-8, a_max=None)
    x = torch.from_numpy(scaled).float().permute(2, 0, 1).contiguous()
    return x, PreprocessMeta((h, w), (size, size), size)


def preprocess_sam2(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    from torchvision.transforms import Normalize, Resize, ToTensor

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    x = ToTensor()(rgb)
    x = Resize((size, size))(x)
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    return x.contiguous(), PreprocessMeta((h, w), (size, size), size)


def preprocess_medsam2(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    from PIL import Image

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    resized = np.array(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized / 255.0).permute(2, 0, 1).float()
    x -= torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    x /= torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return x.contiguous(), PreprocessMeta((h, w), (size, size), size)


def preprocess_litemedsam(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    import cv2

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    new_h, new_w = longest_side_shape(h, w, size)
    if min(new_h, new_w) == 0:
        raise DataError(
            f"image of shape {h}x{w} is too elongated for input size {size} (a side would be 0 px)"
        )
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    lo, hi = resized.min(), resized.max()
    scaled = (resized - lo) / np.clip(hi - lo, a_min=1e-8, a_max=None)
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, :new_h, :new_w] = torch.from_numpy(scaled).float().permute(2, 0, 1)
    return out, PreprocessMeta((h, w), (new_h, new_w), size)


def preprocess_sam3(image: np.ndarray, size: int) -> tuple[torch.Tensor, PreprocessMeta]:
    from torchvision.transforms import v2

    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    # Sam3Processor.set_image: v2.functional.to_image, then its transform (the uint8 -> uint8 ToDtype is a no-op).
    transform = v2.Compose(
        [
            v2.ToDtype(torch.uint8, scale=True),
            v2.Resize(size=(size, size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    x = transform(v2.functional.to_image(rgb))
    return x.as_subclass(torch.Tensor).contiguous(), PreprocessMeta((h, w), (size, size), size)


PREPROCESSORS: dict[str, Callable[[np.ndarray, int], tuple[torch.Tensor, PreprocessMeta]]] = {
    "sam": preprocess_sam,
    "medsam": preprocess_medsam,
    "sam2": preprocess_sam2,
    "medsam2": preprocess_medsam2,
    "litemedsam": preprocess_litemedsam,
    "sam3": preprocess_sam3,
}

PREPROCESSING_DESCRIPTIONS: dict[str, str] = {
    "sam": "longest side to S (PIL bilinear), (x-mean)/std on 0-255 (SAM pixel mean/std), zero pad right/bottom",
    "medsam": "square resize to S (skimage bicubic, anti-aliased, back to uint8), min-max to [0,1], no mean/std",
    "sam2": "square resize to S (bilinear, antialias) on [0,1], ImageNet mean/std",
    "medsam2": "square resize to S (PIL bicubic on uint8), /255, ImageNet mean/std",
    "litemedsam": "longest side to S (OpenCV INTER_AREA), min-max to [0,1], zero pad right/bottom, no mean/std",
    "sam3": "square resize to S (bilinear, antialias) on uint8, to [0,1], mean/std 0.5 (to [-1,1])",
}
