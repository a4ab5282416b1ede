"""Safe checkpoint loading: untrusted files, many containers, one clear error when something is wrong.

Accepted containers: SAM / MedSAM / MobileSAM flat state dicts (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``), ``{"model": ...}`` (SAM 2, MedSAM training files), ``{"state_dict": ...}`` (Lightning),
``module.`` prefixes (DDP), encoder-only files, and ``.safetensors``. Pickles are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never executable objects.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from samadapt.errors import CheckpointError

_SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_hash_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) so a big checkpoint is hashed once per process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def _read_raw(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a .pth/.pt/.safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix in _SAFETENSORS_SUFFIXES or (head[8:9] == b"{" and not head.startswith(b"PK")):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError (a plain Exception subclass)
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        # torch.save's zip container without its central directory (at the end): the file was cut short.
        raise CheckpointError(
            f"checkpoint {path}: truncated or corrupt ({size} bytes; the download may be incomplete)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"checkpoint {path}: refused, it contains pickled Python objects other than tensors "
                "(samadapt never executes code from a checkpoint; re-save it as a plain state dict or safetensors)"
            ) from None
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            # A bare pickle stream (pickle.dump, not torch.save) with opcodes the safe loader does not take.
            raise CheckpointError(
                f"checkpoint {path}: refused, it is a plain Python pickle, not a torch.save or safetensors file "
                "(samadapt never unpickles arbitrary objects; re-save it with torch.save or safetensors)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint (unrecognised content; expected a torch.save "
            ".pth/.pt file or a .safetensors file)"
        ) from None
    except Exception as exc:  # torch.load raises many types on garbage: all mean "not a checkpoint"
        text = str(exc) or type(exc).__name__
        if "failed finding central directory" in text or "EOF" in text or isinstance(exc, EOFError):
            raise CheckpointError(
                f"checkpoint {path}: truncated or corrupt ({size} bytes; the download may be incomplete)"
            ) from None
        if isinstance(exc, KeyError | IndexError):  # a bare byte value: meaningless to a user
            text = "unrecognised content; expected a torch.save .pth/.pt file or a .safetensors file"
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint ({text.splitlines()[0][:200]})"
        ) from None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Containers nest: {"model": {...}}, {"state_dict": {...}}; take the first dict of tensors.
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {path}: holds no state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {path}: holds no tensors (keys: {', '.join(list(obj)[:5])})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_checkpoint_file(path: str | os.PathLike[str]) -> object:
    """The file's contents as saved (a dict, possibly nested), read the safe way; no unwrapping.

    For loaders with their own container conventions (timm's ``state_dict_ema``); pickled code is refused and a
    missing, empty or truncated file is one CheckpointError naming it, as in `load_state_dict_safely`.
    """
    return _read_raw(Path(path))


def load_state_dict_safely(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict, never executing pickled code."""
    p = Path(path)
    return _unwrap(_read_raw(p), p)


def check_finite(state: dict[str, torch.Tensor], *, path: str | os.PathLike[str]) -> None:
    """Refuse NaN/Inf weights: they would silently produce NaN embeddings for every image."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} contains NaN or Inf values")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def describe_contents(state: dict[str, torch.Tensor]) -> str:
    """Say what a state dict holds, in the words an error message needs."""
    from samadapt.encoders.sam3_vit import describe_sam3

    sam3 = describe_sam3(state)
    if sam3 is not None:
        return sam3
    if "image_encoder.patch_embed.seq.0.c.weight" in state:
        from samadapt.encoders.mobilesam import describe_tinyvit_state

        return describe_tinyvit_state(state)  # MobileSAM or LiteMedSAM, told by the patch-embedding kernel
    sam_key = next(
        (k for k in ("image_encoder.patch_embed.proj.weight", "patch_embed.proj.weight") if k in state), None
    )
    if sam_key is not None and not any(k.startswith("image_encoder.trunk.") for k in state):
        prefix = sam_key[: -len("patch_embed.proj.weight")]
        dim = state[sam_key].shape[0]
        depth = len(_block_ids(state, prefix))
        name = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(dim, "ViT")
        return f"a SAM {name} image encoder (embed dim {dim}, {depth} blocks)"
    if "image_encoder.trunk.patch_embed.proj.weight" in state:
        dim = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
        depth = len(_block_ids(state, "image_encoder.trunk."))
        return f"a SAM 2 Hiera image encoder (embed dim {dim}, {depth} blocks)"
    if any(k.startswith("visual.") for k in state):
        return "a CLIP model, not a Segment Anything image encoder"
    sample = ", ".join(list(state)[:3])
    return f"no Segment Anything image encoder (first keys: {sample})"


def _block_ids(state: dict[str, torch.Tensor], prefix: str) -> set[str]:
    sub = strip_prefix(state, prefix + "blocks.")
    return {k.split(".", 1)[0] for k in sub}
