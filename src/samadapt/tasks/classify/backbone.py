"""timm backbones as classifiers whose stages SLCA can reach: `feature_info` names each stage's module.

No per-model wiring: a stage is whatever module timm's `feature_info` lists (ResNet `layer2`, DenseNet
`features.denseblock3`, EfficientNet `blocks.4`, Swin-V2 `layers.2`), and SLCA rewrites that module's output
with a forward hook, so the next stage sees the attended features. Channels-last token grids (Swin-V2) are
known from the model's `output_fmt`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from samadapt.encoders.checkpoint import check_finite, read_checkpoint_file
from samadapt.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class StageInfo:
    index: int
    module: str
    channels: int
    reduction: int


def build_backbone(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """timm classifier `name` with a fresh `num_classes` head; weights random or from a local timm checkpoint.

    Models with a fixed input size (Swin-V2) get `img_size=image_size`.
    """
    # Fixed-size models (Swin-V2, ViTs) are built for the requested size; timm shrinks windows that do not fit.
    kwargs: dict[str, Any] = {"img_size": image_size} if _takes_img_size(name) else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ConfigError(f"backbone {name!r}: {exc}") from None
    if weights is not None:
        load_backbone_weights(model, weights)
    if not getattr(model, "feature_info", None):
        raise ConfigError(
            f"backbone {name!r}: timm lists no feature_info stages for it; SLCA cannot reach it"
        )
    if not channels_last_stages(model) and not _spatial_stages(model):
        raise ConfigError(
            f"backbone {name!r}: its stages are token sequences (a plain ViT/DeiT), not feature maps; SLCA needs "
            "a CNN or a hierarchical transformer (resnet*, seresnext*, densenet*, efficientnet*, swinv2_*)"
        )
    return model


def channels_last_stages(model: nn.Module) -> bool:
    """True when the model's stages emit [B, H, W, C] token grids (timm says so in `output_fmt`)."""
    return str(getattr(model, "output_fmt", "NCHW")) == "NHWC"


def stage_infos(model: nn.Module) -> list[StageInfo]:
    info = model.feature_info
    return [StageInfo(i, d["module"], int(d["num_chs"]), int(d["reduction"])) for i, d in enumerate(info)]


def resolve_stages(spec: str | list[int] | tuple[int, ...], stages: list[StageInfo]) -> list[StageInfo]:
    """`"all"` = every stage at stride >= 4 (the stem is skipped); `"last"`; or indices into feature_info
    ("2,3" or [-2, -1], negatives count from the end)."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return [s for s in stages if s.reduction >= 4]
        if text == "last":
            return [stages[-1]]
        try:
            spec = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--slca-stages {spec!r}: expected 'all', 'last' or comma-separated indices"
            ) from None
    chosen = []
    for index in spec:
        if not -len(stages) <= index < len(stages):
            raise ConfigError(
                f"--slca-stages index {index} out of range: the backbone has {len(stages)} stages (0..{len(stages) - 1})"
            )
        chosen.append(stages[index])
    return sorted(set(chosen), key=lambda s: s.index)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local timm checkpoint (.safetensors, or .pth/.bin read with weights_only=True) into `model`.

    The classifier head is skipped when its shape differs (another number of classes); any other missing or
    mismatched tensor is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    # The encoders' safe reader: weights_only pickles, safetensors, one clear line for a pickle payload or a
    # file cut short. Checkpoints are untrusted.
    state: Any = read_checkpoint_file(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: holds no state dict of backbone weights (found {type(state).__name__})"
        )
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    check_finite(state, path=path)  # NaN/Inf weights would train into a NaN loss, never naming the file
    own = model.state_dict()
    head = set(_head_keys(model))
    usable = {k: v for k, v in state.items() if k in own and (own[k].shape == v.shape or k not in head)}
    mismatched = [k for k in usable if own[k].shape != usable[k].shape]
    missing = [k for k in own if k not in usable and k not in head]
    if mismatched or missing:
        example = (mismatched or missing)[0]
        detail = f"{example}: expected {tuple(own[example].shape)}" + (
            f", found {tuple(state[example].shape)}" if example in state else ", not in the file"
        )
        raise CheckpointError(
            f"{path}: does not fit backbone {model.default_cfg.get('architecture', type(model).__name__)} "
            f"({len(missing)} tensors missing, {len(mismatched)} of another shape; e.g. {detail})"
        )
    model.load_state_dict({k: v for k, v in usable.items() if own[k].shape == v.shape}, strict=False)


def _head_keys(model: nn.Module) -> list[str]:
    classifier = model.default_cfg.get("classifier", "fc") if hasattr(model, "default_cfg") else "fc"
    names = classifier if isinstance(classifier, list | tuple) else [classifier]
    return [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]


def _spatial_stages(model: nn.Module) -> bool:
    """True when the stage modules emit [B, C, H, W] maps; a plain ViT's blocks (timm's VisionTransformer family,
    recognisable by its `cls_token` attribute) emit [B, N, C] token sequences."""
    return not hasattr(model, "cls_token")


def _takes_img_size(name: str) -> bool:
    return any(family in name for family in ("swin", "vit", "deit", "beit", "eva"))
