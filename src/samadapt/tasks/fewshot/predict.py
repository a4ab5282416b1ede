"""Prediction with a trained few-shot run on new images: same CLIP, same masks, same head; overlays saved too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.encoders.checkpoint import sha256_file
from samadapt.encoders.clip import load_clip
from samadapt.encoders.masks import MaskerSettings, load_masker
from samadapt.errors import CheckpointError, ConfigError, DataError
from samadapt.tasks.fewshot.heads import load_learned_state
from samadapt.tasks.fewshot.inputs import LazyImages, prepare_inputs
from samadapt.tasks.fewshot.methods import FewShotOptions, build_model, evaluate_probs, get_method
from samadapt.tasks.fewshot.overlay import OverlayStyle, render_overlay
from samadapt.training.config import read_run_config
from samadapt.training.weights import load_weights
from samadapt.utils.atomic import atomic_write_with


def load_run_config(run: Path) -> dict:
    return read_run_config(run, task="fewshot")


def options_from_dict(raw: dict) -> FewShotOptions:
    raw = dict(raw)
    raw["overlay"] = OverlayStyle(**raw.get("overlay", {}))
    return FewShotOptions(**raw)


@dataclass
class RunSettings:
    """What `predict` reads from a run's config.yaml, checked up front."""

    method: str
    class_names: list[str]
    options: FewShotOptions
    clip: str
    clip_checkpoint: str | None
    clip_sha256: str | None
    quick_gelu: bool
    masker: str | None = None
    masker_checkpoint: str | None = None
    masker_sha256: str | None = None
    masker_settings: MaskerSettings | None = None
    masker_arch: str | None = None
    masker_image_size: int | None = None
    mask_cache: str | None = None


def run_settings(run: Path) -> RunSettings:
    """The run's config.yaml as `RunSettings`; a missing or malformed key is one ConfigError naming the file."""
    path = Path(run) / "config.yaml"
    cfg = load_run_config(run)

    def need(mapping: Any, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise ConfigError(f"{path}: key {where}{key!r} is missing; retrain the run (samadapt train)")
        value = mapping[key]
        if not isinstance(value, kind):
            raise ConfigError(
                f"{path}: key {where}{key!r} is {type(value).__name__}, expected {_names(kind)}; retrain the run"
            )
        return value

    method = need(cfg, "method", str)
    try:
        spec = get_method(method)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    class_names = need(cfg, "class_names", list)
    if not class_names:
        raise ConfigError(f"{path}: key 'class_names' is empty; retrain the run")
    ident = need(cfg, "clip_identity", dict)
    try:
        options = options_from_dict(need(cfg, "options", dict))
    except TypeError as exc:  # an unknown or missing option key
        raise ConfigError(f"{path}: key 'options' does not fit this samadapt version ({exc})") from None
    settings = RunSettings(
        method=method, class_names=[str(c) for c in class_names], options=options, clip=need(cfg, "clip", str),
        clip_checkpoint=cfg.get("clip_checkpoint"), clip_sha256=ident.get("clip_checkpoint_sha256"),
        quick_gelu=need(ident, "quick_gelu", bool, "clip_identity."),
    )  # fmt: skip
    if spec.input != "plain":
        mident = need(cfg, "masker_identity", dict)
        try:
            settings.masker_settings = MaskerSettings(**need(cfg, "masker_settings", dict))
        except TypeError as exc:
            raise ConfigError(
                f"{path}: key 'masker_settings' does not fit this samadapt version ({exc})"
            ) from None
        settings.masker = need(cfg, "masker", str)
        settings.masker_checkpoint = cfg.get("masker_checkpoint")
        settings.masker_sha256 = mident.get("checkpoint_sha256")
        settings.masker_arch = cfg.get("masker_arch")
        settings.masker_image_size = need(mident, "image_size", int, "masker_identity.")
        settings.mask_cache = cfg.get("mask_cache")
    return settings


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"str": "text", "list": "a list", "dict": "a mapping"}.get(k.__name__, k.__name__) for k in kinds
    )


def _checked_checkpoint(given: str | None, saved: str | None, saved_sha: str | None, what: str) -> str | None:
    path = given or saved
    if path is None:
        return None
    if not Path(path).is_file():
        raise CheckpointError(f"{what} checkpoint {path}: file not found (pass --{what}-checkpoint FILE)")
    if saved_sha and sha256_file(path) != saved_sha:
        raise CheckpointError(
            f"{what} checkpoint {path}: sha256 {sha256_file(path)[:12]} differs from the run's {saved_sha[:12]}"
        )
    return path


def predict_images(
    *,
    run: Path,
    images: list[str],
    out: Path,
    clip_checkpoint: str | None = None,
    masker_checkpoint: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Write OUT/predictions.csv (id, predicted, prob_<class>...) and, for mask methods, OUT/overlays/*.png."""
    from samadapt.data.folders import list_images
    from samadapt.data.images import read_image
    from samadapt.reports import write_predictions_csv

    run, out = Path(run), Path(out)
    cfg = run_settings(run)
    method, class_names, options = cfg.method, cfg.class_names, cfg.options
    spec = get_method(method)
    clip_path = _checked_checkpoint(clip_checkpoint, cfg.clip_checkpoint, cfg.clip_sha256, "clip")
    clip = load_clip(cfg.clip, clip_path, quick_gelu=cfg.quick_gelu, device=device)
    masker = None
    if spec.input != "plain":
        mpath = _checked_checkpoint(masker_checkpoint, cfg.masker_checkpoint, cfg.masker_sha256, "masker")
        masker = load_masker(
            cfg.masker, mpath, settings=cfg.masker_settings, arch=cfg.masker_arch,
            image_size=cfg.masker_image_size, cache_dir=cfg.mask_cache or out / "mask_cache", device=device,
        )  # fmt: skip
    state = load_weights(run / "model.safetensors")
    model = build_model(method, clip, class_names, options, state=state)
    load_learned_state(model, state, source=str(run / "model.safetensors"))

    files: list[Path] = []
    for item in images:
        p = Path(item).expanduser()
        if p.is_dir():
            files.extend(list_images(p))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder")
    if not files:
        raise DataError(f"no images found in {', '.join(images)}")
    loader = LazyImages(_FileImages(files, read_image), range(len(files)))
    inputs = prepare_inputs(loader, clip=clip, kind=spec.input, masker=masker, style=options.overlay,
                            max_area_fraction=options.max_area_fraction, desc="predict",
                            progress=progress)  # fmt: skip
    probs = evaluate_probs(model, inputs)
    out.mkdir(parents=True, exist_ok=True)
    if spec.input == "overlay":
        from PIL import Image

        for k, f in enumerate(files):
            image = read_image(f)
            overlay = render_overlay(image, masker(image).masks, style=options.overlay)
            atomic_write_with(
                out / "overlays" / f"{k:05d}_{f.stem}.png",
                lambda tmp, o=overlay: Image.fromarray(o).save(tmp, format="PNG"),
            )
    return write_predictions_csv(
        out / "predictions.csv",
        ids=[os.fspath(f) for f in files],
        probs=np.asarray(probs),
        class_names=class_names,
    )


class _FileImages:
    def __init__(self, files: list[Path], read) -> None:
        self.files, self.read = files, read

    def image(self, i: int) -> np.ndarray:
        return self.read(self.files[i])
