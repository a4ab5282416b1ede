"""`export_encoder_onnx`: a samadapt `Encoder` as ONNX (preprocessed image -> embedding) plus its preprocessing JSON.

The ONNX model takes the preprocessed float32 batch ``image`` [B, 3, S, S] and returns ``embedding``
[B, 256, S/16, S/16], the neck output the embedding store holds (SAM / MedSAM: the ViT neck; SAM 2: the
predictor's ``image_embed``, with ``no_mem_embed`` added). ``preprocessing.json`` beside it says how to make the
input from a uint8 image (``describe_preprocessing``). SAM's ViT is traced in export mode (plain linears and
attention, ``samadapt.encoders.export_mode``), equal to its fast path to float rounding in fp32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samadapt.encoders.encoder import Encoder
from samadapt.errors import ConfigError
from samadapt.export.check import check_onnx
from samadapt.export.module import DEFAULT_OPSET, export_module_onnx
from samadapt.export.preprocessing import describe_preprocessing

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
# fp32 ONNX vs torch on random inputs: the largest error allowed, as a fraction of the output's largest value.
CHECK_TOLERANCE = 1e-4
CHECK_SEED = 1234


class EmbeddingOnly(nn.Module):
    """The encoder module's ``forward(x) -> (neck, features)`` reduced to ``forward(x) -> neck``."""

    def __init__(self, encoder_module: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder_module
        self.train(encoder_module.training)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)[0]


def export_encoder_onnx(
    encoder: Encoder,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    check: bool = True,
    preprocessing_path: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``encoder`` to ``path`` (``.onnx``) and write ``preprocessing.json`` beside it.

    ``dynamic_batch=False`` fixes the batch to 1. ``check`` runs the file in onnxruntime on new random inputs
    (seed ``CHECK_SEED``; 2 images, 1 with a fixed batch) against the encoder's torch fast path and puts the numbers
    under ``"check"`` (``max_abs_err``, ``err_over_max``, ...); ``"passed"`` there means the error is within
    ``CHECK_TOLERANCE`` of the output's largest value (a failure also warns; the caller decides what it means).
    bf16 encoders are refused (ConfigError): export an fp32 one.
    Returns ``{"onnx", "preprocessing", "input", "output", "opset", "encoder", "check"}`` (paths as strings, shapes
    with ``"batch"`` for the dynamic axis).
    """
    path = Path(path)
    if encoder.precision != "fp32" or next(encoder.module.parameters()).dtype != torch.float32:
        raise ConfigError(
            f"export {path}: {encoder.name} is loaded in {encoder.precision}; export needs precision='fp32'"
        )
    size = encoder.image_size
    batch = 2 if dynamic_batch else 1
    device = encoder.device
    example = torch.zeros(batch, 3, size, size, device=device)
    wrapper = EmbeddingOnly(encoder.module)
    export_module_onnx(
        wrapper,
        (example,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}} if dynamic_batch else None,
        opset=opset,
    )
    spec_pre = describe_preprocessing(encoder.spec.preprocessing, size)
    pre_path = (
        Path(preprocessing_path) if preprocessing_path is not None else path.with_name("preprocessing.json")
    )
    grid = encoder.embedding_grid
    batch_dim: int | str = "batch" if dynamic_batch else 1
    info: dict[str, Any] = {
        "onnx": str(path),
        "preprocessing": str(pre_path),
        "input": {"name": INPUT_NAME, "shape": [batch_dim, 3, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [batch_dim, 256, grid, grid], "dtype": "float32"},
        "opset": int(opset),
        "encoder": encoder.cache_key_fields(),
    }
    pre_path.write_text(
        json.dumps({**spec_pre, "model": {k: info[k] for k in ("input", "output", "encoder")}}, indent=2)
        + "\n"
    )
    info["check"] = None
    if check:
        generator = torch.Generator().manual_seed(CHECK_SEED)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        result = check_onnx(path, wrapper, (images,), atol=0.0)
        info["check"] = {k: v for k, v in result.items() if k not in ("outputs", "passed", "atol", "rtol")}
        info["check"]["passed"] = result["err_over_max"] <= CHECK_TOLERANCE
        if not info["check"]["passed"]:
            warnings.warn(
                f"export {path}: onnxruntime differs from torch by {result['max_abs_err']:.3g} "
                f"({result['err_over_max']:.2g} of the output max, allowed {CHECK_TOLERANCE})",
                stacklevel=2,
            )
    return info
