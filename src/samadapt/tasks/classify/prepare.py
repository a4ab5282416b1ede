"""Everything a run reads before training, prepared once and shared by all runs of a sweep.

The dataset (labels, splits), the backbone-size uint8 images, and the SAM features from the embedding store
(window statistics for SLCA, global statistics for the linear probe), cached per setting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
    """The dataset and its splits, backbone-size images and SAM features, each computed once on first use."""

    cfg: ClassifyConfig  # the settings that made it (data, encoder, store: the task's prepare_fields)
    dataset: Any  # samadapt.data.ImageDataset
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    split: dict[str, np.ndarray]  # "train" / "val" / "test" -> dataset indices
    progress: bool = True
    image_shapes: list[tuple[int, ...]] = field(default_factory=list)
    encoder_fields: dict[str, Any] | None = None
    encoder_description: str = ""
    checkpoint_sha256: str | None = None
    preprocessing: str = "sam"
    encoder_input_size: int = 1024
    _embeddings: Any = None  # dataset-ordered [N, C, h, w] store array of the SAM feature
    _images: dict[int, torch.Tensor] = field(default_factory=dict)
    _windows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    _global: np.ndarray | None = None

    @property
    def embeddings(self) -> Any:
        """The SAM feature of every image from the embedding store (the encoder runs on store misses only)."""
        if self._embeddings is None:
            encoder = self.cfg.load_encoder()
            self._embeddings = embed_into_store(
                self.dataset, encoder=encoder, store_dir=self.cfg.store_dir(), feature=self.cfg.sam_feature,
                batch_size=self.cfg.embed_batch_size, progress=self.progress,
            )  # fmt: skip
            self.encoder_fields = encoder.cache_key_fields()
            self.encoder_description = repr(encoder)
            self.checkpoint_sha256 = encoder.checkpoint_sha256
            self.preprocessing = encoder.spec.preprocessing
            self.encoder_input_size = encoder.image_size
        return self._embeddings

    def images(self, size: int) -> torch.Tensor:
        """uint8 [N, 3, size, size] for the backbone (square resize), computed once per size."""
        if size not in self._images:
            decoded = [self.dataset.image(i) for i in range(len(self.dataset))]
            if not self.image_shapes:
                self.image_shapes.extend(tuple(image.shape[:2]) for image in decoded)
            self._images[size] = resize_for_backbone(decoded, size)
        return self._images[size]

    def shapes(self) -> list[tuple[int, ...]]:
        if not self.image_shapes:
            self.image_shapes.extend(tuple(self.dataset.image(i).shape[:2]) for i in range(len(self.dataset)))
        return self.image_shapes

    def sam_windows(self, window: int, pooling: str) -> torch.Tensor:
        """[N, C(x2), gh, gw] window-pooled SAM features (aligned with the square-resized image)."""
        key = (window, pooling)
        if key not in self._windows:
            embeddings = self.embeddings
            self._windows[key] = pooled_sam_features(
                embeddings,
                window=window,
                pooling=pooling,
                image_shapes=self.shapes(),
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


def prepare(cfg: ClassifyConfig, *, progress: bool = True) -> Prepared:
    """Read the data and check its splits; images and SAM features follow on first use (see `Prepared`)."""
    if not cfg.data:
        raise DataError("--data is required (a dataset folder, .npz, CSV manifest or ISIC layout)")
    dataset, labels = read_classification_data(cfg)
    split = {name: dataset.split_indices(name) for name in ("train", "val", "test")}
    for name, idx in split.items():
        if len(idx) == 0:
            raise DataError(f"{cfg.data}: the {name} split is empty; give --val-fraction/--test-fraction > 0")
    prepared = Prepared(
        cfg=cfg,
        dataset=dataset,
        labels=labels,
        class_names=list(dataset.class_names),
        split=split,
        progress=progress,
    )
    if cfg.method != "linear-probe":  # decode every image now: a broken file fails before any training
        prepared.images(cfg.backbone_image_size)
    return prepared
