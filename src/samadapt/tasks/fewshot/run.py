"""What every few-shot run of a sweep shares: `Resources` (dataset, CLIP, SAM 2 masker, each image's prepared
input), loaded once; all methods see the same splits (split seed) and, for one seed, nested label fractions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.encoders.clip import ClipModel, load_clip
from samadapt.encoders.masks import SamMasker, load_masker
from samadapt.errors import ConfigError, DataError
from samadapt.tasks.fewshot.inputs import Inputs, prepare_one
from samadapt.tasks.fewshot.methods import FewShotOptions, class_prompts, get_method
from samadapt.tasks.fewshot.outputs import plot_overlay_gallery
from samadapt.tasks.fewshot.overlay import render_overlay

log = logging.getLogger(__name__)


class Resources:
    """Dataset, CLIP and masker of a run or a sweep, with each image's prepared input computed once."""

    def __init__(
        self, *, dataset, clip: ClipModel, masker: SamMasker | None, class_names: list[str], cfg: Any = None,
        out: Path | None = None,
    ) -> None:  # fmt: skip
        self.dataset = dataset
        self.clip = clip
        self._masker = masker
        self.class_names = class_names
        self.cfg = cfg
        self.out = out
        self._cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        self._transform = clip.transform()
        self._views: dict[tuple[int, int, int], torch.Tensor] = {}

    @property
    def masker(self) -> SamMasker | None:
        """The SAM 2 masker, loaded when a method first needs masks (a sweep of plain methods never loads it)."""
        if self._masker is None and self.cfg is not None:
            self._masker = load_masker_for(self.cfg, out=self.out or Path("."))
        return self._masker

    def inputs(self, kind: str, indices: np.ndarray, options: FewShotOptions) -> Inputs:
        items = []
        choice = options.mask_choice()
        for i in indices:
            key = (kind, int(i), choice if kind == "attn" else None)
            if key not in self._cache:
                self._cache[key] = prepare_one(
                    self.dataset.image(int(i)), clip=self.clip, kind=kind,
                    masker=self.masker if kind != "plain" else None,  # plain methods never load SAM 2
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


def load_resources(cfg: Any, *, out: Path) -> Resources:
    """Dataset, class names and CLIP of a run or sweep; the masker follows when a method needs it."""
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
            cfg.data, ", ".join(class_names), class_prompts(cfg.prompt_template, class_names[:1])[0],
        )  # fmt: skip
    clip = load_clip(cfg.clip, cfg.clip_checkpoint, quick_gelu=cfg.quick_gelu, device=cfg.device)
    if clip.checkpoint is None:  # a model folder (BiomedCLIP) carries its weights without --clip-checkpoint
        log.warning("no --clip-checkpoint: CLIP has RANDOM weights (tests only; results are meaningless)")
    return Resources(dataset=dataset, clip=clip, masker=None, class_names=class_names, cfg=cfg, out=out)


def load_masker_for(cfg: Any, *, out: Path) -> SamMasker:
    if cfg.masker_checkpoint is None and cfg.masker_arch != "tiny":
        raise ConfigError("--masker-checkpoint FILE is required for medfocus and medfocus-attn")
    return load_masker(
        cfg.masker, cfg.masker_checkpoint, settings=cfg.masker_settings, arch=cfg.masker_arch,
        image_size=cfg.masker_image_size, cache_dir=cfg.mask_cache or (out / "mask_cache"), device=cfg.device,
        implementation=cfg.masker_implementation,
    )  # fmt: skip


def gallery(out, method, kind, res, indices, probs, y_true, test_in, opts) -> list[tuple[str, Path]]:
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
