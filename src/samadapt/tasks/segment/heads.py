"""The segmentation heads by name: three on the frozen encoder's embedding, and the U-Net baseline on pixels."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from samadapt.errors import ConfigError
from samadapt.tasks.segment.autosam import DEFAULT_MASK_TOKENS_PER_CLASS, AutoSamHead
from samadapt.tasks.segment.conv_heads import CnnHead, LinearHead
from samadapt.tasks.segment.slices import UNET_IMAGE_SIZE

UNET_CHANNELS = (32, 64, 128, 256, 512)


def _unet(*, num_classes: int, unet_channels: tuple[int, ...] = UNET_CHANNELS) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=num_classes,
        channels=tuple(unet_channels),
        strides=(2,) * (len(unet_channels) - 1),
        num_res_units=2,
    )


def _autosam(
    *,
    num_classes: int,
    mask_tokens_per_class: int = DEFAULT_MASK_TOKENS_PER_CLASS,
    learn_iou_token: bool = False,
    **_: object,
) -> nn.Module:
    return AutoSamHead(
        num_classes=num_classes, mask_tokens_per_class=mask_tokens_per_class, learn_iou_token=learn_iou_token
    )


HEADS: dict[str, Callable[..., nn.Module]] = {
    "autosam": _autosam,
    "cnn": lambda *, num_classes, **_: CnnHead(num_classes=num_classes),
    "linear": lambda *, num_classes, **_: LinearHead(num_classes=num_classes),
    "unet": lambda *, num_classes, unet_channels=UNET_CHANNELS, **_: _unet(
        num_classes=num_classes, unet_channels=unet_channels
    ),
}
EMBEDDING_HEADS = ("autosam", "cnn", "linear")  # trained on the encoder's embedding; "unet" sees pixels
CHECKPOINT_INIT = ("autosam", "linear")  # start from the checkpoint's mask decoder tensors


def build_head(
    name: str,
    *,
    num_classes: int,
    unet_channels: tuple[int, ...] = UNET_CHANNELS,
    mask_tokens_per_class: int = DEFAULT_MASK_TOKENS_PER_CLASS,
    learn_iou_token: bool = False,
) -> nn.Module:
    """A head by name; `mask_tokens_per_class` and `learn_iou_token` reach the autosam head (the others have no
    tokens)."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    if mask_tokens_per_class < 1:
        raise ConfigError(f"mask_tokens_per_class must be at least 1, got {mask_tokens_per_class}")
    return HEADS[name](
        num_classes=num_classes,
        unet_channels=unet_channels,
        mask_tokens_per_class=mask_tokens_per_class,
        learn_iou_token=learn_iou_token,
    )


def input_size(head: str, *, image_size: int, unet_image_size: int = UNET_IMAGE_SIZE) -> int:
    """The side of what `head` is trained on: the encoder's input for embedding heads, its own for the U-Net.

    The loss grid follows it: ``loss_grid(input_size(head, image_size=..., unet_image_size=...))``."""
    return image_size if head in EMBEDDING_HEADS else unet_image_size


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
