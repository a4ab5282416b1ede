"""`SegmentConfig`: every setting of one segmentation run (a segmentation head is a method)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from samadapt.engine.config import EncoderRunConfig, bounded, setting

METHODS = ("autosam", "cnn", "linear", "unet")
ENCODER_SIZE = 1024  # AutoSAM encodes at SAM's native 1024 (its 224 slices upsampled)


def default_encoder_size(encoder: str) -> int:
    from samadapt.encoders.registry import get_spec

    return get_spec(encoder).default_image_size


class SegmentConfig(EncoderRunConfig):
    task = "segment"

    data: str | None = setting(None, "ACDC folder (patientXXX/...) or a folder with images/ + labels/")
    method: Literal["autosam", "cnn", "linear", "unet"] = setting(
        "autosam", "autosam | cnn | linear (heads on the frozen encoder) | unet (from scratch on pixels)",
        deprecated=("--head",), sweep_flag="--methods", sweep_deprecated=("--heads",),
    )  # fmt: skip
    train_volumes: int | None = setting(
        None, "training patients to use (default all)", aliases=("--budget",), sweep_flag="--budgets",
        sweep_aliases=("--train-volumes",),
    )  # fmt: skip
    seed: int = setting(0, "training seed (training-patient subset, initialisation, augmentation)",
                        sweep_flag="--seeds")  # fmt: skip
    split_seed: int = setting(
        0, "seed of the patient split: the same val/test patients for every training seed"
    )
    encoder_image_size: int | None = setting(
        None,
        f"encoder input size S (default: the encoder's own; {ENCODER_SIZE} for SAM, AutoSAM's)",
        deprecated=("--image-size",),
    )
    unet_image_size: int = setting(224, "the U-Net baseline's own input size (AutoSAM's reference: 224)")
    epochs: int = setting(120, "training epochs")
    batch_size: int = setting(4, "training batch size")
    lr: float = setting(5e-4, "Adam learning rate")
    patience: int = setting(30, "early-stopping patience on validation Dice")
    aug_views: int = setting(2, "augmented views per training slice, encoded once and cached")
    augment: Literal["reference", "light", "none"] = setting(
        "reference", "reference (AutoSAM's: brightness, gamma, noise, mirroring, elastic, scale 0.5-1.9) | light "
        "(rotation, scale 0.85-1.15, shift, flips) | none"
    )  # fmt: skip
    mask_tokens_per_class: int = setting(
        2, "AutoSAM mask tokens per class (the first is used; the reference: 2)"
    )
    learn_iou_token: bool = setting(False, "train AutoSAM's IoU tokens (the reference freezes them)")
    online_encoder: bool = setting(False, "encode fresh augmentations every batch (slow, exact)")
    label_names: list[str] | None = setting(None, "e.g. RV,MYO,LV (ACDC default)")
    splits: str | None = setting(None, "JSON {train, val, test} patient lists (overrides --split-seed)")
    unet_channels: list[int] = setting([32, 64, 128, 256, 512], "U-Net channels per level")

    @field_validator("train_volumes", mode="before")
    @classmethod
    def _all(cls, value: Any) -> Any:
        return None if value is None or str(value).strip().lower() == "all" else value

    _at_least_one = bounded(
        "train_volumes", "epochs", "batch_size", "patience", "unet_image_size", "mask_tokens_per_class", low=1
    )
    _non_negative = bounded("aug_views", "split_seed", low=0)
    _lr = bounded("lr", low=0, strict=True)
    # the encoder checks its own size multiple (SAM: 16, SAM 2: 32, SAM 3: 14)
    _size = bounded("encoder_image_size", low=56)

    @field_validator("unet_channels")
    @classmethod
    def _channels(cls, value: list[int]) -> list[int]:
        if len(value) < 2 or min(value) < 1:
            raise ValueError("needs at least 2 positive channel counts (one per U-Net level, e.g. 32,64)")
        return value

    @property
    def encoder_size(self) -> int:
        """The encoder's input: --encoder-image-size, else the encoder's own (SAM: 1024, AutoSAM's; SAM 3: 1008)."""
        return self.encoder_image_size or default_encoder_size(self.encoder)

    @property
    def input_size(self) -> int:
        """The input size of the model being trained: the encoder's for the heads, the U-Net's own for unet."""
        return self.unet_image_size if self.method == "unet" else self.encoder_size


# AutoSAM's protocol as its public code runs it (xhu248/AutoSAM); "fast" is a CPU check of a real checkpoint.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        "encoder_image_size": 1024,
        "unet_image_size": 224,
        "epochs": 120,
        "batch_size": 4,
        "lr": 5e-4,
    },
    "fast": {"encoder_image_size": 256, "unet_image_size": 128, "epochs": 30, "patience": 10},
}
