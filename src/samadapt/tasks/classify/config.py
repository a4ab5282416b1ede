"""`ClassifyConfig`: every setting of one classification run; CLI flags and YAML keys have the same names."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from samadapt.errors import ConfigError
from samadapt.training.config import require

METHODS = ("slca", "baseline", "linear-probe")
AUGMENTS = ("flip", "photometric", "none")


@dataclass
class ClassifyConfig:
    data: str = ""
    method: str = "slca"
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    encoder: str = "sam_vit_b"
    checkpoint: str | None = None
    encoder_arch: str | None = None  # "tiny": the registry's tiny random-weight configuration (tests, demo)
    encoder_image_size: int | None = None  # SAM input size (default: the encoder's, 1024)
    precision: str = "fp32"
    image_size: int = 224  # the backbone's input size
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    patience: int = 8
    monitor: str = "auc"
    label_fraction: float = 1.0
    seed: int = 0
    slca_window: int = 4
    slca_reduction: int = 16
    slca_pooling: str = "avg"
    slca_mode: str = "residual"
    slca_stages: str = "all"
    sam_feature: str = "neck"
    augment: str = "flip"
    store: str | None = None  # embedding store directory (default: OUT/embeddings)
    embed_batch_size: int = 4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str | None = None
    out: str = ""

    def validate(self) -> ClassifyConfig:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"--augment {self.augment!r}: choose one of {', '.join(AUGMENTS)}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.slca_pooling not in ("avg", "avgmax"):
            raise ConfigError(f"--slca-pooling {self.slca_pooling!r}: choose avg or avgmax")
        if self.slca_mode not in ("multiply", "residual"):
            raise ConfigError(f"--slca-mode {self.slca_mode!r}: choose multiply or residual")
        for name in (
            "epochs",
            "batch_size",
            "embed_batch_size",
            "slca_window",
            "slca_reduction",
            "image_size",
        ):
            require(f"--{name.replace('_', '-')}", int(getattr(self, name)), at_least=1)
        require("--lr", float(self.lr), above=0)
        require("--weight-decay", float(self.weight_decay), at_least=0)
        if not self.data:
            raise ConfigError("--data is required (a dataset folder, .npz, CSV manifest or ISIC layout)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ClassifyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ConfigError(f"unknown classify setting(s): {', '.join(unknown)}")
        clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
        return cls(**clean)


_HELP = {
    "data": "dataset: MedMNIST .npz, ImageFolder, CSV manifest or ISIC 2017 folder",
    "method": "slca | baseline | linear-probe",
    "backbone": "timm model name (resnet18/50/152, seresnext26d_32x4d, legacy_senet154, densenet121, efficientnet_b0, swinv2_*)",
    "backbone_weights": "local timm checkpoint for the backbone (.safetensors/.pth); default random init",
    "encoder": "SAM-family encoder name (sam_vit_b, medsam_vit_b, sam2_hiera_t, ...)",
    "checkpoint": "the encoder's official checkpoint file; without it the encoder has RANDOM weights",
    "encoder_arch": "'tiny' = tiny random-weight configuration (tests, demo)",
    "encoder_image_size": "SAM input size (multiple of 16; default 1024)",
    "image_size": "backbone input size",
    "monitor": "validation metric for early stopping (auc, accuracy, balanced_accuracy, f1_macro, loss)",
    "label_fraction": "fraction of training labels used (stratified, at least one per class)",
    "slca_window": "SLCA window size k (SAM grid cells per window side)",
    "slca_reduction": "SLCA bottleneck reduction r",
    "slca_pooling": "avg | avgmax",
    "slca_mode": "multiply (x*a) | residual (x*(1+a))",
    "slca_stages": "'all' (stride >= 4), 'last', or feature_info indices like '2,3'",
    "sam_feature": "SAM feature feeding SLCA / the linear probe: neck, or an encoder block index / SAM 2 level",
    "augment": "flip (image and SAM grid flipped together, plus brightness/contrast) | photometric | none",
    "store": "embedding store directory (default OUT/embeddings)",
}


def add_config_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per ClassifyConfig field (`--label-fraction`), defaults from the dataclass."""
    defaults = ClassifyConfig()
    for f in fields(ClassifyConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("encoder_image_size",):
            kind = int
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default, help=_HELP.get(f.name)
        )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> ClassifyConfig:
    names = {f.name for f in fields(ClassifyConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return ClassifyConfig.from_mapping(values)
