"""Export any torch module (task heads, classifiers, encoders) to ONNX, TorchScript or a torch.export program.

ONNX goes through the ``torch.onnx.export(dynamo=True)`` exporter (``torch.export`` tracing, then onnxscript),
with dynamic axes named per input (``{"image": {0: "batch"}}``); the same axis name on two inputs is one
dimension. Example inputs must be at least 2 along every dynamic axis (torch.export specialises sizes 0 and 1).
Where ONNX cannot express a part, ``format="torchscript"`` (``torch.jit.trace``) or ``format="torch_export"``
(``torch.export.save``, a ``.pt2`` file) are the fallbacks; ``check.check_export`` runs any of the three
against torch. Everything runs inside ``plain_torch_ops()`` (the encoders' fast CPU paths off, see
``samadapt.encoders.export_mode``) and under ``torch.no_grad()``, with the module in eval mode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samadapt.encoders.export_mode import plain_torch_ops
from samadapt.errors import ConfigError

DEFAULT_OPSET = 18  # the lowest opset the dynamo exporter writes; onnxruntime >= 1.14 runs it
# Protobuf caps a single ONNX file at 2 GiB; above this the weights go to `<file>.data` beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000

DynamicAxes = Mapping[str, Mapping[int, str]]


def export_module_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``module`` as an ONNX model at ``path`` and return the path.

    ``dynamic_axes`` maps input names to ``{axis: dimension name}``; output axes follow from the graph.
    Weights go to ``<path>.data`` beside the file when they pass ~1.8 GB (protobuf's limit is 2 GiB).
    """
    path = _prepare(path, example_inputs, input_names=input_names, dynamic_axes=dynamic_axes)
    shapes = _dynamic_shapes(module, example_inputs, input_names=input_names, dynamic_axes=dynamic_axes)
    external = _parameter_bytes(module) > EXTERNAL_DATA_BYTES
    with _export_context(module):
        torch.onnx.export(
            module,
            tuple(example_inputs),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=shapes,
            opset_version=int(opset),
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    return path


def export_module_torchscript(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str] = (),
    output_names: Sequence[str] = (),
    dynamic_axes: DynamicAxes | None = None,
    opset: int | None = None,
) -> Path:
    """TorchScript fallback (``torch.jit.trace``): any batch size runs where the traced ops are shape-generic."""
    del output_names, opset  # TorchScript keeps positional inputs and outputs
    path = _prepare(path, example_inputs, input_names=input_names, dynamic_axes=dynamic_axes)
    with _export_context(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values frozen into the trace
        traced = torch.jit.trace(module, tuple(example_inputs), check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
    return path


def export_module_program(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str] = (),
    dynamic_axes: DynamicAxes | None = None,
    opset: int | None = None,
) -> Path:
    """``torch.export`` fallback: an ExportedProgram saved with ``torch.export.save`` (``.pt2``)."""
    del output_names, opset
    path = _prepare(path, example_inputs, input_names=input_names, dynamic_axes=dynamic_axes)
    shapes = _dynamic_shapes(module, example_inputs, input_names=input_names, dynamic_axes=dynamic_axes)
    with _export_context(module):
        program = torch.export.export(module, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
        torch.export.save(program, str(path))
    return path


EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": export_module_onnx,
    "torchscript": export_module_torchscript,
    "torch_export": export_module_program,
}
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2"}


def export_module(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    format: str = "onnx",
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """``EXPORTERS[format](...)``: one entry point for ``--format onnx|torchscript|torch_export``."""
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](
        module,
        example_inputs,
        path,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset=opset,
    )


def _prepare(
    path: str | Path,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    input_names: Sequence[str],
    dynamic_axes: DynamicAxes | None,
) -> Path:
    path = Path(path)
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ConfigError(f"export {path}: example_inputs must be a tuple of tensors")
    if input_names and len(input_names) != len(example_inputs):
        raise ConfigError(
            f"export {path}: {len(input_names)} input names for {len(example_inputs)} example inputs"
        )
    for name, axes in (dynamic_axes or {}).items():
        if name not in input_names:
            raise ConfigError(f"export {path}: dynamic axes name {name!r}, which is not an input name")
        tensor = example_inputs[list(input_names).index(name)]
        for axis in axes:
            if not -tensor.ndim <= axis < tensor.ndim or tensor.shape[axis] < 2:
                raise ConfigError(
                    f"export {path}: dynamic axis {axis} of input {name!r} (shape {tuple(tensor.shape)}) must "
                    "exist and be at least 2 in the example (torch.export fixes sizes 0 and 1)"
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _dynamic_shapes(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    input_names: Sequence[str],
    dynamic_axes: DynamicAxes | None,
) -> tuple[dict[int, Any] | None, ...] | None:
    """torch.export's per-input dynamic shapes from ONNX-style named axes (one Dim per distinct name)."""
    if not dynamic_axes:
        return None
    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for i, _ in enumerate(example_inputs):
        axes = dynamic_axes.get(input_names[i]) if i < len(input_names) else None
        if not axes:
            shapes.append(None)
            continue
        shapes.append({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()})
    return tuple(shapes)


@contextlib.contextmanager
def _export_context(module: nn.Module):
    # Every submodule's own mode comes back afterwards (a wrapper in train mode around a frozen eval encoder must
    # not put the encoder, with its BatchNorms, into train mode).
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.WARNING)
    try:
        # The dynamo exporter prints its progress to stdout; a library stays quiet.
        with (
            plain_torch_ops(),
            torch.no_grad(),
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
        ):
            # SAM 2's official position encoding caches tensors on itself while tracing: values are right (the
            # checks compare them), the warning is only noise for a user.
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            # one named axis on several inputs (images and SAM windows share "batch"): what we asked for
            warnings.filterwarnings(
                "ignore", message=".*shares the same shape constraints with another axis.*"
            )
            yield
    finally:
        onnx_log.setLevel(level)
        for submodule, training in modes:
            submodule.training = training


def _parameter_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
