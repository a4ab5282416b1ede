"""What `samadapt export` writes for a classification run: the model that turns the encoder's embedding (slca,
linear-probe) and the backbone-size image (slca, baseline) into class probabilities, with the glue spelled out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from samadapt.engine.export import ExportItem, Probabilities, Probabilities2
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.training.weights import load_weights, load_weights_into


class ProbeModel(nn.Module):
    """The linear probe on the embedding: global average and max pooling, standardisation, logits, softmax."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in ("mean", "scale", "coef", "intercept"):
            self.register_buffer(name, weights[name].float())

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = torch.cat([embedding.mean(dim=(2, 3)), embedding.amax(dim=(2, 3))], dim=1)
        return torch.softmax(((x - self.mean) / self.scale) @ self.coef.T + self.intercept, dim=1)


def export_items(
    cfg: ClassifyConfig, recorded: dict[str, Any], *, run: Path, checkpoint: str | None
) -> tuple:
    from samadapt.tasks.classify.slca import pooled_grid
    from samadapt.tasks.classify.train import backbone_norm, build_model

    class_names = [str(c) for c in recorded.get("class_names") or []]
    weights = load_weights(run / "model.safetensors")
    fields = recorded.get("encoder_fields") or {}
    size = int(fields.get("image_size") or cfg.encoder_image_size or 1024)
    channels, grid, _ = recorded.get("embedding_shape") or [256, size // 16, size // 16]
    glue: dict[str, Any] = {"class_names": class_names, "output": "probabilities [B, classes], softmax"}
    if cfg.method == "linear-probe":
        item = ExportItem(
            name="model", module=ProbeModel(weights), example_inputs=(torch.zeros(2, channels, grid, grid),),
            input_names=["embedding"], output_names=["probabilities"], dynamic_axes={"embedding": {0: "batch"}},
            inputs={"embedding": "encoder.onnx's output for the image (preprocessing.json)"},
        )  # fmt: skip
        return [item], glue
    sam_channels = channels if cfg.method == "slca" else 0
    model = build_model(cfg, num_classes=len(class_names), sam_channels=sam_channels)
    load_weights_into(model, weights, path=run / "model.safetensors")
    mean, std = backbone_norm(model)
    side = cfg.backbone_image_size
    glue["images"] = {"resize": f"square {side} x {side}, PIL bilinear, RGB", "scale": "/255", "mean": mean,
                      "std": std}  # fmt: skip
    inputs = {"images": f"[B, 3, {side}, {side}] float32: the image resized and normalised (glue.images)"}
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, side, side),)
    names = ["images"]
    if cfg.method == "slca":
        gh, gw = pooled_grid((grid, grid), cfg.slca_window)
        pooled = channels * (2 if cfg.slca_pooling == "avgmax" else 1)
        example += (torch.zeros(2, pooled, gh, gw),)
        names.append("sam_windows")
        inputs["sam_windows"] = (
            f"[B, {pooled}, {gh}, {gw}]: the embedding's cells that cover the image (SAM pads right/bottom: rows "
            f"ceil(h * {size} / max(h, w) / 16), likewise columns), adaptive {cfg.slca_pooling} pooling to {gh} x {gw}"
        )
        glue["sam_windows"] = {"window": cfg.slca_window, "pooling": cfg.slca_pooling, "grid": [gh, gw]}
    wrapper = Probabilities2(model) if cfg.method == "slca" else Probabilities(model)
    item = ExportItem(name="model", module=wrapper, example_inputs=example, input_names=names,
                      output_names=["probabilities"], dynamic_axes={n: {0: "batch"} for n in names}, inputs=inputs)  # fmt: skip
    return [item], glue
