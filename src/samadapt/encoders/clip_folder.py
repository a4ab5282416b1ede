"""An open_clip model folder (the Hugging Face `hf-hub:` / `local-dir:` layout) resolved to local files only.

Such a folder, e.g. a download of ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, holds
``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and the weights
(``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``). A Hugging Face text tower
(``text_cfg.hf_model_name``, BiomedCLIP's PubMedBERT) also needs that model's ``config.json`` and its tokenizer
(``tokenizer.json`` or ``vocab.txt``, with ``tokenizer_config.json``). open_clip would fetch both from the hub by name;
here each is looked for, in order, in the folder itself, in ``hf_model_name`` / ``hf_tokenizer_name`` when that is a
local folder, and in the local Hugging Face cache (offline: only files already there), and a missing one is one
ConfigError naming the file. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samadapt.errors import CheckpointError, ConfigError

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
# open_clip's own preference order (factory._find_checkpoint_in_dir) for the weights file
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a fast tokenizer's file, or a BERT WordPiece vocabulary
# Prompt templates of known folders' authors (matched on the text tower's name); {class} is the class name.
# BiomedCLIP's model card and example notebook prompt with "this is a photo of " + label.
TEMPLATES = {"biomednlp": "this is a photo of {class}", "biomedbert": "this is a photo of {class}"}


@dataclass(frozen=True)
class ClipFolder:
    """What `resolve_clip_folder` found: the model config (text tower pointed at local files) and file paths."""

    folder: Path
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    weights: Path | None
    tokenizer_dir: Path | None  # None: open_clip's own CLIP tokenizer (no HF text tower)
    template: str | None


def folder_of(name: str) -> Path | None:
    """The folder `name` designates (``local-dir:PATH`` or an existing directory), else None."""
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"CLIP folder {folder}: not found (from {name!r})")
        return folder
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _cached_dir(repo_id: str, filename: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder holding `filename` of `repo_id`, without any network call."""
    if not repo_id or "/" not in repo_id or Path(repo_id).is_absolute():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an invalid repo id or an unreadable cache: simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _find(folder: Path, hf_name: str, filenames: tuple[str, ...]) -> Path | None:
    """First folder holding one of `filenames`: the model folder, `hf_name` as a local folder, the HF cache."""
    candidates = [folder]
    if hf_name and Path(hf_name).expanduser().is_dir():
        candidates.append(Path(hf_name).expanduser())
    for candidate in candidates:
        if any((candidate / f).is_file() for f in filenames):
            return candidate
    for filename in filenames:
        cached = _cached_dir(hf_name, filename)
        if cached is not None:
            return cached
    return None


def resolve_clip_folder(folder: Path, *, checkpoint: Path | None = None) -> ClipFolder:
    """Read the folder's open_clip config and locate every file the model needs; ConfigError naming a missing one."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"CLIP folder {folder}: missing {CONFIG_FILE} (expected open_clip's Hugging Face layout: "
            f"{CONFIG_FILE} and {WEIGHT_FILES[2]})"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CLIP config {config_path}: not valid JSON ({exc})") from None
    model_cfg = raw.get("model_cfg") if isinstance(raw, dict) else None
    if not isinstance(model_cfg, dict) or any(
        k not in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise ConfigError(
            f"CLIP config {config_path}: expected {{'model_cfg': {{'embed_dim', 'vision_cfg', 'text_cfg'}}}}"
        )
    model_cfg = json.loads(json.dumps(model_cfg))  # a private copy we may edit
    weights = checkpoint or next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"CLIP folder {folder}: missing {WEIGHT_FILES[2]} (or {WEIGHT_FILES[0]})")

    text_cfg = model_cfg["text_cfg"]
    tokenizer_dir, template = None, None
    hf_model = str(text_cfg.get("hf_model_name") or "")
    if hf_model:
        text_dir = _find(folder, hf_model, ("config.json",))
        if text_dir is None:
            raise ConfigError(
                f"CLIP folder {folder}: missing config.json, the Hugging Face config of its text tower "
                f"{hf_model!r} (put that model's config.json into the folder; nothing is downloaded)"
            )
        text_cfg["hf_model_name"] = str(text_dir)
        text_cfg["hf_model_pretrained"] = False  # the folder's weights hold the text tower too
        template = next((t for k, t in TEMPLATES.items() if k in hf_model.lower()), None)
    # an HF tokenizer goes with an HF text tower, and with some open_clip towers too (SigLIP-style configs)
    hf_tokenizer = str(text_cfg.get("hf_tokenizer_name") or hf_model)
    if hf_tokenizer:
        tokenizer_dir = _find(folder, hf_tokenizer, TOKENIZER_FILES)
        if tokenizer_dir is None:
            raise ConfigError(
                f"CLIP folder {folder}: missing {TOKENIZER_FILES[1]} (or {TOKENIZER_FILES[0]}), the tokenizer of "
                f"{hf_tokenizer!r} (put the tokenizer files into the folder; nothing is downloaded)"
            )
        text_cfg["hf_tokenizer_name"] = str(tokenizer_dir)
    return ClipFolder(
        folder=folder,
        model_cfg=model_cfg,
        preprocess_cfg=dict(raw.get("preprocess_cfg") or {}),
        weights=weights,
        tokenizer_dir=tokenizer_dir,
        template=template,
    )


def make_hf_tokenizer(resolved: ClipFolder) -> Any:
    """open_clip's HFTokenizer from the local tokenizer folder, with the config's context length and options."""
    from open_clip.tokenizer import HFTokenizer

    text_cfg = resolved.model_cfg["text_cfg"]
    try:
        return HFTokenizer(
            str(resolved.tokenizer_dir),
            context_length=int(text_cfg.get("context_length", 77)),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=True,
            **dict(text_cfg.get("tokenizer_kwargs") or {}),
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(f"CLIP tokenizer {resolved.tokenizer_dir}: not loadable ({first})") from None
