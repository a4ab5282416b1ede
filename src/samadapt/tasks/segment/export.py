"""What `samadapt export` writes for a segmentation run: the head (embedding -> class logits) or the U-Net
(pixels -> class logits), with the slice preparation and the way back to the volume spelled out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samadapt.engine.export import ExportItem
from samadapt.tasks.segment.config import SegmentConfig
from samadapt.tasks.segment.heads import EMBEDDING_HEADS, build_head
from samadapt.training.weights import load_weights, load_weights_into


def export_items(cfg: SegmentConfig, recorded: dict[str, Any], *, run: Path) -> tuple:
    num_classes = int(recorded["num_classes"])
    head = build_head(cfg.method, num_classes=num_classes, unet_channels=tuple(cfg.unet_channels),
                      mask_tokens_per_class=cfg.mask_tokens_per_class)  # fmt: skip
    load_weights_into(head, load_weights(run / "model.safetensors"), path=run / "model.safetensors")
    head.eval()
    glue = {
        "label_names": ["background", *recorded.get("label_names", [])],
        "slices": "per volume: clip to the 0.5-99.5 percentiles, min-max to 0-255 uint8; each slice (axes 0, 1) "
        "zero-padded right/bottom to a square of side max(H, W)",
        "to_labels": "logits resized bilinearly to side x side, cropped to H x W, argmax over classes",
    }
    if cfg.method in EMBEDDING_HEADS:
        channels, gh, gw = recorded.get("embedding_shape") or [
            256,
            cfg.encoder_size // 16,
            cfg.encoder_size // 16,
        ]
        item = ExportItem(
            name="model", module=head, example_inputs=(torch.zeros(2, channels, gh, gw),), input_names=["embedding"],
            output_names=["logits"], dynamic_axes={"embedding": {0: "batch"}},
            inputs={"embedding": "encoder.onnx's output for the square uint8 slice (preprocessing.json)"},
        )  # fmt: skip
    else:
        size = cfg.unet_image_size
        item = ExportItem(
            name="model", module=head, example_inputs=(torch.zeros(2, 1, size, size),), input_names=["pixels"],
            output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}},
            inputs={"pixels": f"[B, 1, {size}, {size}]: the square uint8 slice / 255, resized bilinearly "
                              "(antialiased) to the U-Net's size"},
        )  # fmt: skip
    return [item], glue
