"""Model weights on disk: safetensors only, written atomically; reading never unpickles."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from samadapt.errors import CheckpointError
from samadapt.utils.atomic import atomic_write_with


def save_weights(
    path: str | os.PathLike[str], state: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict as safetensors (tensors made contiguous, on CPU; shared storage cloned)."""
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return Path(path)


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_weights_into(
    model: nn.Module, state: dict[str, torch.Tensor], *, path: str | os.PathLike[str]
) -> None:
    """`model.load_state_dict(state, strict=True)`; weights of another run or model (missing or unexpected keys,
    other shapes) raise one CheckpointError naming `path` instead of torch's multi-line RuntimeError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: does not fit the run's model ({detail})") from None
