"""Everything a run reads before training, prepared once and shared by all runs of a sweep.

The dataset (labels, splits), the backbone-size uint8 images, and the SAM features from the embedding store
(window statistics for SLCA, global statistics for the linear probe), cached per setting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.errors import DataError
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.features import (
    embed_into_store,
    global_sam_features,
    pooled_sam_features,
    resize_for_backbone,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    dataset: Any  # samadapt.data.ImageDataset
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    split: dict[str, np.ndarray]  # "train" / "val" / "test" -> dataset indices
    image_shapes: list[tuple[int, ...]]
    encoder_fields: dict[str, Any] | None = None
    encoder_description: str = ""
    embeddings: Any = None  # dataset-ordered [N, C, h, w] store array of the SAM feature
    preprocessing: str = "sam"
    encoder_input_size: int = 1024
    _images: dict[int, torch.Tensor] = field(default_factory=dict)
    _windows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    _global: np.ndarray | None = None

    def images(self, size: int) -> torch.Tensor:
        """uint8 [N, 3, size, size] for the backbone (square resize), computed once per size."""
        if size not in self._images:
            self._images[size] = resize_for_backbone(
                [self.dataset.image(i) for i in range(len(self.dataset))], size
            )
        return self._images[size]

    def sam_windows(self, window: int, pooling: str) -> torch.Tensor:
        """[N, C(x2), gh, gw] window-pooled SAM features (aligned with the square-resized image)."""
        key = (window, pooling)
        if key not in self._windows:
            self._windows[key] = pooled_sam_features(
                self.embeddings,
                window=window,
                pooling=pooling,
                image_shapes=self.image_shapes,
                preprocessing=self.preprocessing,
                input_size=self.encoder_input_size,
            )
        return self._windows[key]

    def sam_global(self) -> np.ndarray:
        if self._global is None:
            self._global = global_sam_features(self.embeddings)
        return self._global

    @property
    def sam_channels(self) -> int:
        return int(self.embeddings.shape[1])


def read_classification_data(cfg: ClassifyConfig) -> tuple[Any, np.ndarray]:
    """Read the dataset through the foundation readers; single-label classes only."""
    from samadapt.data import read_dataset

    dataset = read_dataset(
        cfg.data, split_seed=0, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction
    )
    if dataset.labels is None:
        raise DataError(f"{cfg.data}: the dataset has no labels; classification training needs them")
    if dataset.multilabel:
        raise DataError(
            f"{cfg.data}: multi-label labels ({dataset.labels.shape[1]} columns); classify trains single-label classes"
        )
    if dataset.num_classes < 2:
        raise DataError(f"{cfg.data}: found {dataset.num_classes} class; classification needs at least 2")
    return dataset, dataset.labels.astype(np.int64)


def load_encoder_for(cfg: ClassifyConfig, device: str | None = None) -> Any:
    from samadapt.encoders import load_encoder

    return load_encoder(
        cfg.encoder,
        cfg.checkpoint,
        precision=cfg.precision,
        image_size=cfg.encoder_image_size,
        arch=cfg.encoder_arch,
        device=device or "auto",
    )


def prepare(cfg: ClassifyConfig, *, need_sam: bool = True, progress: bool = True) -> Prepared:
    """Read the data, embed it into the store (hits reused) and return what every method needs."""
    dataset, labels = read_classification_data(cfg)
    split = {name: dataset.split_indices(name) for name in ("train", "val", "test")}
    for name, idx in split.items():
        if len(idx) == 0:
            raise DataError(f"{cfg.data}: the {name} split is empty; give --val-fraction/--test-fraction > 0")
    shapes = []
    prepared = Prepared(
        dataset=dataset,
        labels=labels,
        class_names=list(dataset.class_names),
        split=split,
        image_shapes=shapes,
    )
    if cfg.method != "linear-probe":
        images = []
        for i in range(len(dataset)):
            image = dataset.image(i)
            shapes.append(tuple(image.shape[:2]))
            images.append(image)
        prepared._images[cfg.image_size] = resize_for_backbone(images, cfg.image_size)
        del images
    if need_sam:
        encoder = load_encoder_for(cfg, cfg.device)
        store_dir = Path(cfg.store) if cfg.store else Path(cfg.out) / "embeddings"
        prepared.embeddings = embed_into_store(
            dataset,
            encoder=encoder,
            store_dir=store_dir,
            feature=cfg.sam_feature,
            batch_size=cfg.embed_batch_size,
            progress=progress,
        )
        prepared.encoder_fields = encoder.cache_key_fields()
        prepared.encoder_description = repr(encoder)
        prepared.preprocessing = encoder.spec.preprocessing
        prepared.encoder_input_size = encoder.image_size
        del encoder
    return prepared
