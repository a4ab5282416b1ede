"""CLIP through open_clip from local files: no downloads, safe loading, QuickGELU decided from the file's provenance.

`--clip NAME` is an open_clip model config name (``ViT-B-16``, ``ViT-B-32-quickgelu``, ...), the path of an
open_clip model config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``; tests use a tiny one), or a model folder in
open_clip's Hugging Face layout (``local-dir:/path`` or just the folder's path), e.g. BiomedCLIP: see `clip_folder.py`.
`--clip-checkpoint FILE` is an open_clip state dict (``.pt``/``.bin``/``.safetensors``, optionally wrapped in
``{"state_dict": ...}`` with ``module.`` prefixes) or one of OpenAI's original TorchScript archives.

QuickGELU: OpenAI's CLIP weights (and open_clip's early LAION-400M / YFCC / CC12M releases) were trained with
QuickGELU, later LAION/DataComp weights with nn.GELU, and a state dict does not say which: the wrong one loads
without error and silently degrades every embedding. `decide_quick_gelu`, in order:
1. an explicit ``quick_gelu=True/False`` (the CLI's flag);
2. a config that sets ``quick_gelu: true`` (the ``-quickgelu`` names);
3. the file: an OpenAI TorchScript archive (how OpenAI released CLIP), a state dict with OpenAI's
   ``input_resolution``/``context_length``/``vocab_size`` entries, or a file whose sha256 is one of the releases in
   open_clip's pretrained registry (`known_clip_releases`: OpenAI's URLs carry the full sha256 in their path,
   open_clip's GitHub releases an 8-hex prefix in the file name; each entry says whether it is QuickGELU);
4. a config that sets ``quick_gelu: false`` explicitly;
5. otherwise it cannot be told: QuickGELU if the file's or a near folder's name says ``openai`` (converted copies
   such as ``timm/vit_base_patch16_clip_224.openai``), else GELU, and a loud `QuickGeluUnknownWarning` either way.
The decision and its reason are `ClipModel.quick_gelu` / `ClipModel.quick_gelu_source`.
"""

from __future__ import annotations

import functools
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
DEFAULT_TEMPLATE = "This is a photo of {class}"


class QuickGeluUnknownWarning(UserWarning):
    """Whether the CLIP weights need QuickGELU could not be told from the file: pass quick_gelu=True/False."""


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
    quick_gelu_source: str = "argument"
    # the prompt template the weights' authors use ({class} is replaced by the class name)
    default_template: str = DEFAULT_TEMPLATE
    context_length: int = 77

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def patch_grid(self) -> int:
        """Side of the ViT patch grid (image_size / patch_size); ViT image towers only."""
        visual = self.model.visual
        grid = getattr(visual, "grid_size", None)
        if grid is None:  # a timm image tower (BiomedCLIP): the trunk's patch embedding knows it
            grid = getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None), "grid_size", None)
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


def read_clip_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, OpenAI evidence or None). Never unpickles arbitrary objects.

    OpenAI's release files are TorchScript archives; `torch.jit.load` rebuilds them from TorchScript code and a
    restricted unpickler (no arbitrary Python), and we only keep the tensors. The evidence is a phrase for
    `ClipModel.quick_gelu_source`: "an OpenAI TorchScript archive" or "OpenAI's input_resolution/... entries".
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
        return state, "an OpenAI TorchScript archive"
    state = load_state_dict_safely(p)
    openai = (
        "OpenAI's input_resolution/context_length/vocab_size entries"
        if any(k in state for k in _OPENAI_EXTRA_KEYS)
        else None
    )
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}, openai


@functools.lru_cache(maxsize=1)
def known_clip_releases() -> dict[str, tuple[str, str, bool]]:
    """sha256 -> (open_clip model, pretrained tag, trained with QuickGELU), from the installed open_clip's registry.

    OpenAI's URLs (``openaipublic.../clip/models/<sha256>/ViT-B-16.pt``) carry the file's full sha256; open_clip's
    own GitHub releases (``vit_b_32-quickgelu-laion400m_e32-46683a32.pt``) the first 8 hex digits, which is what
    open_clip itself checks. Hugging Face copies are other files (other hashes) and are not in the table.
    """
    import open_clip

    table: dict[str, tuple[str, str, bool]] = {}
    for model, tag in open_clip.list_pretrained():
        # open_clip lists every QuickGELU release a second time under its -quickgelu model name
        if model.endswith("-quickgelu"):
            continue
        cfg = open_clip.get_pretrained_cfg(model, tag)
        url = str(cfg.get("url") or "")
        if "openaipublic" in url:
            digest = url.split("/")[-2]
        elif "mlfoundations" in url:
            digest = Path(url).stem.split("-")[-1]
        else:
            continue
        table[digest.lower()] = (model, tag, bool(cfg.get("quick_gelu", False)))
    return table


def lookup_clip_release(sha256: str) -> tuple[str, str, bool] | None:
    """The open_clip release (model, tag, quick_gelu) a file's sha256 identifies, or None."""
    table = known_clip_releases()
    return table.get(sha256.lower()) or table.get(sha256.lower()[:8])


def decide_quick_gelu(
    *,
    requested: bool | None,
    cfg: dict[str, Any],
    path: Path | None,
    evidence: str | None,
    sha256: str | None,
) -> tuple[bool, str]:
    """(use QuickGELU, why): the rules in this module's docstring; warns loudly when it cannot be told."""
    if requested is not None:
        return bool(requested), "argument"
    if cfg.get("quick_gelu") is True:
        return True, "the model config sets quick_gelu"
    if path is None:
        return False, "random weights (no checkpoint)"
    if evidence is not None:
        verb = "is" if evidence.startswith("an ") else "has"
        return True, f"{path.name} {verb} {evidence}"
    release = lookup_clip_release(sha256) if sha256 else None
    if release is not None:
        model, tag, quick = release
        return quick, f"sha256 of {path.name} is open_clip's {model} {tag} release"
    if cfg.get("quick_gelu") is False:
        return False, "the model config sets quick_gelu: false"
    named_openai = any("openai" in part.lower() for part in path.parts[-4:])
    choice = "ON (the file or folder name says 'openai')" if named_openai else "OFF (nn.GELU)"
    warnings.warn(
        f"CLIP checkpoint {path}: CANNOT TELL WHETHER THESE WEIGHTS NEED QuickGELU (a state dict of unknown "
        f"provenance: not an OpenAI archive, not a known release hash); QuickGELU {choice}. OpenAI-trained weights "
        "with the wrong activation load without error and silently degrade every result: pass quick_gelu=True "
        "for OpenAI weights or False for LAION/DataComp ones (CLI: --quick-gelu on/off).",
        QuickGeluUnknownWarning,
        stacklevel=3,
    )
    return named_openai, "guessed from the file name" if named_openai else "unknown (GELU assumed)"


def load_clip(
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Build open_clip model `name` and load the local `checkpoint` into it, frozen.

    `name`: an open_clip config name, a model config JSON path, or a model folder (``local-dir:PATH`` or the
    folder's path, e.g. BiomedCLIP), whose own weights load when `checkpoint` is None. Otherwise
    `checkpoint=None` keeps random weights (tests only). Raises CheckpointError naming the file when the
    checkpoint does not fit the config (e.g. a ViT-L file for ViT-B-16), ConfigError naming a missing file.
    """
    from samadapt.encoders.clip_folder import folder_of

    folder = folder_of(name)
    if folder is not None:
        return _load_clip_folder(name, folder, checkpoint, quick_gelu=quick_gelu, device=device)

    import open_clip
    from open_clip.factory import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    cfg_name, cfg = resolve_config(name)
    state, evidence, path, digest = None, None, None, None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state, evidence = read_clip_state_dict(path)
        check_finite(state, path=path)
        digest = sha256_file(path)
    use_quick_gelu, source = decide_quick_gelu(
        requested=quick_gelu, cfg=cfg, path=path, evidence=evidence, sha256=digest
    )
    if not use_quick_gelu and cfg.get("quick_gelu", False):
        raise ConfigError(f"CLIP {name}: the config sets quick_gelu; quick_gelu=False cannot override it")
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
        checkpoint_sha256=digest,
        quick_gelu=use_quick_gelu,
        preprocess_cfg=preprocess_cfg,
        model_cfg=cfg,
        quick_gelu_source=source,
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
    )


def _uses_open_clip_activation(model_cfg: dict[str, Any]) -> bool:
    """QuickGELU only changes open_clip's own towers: not a timm image tower nor a Hugging Face text tower."""
    timm_image = bool(model_cfg["vision_cfg"].get("timm_model_name"))
    hf_text = bool(model_cfg["text_cfg"].get("hf_model_name"))
    return not (timm_image and hf_text)


def _load_clip_folder(
    name: str,
    folder: Path,
    checkpoint: str | os.PathLike[str] | None,
    *,
    quick_gelu: bool | None,
    device: str | torch.device,
) -> ClipModel:
    """A model folder in open_clip's Hugging Face layout (BiomedCLIP), from local files only."""
    import tempfile

    import open_clip

    from samadapt.encoders.clip_folder import CONFIG_FILE, make_hf_tokenizer, resolve_clip_folder

    resolved = resolve_clip_folder(folder, checkpoint=Path(checkpoint).expanduser() if checkpoint else None)
    path = resolved.weights
    state, evidence = read_clip_state_dict(path)
    check_finite(state, path=path)
    digest = sha256_file(path)
    cfg = resolved.model_cfg
    if _uses_open_clip_activation(cfg):
        use_quick_gelu, source = decide_quick_gelu(
            requested=quick_gelu, cfg=cfg, path=path, evidence=evidence, sha256=digest
        )
    else:
        use_quick_gelu = bool(quick_gelu)
        source = "not applicable (timm image tower, Hugging Face text tower)"
    # open_clip's own local-dir path builds the model, from a copy of the config whose text tower points at the
    # local files; the weights load here, the safe way
    with tempfile.TemporaryDirectory(prefix="samadapt-clip-") as tmp, quiet_root_logger(logging.WARNING):
        config = {"model_cfg": cfg, "preprocess_cfg": resolved.preprocess_cfg}
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config))
        try:
            model = open_clip.create_model(
                "local-dir:" + tmp,
                force_quick_gelu=use_quick_gelu,
                pretrained_image=False,
                pretrained_text=False,
                device=device,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"CLIP folder {folder}: {CONFIG_FILE} does not build a model ({first})"
            ) from None
    expected = model.state_dict()
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in expected]:
        del state[key]  # transformers >= 4.31 no longer keeps this buffer in the state dict
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    _load_checked(model, state, path=path, name=name)
    model.eval().requires_grad_(False)
    model.to(device)
    if resolved.tokenizer_dir is not None:
        tokenizer = make_hf_tokenizer(resolved)
    else:
        with quiet_root_logger():
            tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=int(cfg["text_cfg"].get("context_length", 77))
            )
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        checkpoint=path,
        checkpoint_sha256=digest,
        quick_gelu=use_quick_gelu,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        model_cfg=cfg,
        quick_gelu_source=source,
        default_template=resolved.template or DEFAULT_TEMPLATE,
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
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
    # a GELU file says so in its config (no provenance warning); an OpenAI-format one is told by its entries
    config.write_text(
        json.dumps(TINY_CLIP_CONFIG if openai_format else {**TINY_CLIP_CONFIG, "quick_gelu": False})
    )
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
