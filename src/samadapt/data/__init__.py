"""Dataset readers: uint8 2D images, labels, class names and train/val/test splits.

Knows no encoder, store, task or CLI (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from samadapt.data.dataset import ImageDataset
from samadapt.data.images import read_image, to_uint8
from samadapt.data.readers import READERS, detect_format, read_dataset
from samadapt.data.splits import label_fraction_indices

__all__ = [
    "READERS",
    "ImageDataset",
    "detect_format",
    "label_fraction_indices",
    "read_dataset",
    "read_image",
    "to_uint8",
]
