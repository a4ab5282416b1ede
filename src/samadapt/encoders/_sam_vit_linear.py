"""Linear layers for CPU inference through oneDNN with pre-packed weights, the bias and GELU fused in.

``F.linear`` on CPU copies the bias into the output, runs the GEMM on it, and GELU is another pass; oneDNN's
``_linear_pointwise`` (the kernel torch.compile's CPU freezing path uses) does all of it in one GEMM on a weight
packed once. Measured on a 2-core AVX-512 machine (4096 x 768 -> 3072 + GELU): bf16 129 -> 105 ms, fp32
278 -> 210 ms, with fp32 results equal to ``F.linear`` to float rounding. Anything else (autograd, GPUs, builds or
CPUs without oneDNN bf16, and export mode: ``export_mode.plain_torch_ops``) uses ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samadapt.encoders.export_mode import plain_ops_active

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_BF16_OK = _HAS_ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: Tensor, layer: nn.Linear, *, gelu: bool = False) -> Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``gelu``."""
    if _use_onednn(x, layer):
        attr, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(layer), layer.bias, attr, [], algorithm)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def _use_onednn(x: Tensor, layer: nn.Linear) -> bool:
    if not _HAS_ONEDNN or plain_ops_active() or x.device.type != "cpu" or x.dtype != layer.weight.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return False  # the fused op has no backward
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16_OK)


def _packed_weight(layer: nn.Linear) -> Tensor:
    # Packed once per weight tensor; a new tensor (.to(dtype)) or an in-place change (load_state_dict bumps the
    # version counter) packs again. The packed copy is a plain attribute, so it never enters the state_dict.
    weight = layer.weight
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be changed in place)
        version = -1
    key = (weight.data_ptr(), version, weight.dtype)
    cached = getattr(layer, "_onednn_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        layer._onednn_packed = cached
    return cached[1]
