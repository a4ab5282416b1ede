"""`ClassifyConfig`: every setting of one classification run (CLI flags and YAML keys are the field names)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from samadapt.engine.config import EncoderRunConfig, bounded, setting

METHODS = ("slca", "baseline", "linear-probe")
AUGMENTS = ("flip", "photometric", "none")


class ClassifyConfig(EncoderRunConfig):
    task = "classify"

    method: Literal["slca", "baseline", "linear-probe"] = setting(
        "slca",
        "slca | baseline (the backbone alone) | linear-probe (on pooled SAM embeddings)",
        sweep_flag="--methods",
    )
    data: str | None = setting(None, "dataset: MedMNIST .npz, ImageFolder, CSV manifest or ISIC 2017 folder")
    label_fraction: float = setting(
        1.0, "fraction of the training labels used (stratified, at least one per class)", aliases=("--budget",),
        sweep_flag="--budgets", sweep_aliases=("--label-fractions",),
    )  # fmt: skip
    seed: int = setting(0, "training seed (initialisation, label subset, data order)", sweep_flag="--seeds")
    backbone: str = setting(
        "resnet18",
        "timm model name (resnet18/50/152, seresnext26d_32x4d, legacy_senet154, densenet121, swinv2_*)",
    )
    backbone_weights: str | None = setting(
        None, "local timm checkpoint for the backbone (default: random init)"
    )
    backbone_image_size: int = setting(224, "the backbone's input size", deprecated=("--image-size",))
    epochs: int = setting(30, "training epochs (early stopping on --monitor)")
    batch_size: int = setting(32, "training batch size")
    lr: float = setting(3e-4, "AdamW learning rate")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    patience: int = setting(8, "early-stopping patience in epochs")
    monitor: Literal["auc", "accuracy", "balanced_accuracy", "f1_macro", "loss"] = setting(
        "auc", "validation metric for early stopping and the linear probe's C"
    )
    slca_window: int = setting(4, "SLCA window size k (SAM grid cells per window side)")
    slca_reduction: int = setting(16, "SLCA bottleneck reduction r")
    slca_pooling: Literal["avg", "avgmax"] = setting("avg", "SLCA window pooling")
    slca_mode: Literal["multiply", "residual"] = setting("residual", "multiply (x*a) or residual (x*(1+a))")
    slca_stages: str = setting("all", "'all' (stride >= 4), 'last', or feature_info indices like '2,3'")
    sam_feature: str = setting("neck", "SAM feature feeding SLCA / the linear probe: neck or a block index")
    augment: Literal["flip", "photometric", "none"] = setting(
        "flip", "flip (image and SAM grid together, plus brightness/contrast) | photometric | none"
    )
    val_fraction: float = setting(0.15, "validation share carved from train when the data has no val split")
    test_fraction: float = setting(0.15, "test share carved from train when the data has no test split")

    _at_least_one = bounded(
        "epochs", "batch_size", "patience", "slca_window", "slca_reduction", "backbone_image_size", "embed_batch_size",
        low=1,
    )  # fmt: skip
    _fraction = bounded("label_fraction", low=0, high=1, strict=True)
    _lr = bounded("lr", low=0, strict=True)
    _non_negative = bounded("weight_decay", "val_fraction", "test_fraction", low=0)

    @field_validator("sam_feature", "slca_stages", mode="before")
    @classmethod
    def _block_index_as_text(cls, value: Any) -> Any:
        """`sam_feature: 1` / `slca_stages: 2` in a YAML file are block indices, as `--sam-feature 1` is."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Named settings (`--preset`). The SLCA paper publishes no protocol (see docs): "reference" is the setting the
# paper's abstract and the MedMNIST benchmark imply (SAM at 1024, a backbone at 224, cross-entropy, full training),
# "fast" a CPU-friendly check of a real checkpoint.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"encoder_image_size": 1024, "backbone_image_size": 224, "epochs": 100, "patience": 20,
                  "batch_size": 32, "lr": 3e-4},
    "fast": {"encoder_image_size": 512, "backbone_image_size": 128, "epochs": 15, "patience": 5},
}  # fmt: skip
