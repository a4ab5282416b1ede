"""`FewShotConfig`: every setting of one few-shot run, flat (one flag each), as the engine's other task configs.

The method options (`FewShotOptions`), the overlay style (`OverlayStyle`, flags `--overlay-*`) and the SAM 2
generator settings (`MaskerSettings`) keep their defaults in their own dataclasses: the fields here are derived from
them, so a default is stated once. `cfg.options`, `cfg.overlay` and `cfg.masker_settings` rebuild those objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from pydantic import create_model, field_validator

from samadapt.encoders.masks import MaskerSettings
from samadapt.engine.config import RunConfig, bounded, setting
from samadapt.tasks.fewshot.methods import METHODS, FewShotOptions
from samadapt.tasks.fewshot.overlay import OverlayStyle

_OPTION_HELP = {
    "prompt_template": "class prompt with {class}",
    "epochs": "fine-tuning epochs (medfocus, medfocus-attn, clip-finetune)",
    "lr": "image-tower fine-tuning learning rate",
    "trainable_blocks": "-1: fine-tune the whole CLIP image tower; k: only its last k blocks",
    "monitor": "validation metric for early stopping",
    "attn_strength": "medfocus-attn bias strength",
    "attn_layers": "medfocus-attn: block indices that get the bias (default: the method's own)",
    "max_area_fraction": "masks covering more of the image are background for medfocus-attn",
    "coop_optimizer": "sgd: CoOp's recipe (momentum 0.9, wd 5e-4, 1 warmup epoch at 1e-5); adamw: no warmup",
    "palette": "matplotlib colormap or comma-separated colours",
}


def _fields_of(cls: type, *, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = _OPTION_HELP.get(f.name, f.name.replace("_", " "))
        fields[prefix + f.name] = (hints[f.name], setting(default, help_text))
    return fields


class _Base(RunConfig):
    task = "fewshot"

    data: str | None = setting(None, "dataset: image folder, MedMNIST .npz, CSV manifest, ISIC")
    data_fraction: float = setting(
        1.0, "fraction of the training labels, e.g. 0.05", aliases=("--budget",), sweep_flag="--budgets",
        sweep_aliases=("--data-fractions",),
    )  # fmt: skip
    seed: int = setting(0, "training seed", sweep_flag="--seeds")
    split_seed: int = setting(0, "seed of the val/test splits carved when the data has none")
    clip: str = setting(
        "ViT-B-16", "open_clip config name, an open_clip model config JSON, or a model folder"
    )
    clip_checkpoint: str | None = setting(None, "local CLIP weights (open_clip or OpenAI format)")
    quick_gelu: bool | None = setting(
        None,
        "QuickGELU activation: auto (default; on for OpenAI weights), on or off",
        aliases=("--clip-quickgelu",),
    )
    masker: str = setting("sam2_hiera_t", "SAM 2 registry name for automatic masks")
    masker_checkpoint: str | None = setting(None, "SAM 2 checkpoint (official {'model': ...} file)")
    masker_arch: Literal["default", "tiny"] | None = setting(
        None, "tiny: the registry's tiny SAM 2 (tests/demo)"
    )
    masker_image_size: int | None = setting(None, "SAM 2 input size (default 1024)")
    masker_implementation: Literal["fast", "official"] = setting(
        "fast", "fast (same masks, computed the fast way) or official (sam2's SAM2AutomaticMaskGenerator)"
    )
    mask_cache: str | None = setting(None, "mask cache folder (default OUT/mask_cache)", run_only=True)
    class_names: list[str] | None = setting(None, "comma-separated class names for the prompts")
    device: str | None = setting("cpu", "cpu, cuda or auto", run_only=True)

    @field_validator("quick_gelu", mode="before")
    @classmethod
    def _auto_on_off(cls, value: Any) -> Any:
        table = {
            "auto": None,
            "true": True,
            "on": True,
            "yes": True,
            "false": False,
            "off": False,
            "no": False,
        }
        if isinstance(value, str):
            if value.strip().lower() not in table:
                raise ValueError("expected auto, on or off")
            return table[value.strip().lower()]
        return value

    _fraction = bounded("data_fraction", low=0, high=1, strict=True)
    _size = bounded("masker_image_size", low=1)

    def check(self) -> None:
        self.options  # noqa: B018 (building the dataclasses runs their own checks)
        self.overlay  # noqa: B018

    @property
    def overlay(self) -> OverlayStyle:
        return OverlayStyle(
            **{f.name: getattr(self, "overlay_" + f.name) for f in dataclasses.fields(OverlayStyle)}
        )

    @property
    def options(self) -> FewShotOptions:
        names = [f.name for f in dataclasses.fields(FewShotOptions) if f.name not in ("overlay", "progress")]
        return FewShotOptions(
            **{n: getattr(self, n) for n in names}, overlay=self.overlay, progress=self.progress
        )

    @property
    def masker_settings(self) -> MaskerSettings:
        return MaskerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MaskerSettings)})


def _checks(fields: dict[str, Any]) -> dict[str, Any]:
    """Range checks for the derived numeric options (values that would only fail deep inside training)."""
    at_least_one = [k for k in ("points_per_side", "batch_size", "epochs", "coop_epochs", "tip_epochs", "coop_n_ctx",
                                "overlay_outline_width") if k in fields]  # fmt: skip
    non_negative = [k for k in ("patience", "weight_decay") if k in fields]
    positive = [k for k in ("lr", "coop_lr", "tip_lr") if k in fields]
    unit = [k for k in ("overlay_alpha", "max_area_fraction", "pred_iou_thresh", "stability_score_thresh")
            if k in fields]  # fmt: skip

    validators: dict[str, Any] = {}
    for names, bounds in ((at_least_one, {"low": 1}), (non_negative, {"low": 0}),
                          (positive, {"low": 0, "strict": True}), (unit, {"low": 0, "high": 1})):  # fmt: skip
        if names:
            validators[f"_check_{names[0]}"] = bounded(*names, **bounds)
    return validators


_DERIVED = {
    **_fields_of(FewShotOptions, skip=("overlay", "progress")),
    **_fields_of(OverlayStyle, prefix="overlay_"),
    **_fields_of(MaskerSettings),
}
_METHOD = (
    Literal[tuple(METHODS)],
    setting("medfocus", f"one of {', '.join(METHODS)}", sweep_flag="--methods"),
)  # type: ignore[valid-type]

FewShotConfig = create_model(  # type: ignore[call-overload]
    "FewShotConfig", __base__=_Base, __validators__=_checks(_DERIVED), method=_METHOD, **_DERIVED
)
FewShotConfig.__doc__ = __doc__

# MedFocusCLIP (arXiv 2501.03839) publishes no training recipe; its baselines follow their own papers' settings.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"masker_image_size": 1024, "points_per_side": 32, "pred_iou_thresh": 0.8,
                  "stability_score_thresh": 0.95, "coop_n_ctx": 16, "coop_lr": 0.002, "coop_optimizer": "sgd",
                  "tip_epochs": 20, "tip_lr": 0.001},
    "fast": {"masker_image_size": 512, "points_per_side": 16, "epochs": 10},
}  # fmt: skip
