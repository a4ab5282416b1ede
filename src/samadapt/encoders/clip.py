"""CLIP through open_clip from a local file: no downloads, safe loading, OpenAI QuickGELU handled.

`--clip NAME` is an open_clip model config name (``ViT-B-16``, ``ViT-B-32-quickgelu``, ...) or the path of an
open_clip model config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``; tests use a tiny one).
`--clip-checkpoint FILE` is an open_clip state dict (``.pt``/``.bin``/``.safetensors``, optionally wrapped in
``{"state_dict": ...}`` with ``module.`` prefixes) or one of OpenAI's original TorchScript archives.

QuickGELU: OpenAI's CLIP weights were trained with QuickGELU, most LAION/DataComp weights with nn.GELU, and the
weights themselves do not say which. ``quick_gelu=None`` (auto) turns it on when the config name ends in
``-quickgelu`` or the config sets it, or when the file is in OpenAI's format (a TorchScript archive, or a state
dict carrying OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries, or a file or folder
name with ``openai``, as converted copies such as ``timm/vit_base_patch16_clip_224.openai`` have); pass
True/False to override. The decision is recorded in the run config.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from samadapt.encoders.checkpoint import check_finite, load_state_dict_safely, sha256_file
from samadapt.encoders.masks import quiet_root_logger
from samadapt.errors import CheckpointError, ConfigError

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# A tiny open_clip config of the standard CLIP builder (ViT image tower, CLIP text tower with the real BPE
# vocabulary), for tests and the CPU demo with random weights.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class ClipModel:
    """A loaded open_clip model with its tokenizer, preprocessing and identity (for caches and run configs)."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    checkpoint: Path | None
    checkpoint_sha256: str | None
    quick_gelu: bool
    preprocess_cfg: dict[str, Any]
    model_cfg: dict[str, Any]

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def patch_grid(self) -> int:
        """Side of the ViT patch grid (image_size / patch_size); ViT image towers only."""
        visual = self.model.visual
        grid = getattr(visual, "grid_size", None)
        if grid is None:
            raise ConfigError(f"CLIP {self.name}: image tower {type(visual).__name__} has no ViT patch grid")
        return int(grid[0])

    def transform(self):
        """open_clip's own eval transform (resize, center crop, normalise) for PIL images."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 HxW or HxWx3 image -> float32 [3, S, S] exactly as open_clip preprocesses it."""
        return self.transform()(to_pil_rgb(image))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [len(texts), D]."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenize(texts).to(device), normalize=True).float()

    def identity(self) -> dict[str, Any]:
        """What makes two CLIP models the same (for caches and the run config)."""
        return {
            "clip": self.name,
            "clip_checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "clip_checkpoint_sha256": self.checkpoint_sha256,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
        }


def to_pil_rgb(image: np.ndarray) -> Image.Image:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ConfigError(f"expected a uint8 image, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"expected an HxW or HxWx3 image, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def resolve_config(name: str) -> tuple[str, dict[str, Any]]:
    """Config name (registered in open_clip) and its dict, from a built-in name or a JSON file path."""
    import open_clip

    path = Path(name).expanduser()
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"CLIP config {path}: file not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"CLIP config {path}: not valid JSON ({exc})") from None
        cfg = cfg.get("model_cfg", cfg)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ConfigError(
                f"CLIP config {path}: missing keys {missing} (expected an open_clip model config)"
            )
        open_clip.add_model_config(path)  # registers it under the file stem
        return path.stem, cfg
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT", "RN")))
        raise ConfigError(
            f"unknown CLIP model {name!r}; use an open_clip config name ({known}) or a JSON file"
        )
    return name.replace("/", "-"), cfg


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_clip_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is_openai_format). Never unpickles arbitrary objects.

    OpenAI's release files are TorchScript archives; `torch.jit.load` rebuilds them from TorchScript code and a
    restricted unpickler (no arbitrary Python), and we only keep the tensors.
    """
    p = Path(path).expanduser()
    if p.is_file() and _is_torchscript(p):
        try:
            with (
                warnings.catch_warnings()
            ):  # torch.jit.load is deprecated in recent torch, still the only reader
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(p), map_location="cpu")
        except RuntimeError as exc:
            raise CheckpointError(f"CLIP checkpoint {p}: unreadable TorchScript archive ({exc})") from None
        # the causal text mask may come along as a buffer (-inf above the diagonal): it is not a weight
        state = {
            k: v
            for k, v in module.state_dict().items()
            if k not in _OPENAI_EXTRA_KEYS and k.rsplit(".", 1)[-1] != "attn_mask"
        }
        return state, True
    state = load_state_dict_safely(p)
    # converted OpenAI weights keep the release name in the file or a near folder (e.g. the Hugging Face cache
    # models--timm--vit_base_patch16_clip_224.openai/snapshots/<hash>/open_clip_pytorch_model.bin)
    named_openai = any("openai" in part.lower() for part in p.parts[-4:])
    openai = any(k in state for k in _OPENAI_EXTRA_KEYS) or named_openai
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}, openai


def load_clip(
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Build open_clip model `name` (config name or JSON path) and load the local `checkpoint` into it, frozen.

    `checkpoint=None` keeps random weights (tests only). Raises CheckpointError naming the file when the
    checkpoint does not fit the config (e.g. a ViT-L file for ViT-B-16).
    """
    import open_clip
    from open_clip.factory import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    cfg_name, cfg = resolve_config(name)
    state, openai = (None, False)
    path = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state, openai = read_clip_state_dict(path)
        check_finite(state, path=path)
    use_quick_gelu = bool(cfg.get("quick_gelu", False) or openai) if quick_gelu is None else bool(quick_gelu)
    # open_clip logs each step, and warns "no pretrained weights" although we load them right after
    with quiet_root_logger(logging.WARNING):
        model = open_clip.create_model(
            cfg_name,
            pretrained=None,
            force_quick_gelu=use_quick_gelu,
            pretrained_image=False,
            pretrained_text=False,
            device=device,
        )
    if not use_quick_gelu and cfg.get("quick_gelu", False):
        raise ConfigError(f"CLIP {name}: the config sets quick_gelu; quick_gelu=False cannot override it")
    if state is not None:
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        _load_checked(model, state, path=path, name=name)
    model.eval().requires_grad_(False)
    model.to(device)
    with quiet_root_logger():
        tokenizer = open_clip.get_tokenizer(cfg_name)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        checkpoint=path,
        checkpoint_sha256=sha256_file(path) if path is not None else None,
        quick_gelu=use_quick_gelu,
        preprocess_cfg=preprocess_cfg,
        model_cfg=cfg,
    )


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], *, path: Path, name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not any(k.startswith("visual.") for k in state):
        raise CheckpointError(f"CLIP checkpoint {path}: holds no CLIP image tower (no 'visual.*' keys)")
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{k}: expected shape {tuple(expected[k].shape)}, found {tuple(state[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"CLIP checkpoint {path}: does not fit CLIP config {name!r}; " + "; ".join(detail)
        )
    model.load_state_dict(state, strict=True)


def write_tiny_clip(
    folder: str | os.PathLike[str], *, seed: int = 0, openai_format: bool = False
) -> tuple[Path, Path]:
    """Write `tiny_clip.json` and random weights in open_clip's checkpoint format; returns (config, checkpoint).

    `openai_format=True` adds the `input_resolution`/`context_length`/`vocab_size` entries OpenAI's files carry.
    """
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    with torch.random.fork_rng(devices=[]), quiet_root_logger(logging.WARNING):
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny_clip", pretrained=None, force_quick_gelu=openai_format)
    state = model.state_dict()
    if openai_format:
        state.update({k: torch.tensor(v) for k, v in zip(_OPENAI_EXTRA_KEYS, (64, 24, 49408))})
    checkpoint = folder / ("tiny_clip_openai.pt" if openai_format else "tiny_clip.pt")
    torch.save(state, checkpoint)
    return config, checkpoint
