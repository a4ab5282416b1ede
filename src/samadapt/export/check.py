"""Run an exported file on new inputs and compare it with the torch module it came from.

``check_onnx`` runs onnxruntime (``CPUExecutionProvider``); ``check_torchscript`` / ``check_program`` load the
fallback formats. Each returns ``{"passed", "max_abs_err", "max_rel_err", "ref_max_abs", "err_over_max",
"outputs": [per-output dicts], "atol", "rtol"}``: ``passed`` means every element satisfies
``|exported - torch| <= atol + rtol * |torch|`` (``numpy.allclose``'s rule) and no output is NaN where torch's is
not. The caller decides what a failure means (tests assert ``passed``; a CLI would print the numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.errors import ConfigError

TorchFn = Callable[..., torch.Tensor | Sequence[torch.Tensor]]


def check_onnx(
    path: str | Path, torch_fn: TorchFn, inputs: Sequence[torch.Tensor], *, atol: float, rtol: float = 0.0
) -> dict[str, Any]:
    """Outputs of ``path`` under onnxruntime vs ``torch_fn(*inputs)``, inputs fed in the model's input order."""
    import onnxruntime as ort

    path = Path(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ConfigError(f"{path}: the ONNX model takes {len(names)} inputs ({names}), got {len(inputs)}")
    feed = {name: t.detach().cpu().float().numpy() for name, t in zip(names, inputs)}
    got = session.run(None, feed)
    return compare(got, _torch_outputs(torch_fn, inputs), atol=atol, rtol=rtol)


def check_torchscript(
    path: str | Path, torch_fn: TorchFn, inputs: Sequence[torch.Tensor], *, atol: float, rtol: float = 0.0
) -> dict[str, Any]:
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        got = _as_list(loaded(*inputs))
    return compare([t.numpy() for t in got], _torch_outputs(torch_fn, inputs), atol=atol, rtol=rtol)


def check_program(
    path: str | Path, torch_fn: TorchFn, inputs: Sequence[torch.Tensor], *, atol: float, rtol: float = 0.0
) -> dict[str, Any]:
    program = torch.export.load(str(path))
    with torch.no_grad():
        got = _as_list(program.module()(*inputs))
    return compare([t.numpy() for t in got], _torch_outputs(torch_fn, inputs), atol=atol, rtol=rtol)


CHECKERS: dict[str, Callable[..., dict[str, Any]]] = {
    ".onnx": check_onnx,
    ".pt": check_torchscript,
    ".pt2": check_program,
}


def check_export(
    path: str | Path, torch_fn: TorchFn, inputs: Sequence[torch.Tensor], *, atol: float, rtol: float = 0.0
) -> dict[str, Any]:
    """The checker for the file's format, by suffix: ``.onnx``, ``.pt`` (TorchScript), ``.pt2`` (torch.export)."""
    suffix = Path(path).suffix
    if suffix not in CHECKERS:
        raise ConfigError(f"{path}: unknown export suffix {suffix!r}; expected one of {', '.join(CHECKERS)}")
    return CHECKERS[suffix](path, torch_fn, inputs, atol=atol, rtol=rtol)


def compare(
    got: Sequence[np.ndarray], expected: Sequence[np.ndarray], *, atol: float, rtol: float
) -> dict[str, Any]:
    if len(got) != len(expected):
        raise ConfigError(f"the export returned {len(got)} outputs, torch returned {len(expected)}")
    per_output = []
    for a, b in zip(got, expected):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            per_output.append({"passed": False, "shape": list(a.shape), "expected_shape": list(b.shape)})
            continue
        diff = np.abs(a - b)
        ref_max = float(np.abs(b).max()) if b.size else 0.0
        nan_ok = bool(np.array_equal(np.isnan(a), np.isnan(b)))
        finite = ~np.isnan(b)
        max_abs = float(diff[finite].max()) if finite.any() else 0.0
        rel = diff[finite] / np.maximum(np.abs(b[finite]), np.finfo(np.float32).tiny)
        per_output.append(
            {
                "passed": nan_ok and bool(np.all(diff[finite] <= atol + rtol * np.abs(b[finite]))),
                "shape": list(a.shape),
                "max_abs_err": max_abs,
                "max_rel_err": float(rel.max()) if rel.size else 0.0,
                "ref_max_abs": ref_max,
                "err_over_max": max_abs / ref_max if ref_max > 0 else max_abs,
            }
        )
    summary: dict[str, Any] = {"passed": all(o["passed"] for o in per_output), "atol": atol, "rtol": rtol}
    for key in ("max_abs_err", "max_rel_err", "ref_max_abs", "err_over_max"):
        summary[key] = max((o.get(key, float("inf")) for o in per_output), default=0.0)
    summary["outputs"] = per_output
    return summary


def _torch_outputs(torch_fn: TorchFn, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    # The reference runs the model's default (fast) paths: the check covers the export mode's equivalence too.
    with torch.no_grad():
        return [t.detach().cpu().float().numpy() for t in _as_list(torch_fn(*inputs))]


def _as_list(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)
