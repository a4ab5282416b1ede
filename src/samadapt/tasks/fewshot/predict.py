"""Prediction with a trained few-shot run on new images: same CLIP, same masks, same head; overlays saved too."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from samadapt.encoders.checkpoint import sha256_file
from samadapt.encoders.clip import load_clip
from samadapt.encoders.masks import MaskerSettings, load_masker
from samadapt.errors import CheckpointError, ConfigError, DataError
from samadapt.tasks.fewshot.heads import load_learned_state
from samadapt.tasks.fewshot.inputs import LazyImages, prepare_inputs
from samadapt.tasks.fewshot.methods import FewShotOptions, build_model, evaluate_probs, get_method
from samadapt.tasks.fewshot.overlay import OverlayStyle, render_overlay
from samadapt.training.weights import load_weights
from samadapt.utils.atomic import atomic_write_with


def load_run_config(run: Path) -> dict:
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run}: not a trained run (no config.yaml)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or config.get("task") != "fewshot":
        raise ConfigError(
            f"{path}: not a few-shot run (task {config.get('task') if isinstance(config, dict) else None!r})"
        )
    return config


def options_from_dict(raw: dict) -> FewShotOptions:
    raw = dict(raw)
    raw["overlay"] = OverlayStyle(**raw.get("overlay", {}))
    return FewShotOptions(**raw)


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
) -> Path:
    """Write OUT/predictions.csv (id, predicted, prob_<class>...) and, for mask methods, OUT/overlays/*.png."""
    from samadapt.data.folders import list_images
    from samadapt.data.images import read_image
    from samadapt.reports import write_predictions_csv

    run, out = Path(run), Path(out)
    cfg = load_run_config(run)
    method, class_names = cfg["method"], list(cfg["class_names"])
    spec = get_method(method)
    options = options_from_dict(cfg["options"])
    ident = cfg["clip_identity"]
    clip_path = _checked_checkpoint(
        clip_checkpoint, cfg.get("clip_checkpoint"), ident.get("clip_checkpoint_sha256"), "clip"
    )
    clip = load_clip(cfg["clip"], clip_path, quick_gelu=ident["quick_gelu"], device=device)
    masker = None
    if spec.input != "plain":
        mident = cfg["masker_identity"]
        mpath = _checked_checkpoint(
            masker_checkpoint, cfg.get("masker_checkpoint"), mident.get("checkpoint_sha256"), "masker"
        )
        masker = load_masker(
            cfg["masker"], mpath, settings=MaskerSettings(**cfg["masker_settings"]), arch=cfg.get("masker_arch"),
            image_size=mident["image_size"], cache_dir=cfg.get("mask_cache") or out / "mask_cache", device=device,
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
                            max_area_fraction=options.max_area_fraction, desc="predict")  # fmt: skip
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
