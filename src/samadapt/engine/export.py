"""`samadapt export --run RUN --format onnx`: a trained run's encoder and task model as files other runtimes load.

Writes into OUT (default RUN/export): `encoder.onnx` + `preprocessing.json` (tasks with a SAM-family encoder),
one file per task model (`model.onnx`, or `.pt` / `.pt2` for `--format torchscript` / `torch_export`) and
`export.json`: what each file takes and returns, the steps between them (the `glue`), and the measured difference
between the exported file and samadapt's torch model on new random inputs (fp32).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samadapt.engine.config import load_run_config
from samadapt.engine.predict import checked_checkpoint
from samadapt.engine.task import Task
from samadapt.errors import ConfigError

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2"}
TOLERANCE = 1e-4  # of the output's largest value, fp32


class Probabilities(torch.nn.Module):
    """A classifier with one input, its logits turned into class probabilities (what predictions.csv holds)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


class Probabilities2(Probabilities):
    """The same for a classifier with two inputs (explicit arguments: torch.export maps them to named inputs)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.softmax(self.model(x, y), dim=1)


@dataclass
class ExportItem:
    """One task model to export: the module, example inputs, names, dynamic axes and how to feed it."""

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> what it is and how it is made


def export_run(
    task: Task, run: Path, *, out: Path, fmt: str, checkpoints: dict[str, Any], check: bool
) -> Path:
    if fmt not in SUFFIX:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(SUFFIX)}")
    from samadapt.export import check_export, export_encoder_onnx, export_module

    cfg, recorded = load_run_config(run, task.Config)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "task": task.name,
        "method": cfg.method,
        "run": str(run),
        "format": fmt,
        "files": {},
    }
    encoder = task.export_encoder(cfg, recorded, checkpoint=checkpoints.get("encoder"))
    if encoder is not None:
        info = export_encoder_onnx(encoder, out / "encoder.onnx", check=check)
        manifest["files"]["encoder.onnx"] = info
    items, glue = task.export_models(cfg, recorded, run=run, checkpoints=checkpoints)
    for item in items:
        path = out / f"{item.name}{SUFFIX[fmt]}"
        item.module.eval()
        export_module(item.module, item.example_inputs, path, format=fmt, input_names=item.input_names,
                      output_names=item.output_names, dynamic_axes=item.dynamic_axes)  # fmt: skip
        entry: dict[str, Any] = {"inputs": item.inputs, "outputs": item.output_names}
        if check:
            generator = torch.Generator().manual_seed(1)
            fresh = tuple(_like(t, generator) for t in item.example_inputs)
            with torch.no_grad():
                reference = item.module(*fresh)
            scale = max(float(reference.abs().max()), 1e-12)
            entry["check"] = check_export(path, item.module, fresh, atol=TOLERANCE * scale)
            entry["check"]["tolerance_of_max"] = TOLERANCE
        manifest["files"][path.name] = entry
    manifest["glue"] = glue
    (out / "export.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out / "export.json"


def _like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if t.dtype.is_floating_point:
        low, high = float(t.min()), float(t.max())
        span = high - low if high > low else 1.0
        return torch.rand(t.shape, generator=generator) * span + low
    return t.clone()


def export(task: Task, rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"samadapt export --task {task.name}")
    parser.add_argument("--task", default=task.name)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder")
    parser.add_argument(
        "--format", default="onnx", choices=tuple(SUFFIX), help="onnx (default), torchscript, torch_export"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/export)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the encoder checkpoint, if it moved")
    parser.add_argument("--clip-checkpoint", default=None, help="fewshot: CLIP weights, if moved")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime / torch comparison")
    args = parser.parse_args(rest)
    cfg, recorded = load_run_config(args.run, task.Config)
    checkpoints = {}
    for what, saved, sha in task.checkpoints(cfg, recorded):
        if what == "masker":
            continue  # SAM 2's automatic masks are not part of the exported graph (export.json says so)
        given = getattr(args, "checkpoint" if what == "encoder" else f"{what}_checkpoint", None)
        checkpoints[what] = checked_checkpoint(what, given, saved, sha)
    path = export_run(task, args.run, out=args.out or args.run / "export", fmt=args.format, checkpoints=checkpoints,
                      check=not args.no_check)  # fmt: skip
    print(f"export: {path}")
    return 0
