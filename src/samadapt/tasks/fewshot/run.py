"""One few-shot run: data fraction -> method fit -> val/test evaluation -> RUN folder (same outputs as classify).

`Resources` (dataset, CLIP, SAM 2 masker, prepared inputs) are loaded once and shared by every run of a sweep;
all methods see the same splits (split seed) and, for one seed, nested label fractions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.data.splits import label_fraction_indices
from samadapt.encoders.clip import ClipModel, load_clip
from samadapt.encoders.masks import MaskerSettings, SamMasker, load_masker
from samadapt.errors import ConfigError, DataError
from samadapt.evaluation.classification import classification_metrics
from samadapt.tasks.fewshot.heads import learned_state
from samadapt.tasks.fewshot.inputs import Inputs, prepare_one
from samadapt.tasks.fewshot.methods import (
    FewShotOptions,
    class_prompts,
    evaluate_probs,
    fit_method,
    get_method,
    validation_indices,
)
from samadapt.tasks.fewshot.outputs import plot_overlay_gallery, write_run_outputs
from samadapt.tasks.fewshot.overlay import render_overlay
from samadapt.training.config import save_run_config
from samadapt.training.resume import clear_resume, resume_dir, start_run
from samadapt.training.seed import seed_everything
from samadapt.training.weights import save_weights

log = logging.getLogger(__name__)


@dataclass
class FewShotConfig:
    """Everything that defines a run besides the method options; keys equal the CLI flag names."""

    data: str | None = None
    method: str = "medfocus"
    clip: str = "ViT-B-16"
    clip_checkpoint: str | None = None
    quick_gelu: bool | None = None
    masker: str = "sam2_hiera_t"
    masker_checkpoint: str | None = None
    masker_arch: str | None = None
    masker_image_size: int | None = None
    masker_settings: MaskerSettings = field(default_factory=MaskerSettings)
    mask_cache: str | None = None
    data_fraction: float = 1.0
    seed: int = 0
    split_seed: int = 0
    class_names: list[str] | None = None
    out: str | None = None
    device: str = "cpu"
    options: FewShotOptions = field(default_factory=FewShotOptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Resources:
    """Dataset, CLIP and masker of a run or a sweep, with each image's prepared input computed once."""

    def __init__(self, *, dataset, clip: ClipModel, masker: SamMasker | None, class_names: list[str]) -> None:
        self.dataset = dataset
        self.clip = clip
        self.masker = masker
        self.class_names = class_names
        self._cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        self._transform = clip.transform()
        self._views: dict[tuple[int, int, int], torch.Tensor] = {}

    def inputs(self, kind: str, indices: np.ndarray, options: FewShotOptions) -> Inputs:
        items = []
        choice = options.mask_choice()
        for i in indices:
            key = (kind, int(i), choice if kind == "attn" else None)
            if key not in self._cache:
                self._cache[key] = prepare_one(
                    self.dataset.image(int(i)), clip=self.clip, kind=kind, masker=self.masker,
                    style=options.overlay, max_area_fraction=options.max_area_fraction, transform=self._transform,
                    choice=choice,
                )  # fmt: skip
            items.append(self._cache[key])
        size = self.clip.image_size
        return Inputs(
            images=torch.stack([x for x, _, _ in items]) if items else torch.zeros(0, 3, size, size),
            grids=torch.stack([g for _, g, _ in items]) if (kind == "attn" and items) else None,
            mask_counts=np.asarray([n for _, _, n in items], np.int64),
        )

    def augmented_features(self, indices: np.ndarray, *, views: int, seed: int) -> torch.Tensor:
        """[views, N, D] raw frozen-CLIP features of augmented views of the images `indices` (`augment.py`:
        RandomResizedCrop(scale 0.5-1) + flip + CLIP's normalisation, deterministic per (seed, index, view)),
        each computed once and reused by every run and epoch of a sweep."""
        from samadapt.tasks.fewshot.augment import augmented_view, encode_images, view_transform

        missing = [(int(i), v) for i in indices for v in range(views) if (seed, int(i), v) not in self._views]
        if missing:
            transform = view_transform(self.clip)
            for start in range(0, len(missing), 64):
                chunk = missing[start : start + 64]
                images = {i: self.dataset.image(i) for i in {i for i, _ in chunk}}
                batch = torch.stack(
                    [
                        augmented_view(images[i], transform=transform, seed=seed, index=i, view=v)
                        for i, v in chunk
                    ]
                )
                for (i, v), feature in zip(chunk, encode_images(self.clip.model.visual, batch), strict=True):
                    self._views[(seed, i, v)] = feature.cpu()
        if views == 0 or len(indices) == 0:
            return torch.zeros(views, len(indices), 0)
        return torch.stack(
            [torch.stack([self._views[(seed, int(i), v)] for i in indices]) for v in range(views)]
        )


def needs_masker(methods: list[str]) -> bool:
    return any(get_method(m).input != "plain" for m in methods)


def load_resources(cfg: FewShotConfig, *, methods: list[str], out: Path) -> Resources:
    from samadapt.data.readers import read_dataset

    if not cfg.data:
        raise ConfigError("--data is required (a dataset folder, .npz, CSV manifest or ISIC folder)")
    dataset = read_dataset(cfg.data, split_seed=cfg.split_seed)
    if dataset.labels is None:
        raise DataError(f"{cfg.data}: few-shot training needs labels; found none")
    if dataset.multilabel:
        raise DataError(
            f"{cfg.data}: few-shot CLIP classification needs single-label data; found multi-label"
        )
    class_names = list(cfg.class_names) if cfg.class_names else list(dataset.class_names)
    if len(class_names) != dataset.num_classes:
        raise ConfigError(
            f"--class-names gives {len(class_names)} names; {cfg.data} has {dataset.num_classes} classes"
        )
    if not cfg.class_names and all(name.strip().isdigit() for name in class_names):
        log.warning(
            "class names of %s are numbers (%s): prompts read like %r; pass --class-names for real prompts",
            cfg.data, ", ".join(class_names), class_prompts(cfg.options.prompt_template, class_names[:1])[0],
        )  # fmt: skip
    if cfg.clip_checkpoint is None:
        log.warning("no --clip-checkpoint: CLIP has RANDOM weights (tests only; results are meaningless)")
    clip = load_clip(cfg.clip, cfg.clip_checkpoint, quick_gelu=cfg.quick_gelu, device=cfg.device)
    masker = None
    if needs_masker(methods):
        if cfg.masker_checkpoint is None and cfg.masker_arch != "tiny":
            raise ConfigError("--masker-checkpoint FILE is required for medfocus and medfocus-attn")
        masker = load_masker(
            cfg.masker, cfg.masker_checkpoint, settings=cfg.masker_settings, arch=cfg.masker_arch,
            image_size=cfg.masker_image_size, cache_dir=cfg.mask_cache or (out / "mask_cache"), device=cfg.device,
        )  # fmt: skip
    return Resources(dataset=dataset, clip=clip, masker=masker, class_names=class_names)


def run_fewshot(
    cfg: FewShotConfig, res: Resources, out: str | Path, *, resume: bool = False
) -> dict[str, Any]:
    """Fit cfg.method on cfg.data_fraction of the training split, evaluate on val and test, write `out`.

    Methods trained by epochs save their state in OUT/.resume after every epoch; `resume` continues from it.
    The outputs are written after training, metrics.json last; the resume state is dropped after that."""
    out = Path(out)
    spec = get_method(cfg.method)
    if not 0 < cfg.data_fraction <= 1:
        raise ConfigError(f"--data-fraction must be in (0, 1], got {cfg.data_fraction}")
    start = time.perf_counter()
    seed_everything(cfg.seed)
    ds = res.dataset
    labels = ds.labels
    idx_train = label_fraction_indices(ds.split_indices("train"), labels, cfg.data_fraction, cfg.seed)
    idx_val, idx_test = ds.split_indices("val"), ds.split_indices("test")
    if len(idx_test) == 0:
        raise DataError(f"{cfg.data}: the test split is empty")
    opts = cfg.options
    idx_val = validation_indices(idx_val, labels, labels[idx_train], opts, seed=cfg.seed)
    train_in = res.inputs(spec.input, idx_train, opts)
    val_in = res.inputs(spec.input, idx_val, opts)
    test_in = res.inputs(spec.input, idx_test, opts)
    views = (
        res.augmented_features(idx_train, views=opts.aug_views, seed=cfg.seed)
        if spec.uses_views and opts.aug_views > 0
        else None
    )
    start_run(out, resume=resume)  # every image decoded: only now may an earlier run's outputs go
    model, info, history = fit_method(
        cfg.method, res.clip, res.class_names, train=train_in, train_y=labels[idx_train], val=val_in,
        val_y=labels[idx_val], options=opts, seed=cfg.seed, train_views=views, resume_dir=resume_dir(out),
        resume=resume, fingerprint=fingerprint(cfg, res),
    )  # fmt: skip
    probs_val = evaluate_probs(model, val_in) if len(idx_val) else np.zeros((0, len(res.class_names)))
    probs_test = evaluate_probs(model, test_in)
    counts = np.concatenate([train_in.mask_counts, val_in.mask_counts, test_in.mask_counts])
    metrics: dict[str, Any] = {
        "val": classification_metrics(y_true=labels[idx_val], probs=probs_val) if len(idx_val) else {},
        "test": classification_metrics(y_true=labels[idx_test], probs=probs_test),
        "n_train": int(len(idx_train)),
        "n_val": int(len(idx_val)),
        "n_test": int(len(idx_test)),
        "method": cfg.method,
        "clip": res.clip.name,
        "clip_weights": cfg.clip_checkpoint or "random",
        "quick_gelu": res.clip.quick_gelu,
        "masker": cfg.masker if res.masker is not None and spec.input != "plain" else None,
        "data_fraction": cfg.data_fraction,
        "label_fraction": cfg.data_fraction,
        "seed": cfg.seed,
        "best_epoch": info.pop("best_epoch", None),
        "mean_masks_per_image": float(counts.mean()) if spec.input != "plain" and len(counts) else None,
        "images_without_masks": int((counts == 0).sum()) if spec.input != "plain" else None,
        "seconds": 0.0,
        **info,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(
        out / "config.yaml",
        {"task": "fewshot", **cfg.to_dict(), "class_names": res.class_names, "clip_identity": res.clip.identity(),
         "masker_identity": res.masker.cache_key_fields() if res.masker is not None else None},
    )  # fmt: skip
    save_weights(out / "model.safetensors", learned_state(model), metadata={"method": cfg.method})
    notes = [
        f"method {cfg.method}: {spec.description}; CLIP {res.clip.name} "
        f"({'weights ' + str(cfg.clip_checkpoint) if cfg.clip_checkpoint else 'RANDOM weights'}, "
        f"QuickGELU {'on' if res.clip.quick_gelu else 'off'})",
        f"{len(idx_train)} training images ({cfg.data_fraction:g} of {len(ds.split_indices('train'))}), "
        f"seed {cfg.seed}; prompt template {opts.prompt_template!r}",
    ]
    if spec.input != "plain":
        notes.append(
            f"SAM 2 masker {cfg.masker}: {metrics['mean_masks_per_image']:.1f} masks per image on average, "
            f"{metrics['images_without_masks']} images without any mask (those are used unchanged)."
        )
    figures = _gallery(
        out, cfg.method, spec.input, res, idx_test[:8], probs_test[:8], labels[idx_test[:8]], test_in, opts
    )
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_run_outputs(
        out,
        metrics=metrics,
        class_names=res.class_names,
        ids=[ds.ids[i] for i in np.concatenate([idx_val, idx_test])],
        splits=["val"] * len(idx_val) + ["test"] * len(idx_test),
        y_true=labels[np.concatenate([idx_val, idx_test])],
        probs=np.concatenate([probs_val, probs_test]),
        history=history,
        best_epoch=metrics["best_epoch"],
        notes=notes,
        extra_figures=figures,
    )
    clear_resume(out)  # metrics.json is written: the run is complete
    return metrics


def fingerprint(cfg: FewShotConfig, res: Resources) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (not where it runs or how it reports);
    the models by content, so a moved checkpoint still resumes and a replaced one is refused."""
    settings = cfg.to_dict()
    for key in ("out", "device", "mask_cache"):
        settings.pop(key)
    settings["options"] = {k: v for k, v in settings["options"].items() if k != "progress"}
    settings.pop("clip_checkpoint")
    settings.pop("masker_checkpoint")
    settings["clip_identity"] = {k: v for k, v in res.clip.identity().items() if k != "clip_checkpoint"}
    settings["masker_identity"] = (
        res.masker.cache_key_fields()
        if res.masker is not None and get_method(cfg.method).input != "plain"
        else None
    )
    settings["class_names"] = list(res.class_names)
    return settings


def _gallery(out, method, kind, res, indices, probs, y_true, test_in, opts) -> list[tuple[str, Path]]:
    if kind == "plain" or res.masker is None or len(indices) == 0:
        return []
    panels, focus = [], []
    for k, i in enumerate(indices):
        image = res.dataset.image(int(i))
        pred = int(probs[k].argmax())
        caption = (
            f"true {res.class_names[int(y_true[k])]} / pred {res.class_names[pred]} ({probs[k, pred]:.2f})"
        )
        if kind == "overlay":
            image = render_overlay(image, res.masker(image).masks, style=opts.overlay)
            focus.append(None)
        else:
            focus.append(test_in.grids[k])
        panels.append((image, caption))
    title = "SAM 2 mask overlays (CLIP's input)" if kind == "overlay" else "Mask focus on CLIP's patch grid"
    path = plot_overlay_gallery(out / "overlays.png", panels=panels, focus=focus, title=f"{method}: {title}")
    return [(title, path)]


def with_method(cfg: FewShotConfig, *, method: str, fraction: float, seed: int, out: Path) -> FewShotConfig:
    return replace(cfg, method=method, data_fraction=fraction, seed=seed, out=str(out))
