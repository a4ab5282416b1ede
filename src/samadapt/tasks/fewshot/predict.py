"""Prediction with a trained few-shot run on new images: same CLIP, same masks, same head; overlays saved too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.encoders.clip import load_clip
from samadapt.encoders.masks import load_masker
from samadapt.errors import ConfigError
from samadapt.tasks.fewshot.heads import load_learned_state
from samadapt.tasks.fewshot.inputs import LazyImages, prepare_inputs
from samadapt.tasks.fewshot.methods import build_model, evaluate_probs, get_method
from samadapt.tasks.fewshot.overlay import render_overlay
from samadapt.training.weights import load_weights
from samadapt.utils.atomic import atomic_write_with


def predict_images(
    *,
    cfg: Any,
    recorded: dict[str, Any],
    run: Path,
    images: list[str],
    out: Path,
    clip_checkpoint: str | None = None,
    masker_checkpoint: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Write OUT/predictions.csv (id, predicted, prob_<class>...) and, for mask methods, OUT/overlays/*.png."""
    from samadapt.data.folders import collect_images
    from samadapt.data.images import read_image
    from samadapt.reports import write_predictions_csv

    run, out = Path(run), Path(out)
    path = run / "config.yaml"
    class_names = [str(c) for c in recorded.get("class_names") or []]
    if not class_names:
        raise ConfigError(f"{path}: recorded.class_names is missing or empty; retrain the run")
    ident = recorded.get("clip_identity")
    if not isinstance(ident, dict) or not isinstance(ident.get("quick_gelu"), bool):
        raise ConfigError(f"{path}: recorded.clip_identity.quick_gelu is missing; retrain the run")
    method, options = cfg.method, cfg.options
    spec = get_method(method)
    clip = load_clip(cfg.clip, clip_checkpoint, quick_gelu=ident["quick_gelu"], device=device)
    masker = None
    if spec.input != "plain":
        mident = recorded.get("masker_identity")
        if not isinstance(mident, dict) or not isinstance(mident.get("image_size"), int):
            raise ConfigError(f"{path}: recorded.masker_identity.image_size is missing; retrain the run")
        masker = load_masker(
            cfg.masker, masker_checkpoint, settings=cfg.masker_settings, arch=cfg.masker_arch,
            image_size=mident["image_size"], cache_dir=cfg.mask_cache or out / "mask_cache", device=device,
            implementation=cfg.masker_implementation,
        )  # fmt: skip
    state = load_weights(run / "model.safetensors")
    model = build_model(method, clip, class_names, options, state=state)
    load_learned_state(model, state, source=str(run / "model.safetensors"))

    files = collect_images(images)
    loader = LazyImages(_FileImages(files, read_image), range(len(files)))
    inputs = prepare_inputs(loader, clip=clip, kind=spec.input, masker=masker, style=options.overlay,
                            max_area_fraction=options.max_area_fraction, desc="predict", progress=progress,
                            choice=options.mask_choice())  # fmt: skip
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
