"""Export mode: the encoders' CPU fast paths switched to plain torch ops, for ONNX / TorchScript / torch.export.

The SAM ViT's oneDNN linear layers (``_sam_vit_linear.py``, ``torch.ops.mkldnn``) and its query-blocked attention
(``attention.py``, Python loops over heads and blocks with ``out=`` writes) have no ONNX equivalent or export into
an unrolled graph. Inside ``plain_torch_ops()`` they run as ``F.linear`` (+ ``F.gelu``) and one batched
softmax(q k^T + bias) v, the official arithmetic: equal to the fast paths to float rounding in fp32. Outside it
nothing changes. The switch is process-wide (a counter, so nested uses work); export runs it around tracing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0


@contextmanager
def plain_torch_ops() -> Iterator[None]:
    """Run the encoders with plain torch ops (no oneDNN packed linears, no blocked attention) in this block."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def plain_ops_active() -> bool:
    return _depth > 0
