"""The encoders' preprocessing written out as data, so code outside Python can reproduce the exported input.

`describe_preprocessing(name, image_size)` turns the registry's ``spec.preprocessing`` key into a JSON-able dict:
channel rule, resize rule (target, interpolation, the library whose resize the checkpoint was trained with),
value scaling, mean/std and padding, in the order they are applied. The numbers come from
``samadapt.encoders.preprocessing`` (the functions the Python path runs), nothing is restated here.
"""

from __future__ import annotations

from typing import Any

from samadapt.encoders.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSING_DESCRIPTIONS,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
)
from samadapt.errors import ConfigError

_CHANNELS = "RGB uint8; a grey image is replicated to 3 channels"


def _sam(size: int) -> dict[str, Any]:
    return {
        "channels": _CHANNELS,
        "resize": {
            "rule": "longest_side",
            "target": size,
            "new_size": "(int(h * S / max(h, w) + 0.5), int(w * S / max(h, w) + 0.5))",
            "interpolation": "bilinear",
            "library": "PIL.Image.resize(..., Image.BILINEAR) on the uint8 image",
        },
        "scale": "none (values stay 0-255, as float32)",
        "mean": list(SAM_PIXEL_MEAN),
        "std": list(SAM_PIXEL_STD),
        "pad": {"rule": "bottom_right", "to": [size, size], "value": 0.0, "after": "normalisation"},
    }


def _medsam(size: int) -> dict[str, Any]:
    return {
        "channels": _CHANNELS,
        "resize": {
            "rule": "square",
            "target": size,
            "new_size": "(S, S)",
            "interpolation": "bicubic (order 3), anti-aliased, range preserved, then cast to uint8 (truncation)",
            "library": "skimage.transform.resize(img, (S, S), order=3, preserve_range=True, anti_aliasing=True)",
        },
        "scale": "min-max over the whole resized image to [0, 1]: (x - min) / max(max - min, 1e-8)",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "pad": {"rule": "none"},
    }


def _sam2(size: int) -> dict[str, Any]:
    return {
        "channels": _CHANNELS,
        "scale": "x / 255 (torchvision ToTensor), before resizing",
        "resize": {
            "rule": "square",
            "target": size,
            "new_size": "(S, S)",
            "interpolation": "bilinear, antialias=True, on the float [0, 1] image",
            "library": "torchvision.transforms.Resize((S, S))",
        },
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "pad": {"rule": "none"},
    }


PREPROCESSING_RULES = {"sam": _sam, "medsam": _medsam, "sam2": _sam2}


def describe_preprocessing(name: str, image_size: int) -> dict[str, Any]:
    """The preprocessing ``name`` (an ``EncoderSpec.preprocessing`` key) at input side ``image_size``, as data."""
    if name not in PREPROCESSING_RULES:
        raise ConfigError(
            f"preprocessing {name!r} has no export description; known: {', '.join(PREPROCESSING_RULES)}"
        )
    return {
        "name": name,
        "image_size": int(image_size),
        "summary": PREPROCESSING_DESCRIPTIONS[name],
        **PREPROCESSING_RULES[name](int(image_size)),
        "output": {
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, int(image_size), int(image_size)],
        },
    }
