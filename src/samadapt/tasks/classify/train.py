"""Fitting one classification method (slca, baseline or linear-probe) on prepared data (`ClassifyTask.fit`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from samadapt.data import label_fraction_indices
from samadapt.evaluation.classification import classification_metrics
from samadapt.evaluation.linear_probe import fit_linear_probe, probe_probabilities
from samadapt.tasks.classify.backbone import build_backbone, resolve_stages, stage_infos
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.features import flip_pair, normalise, photometric
from samadapt.tasks.classify.model import SlcaClassifier
from samadapt.tasks.classify.prepare import Prepared
from samadapt.training import DistContext, EarlyStopping, collect_outputs, fit, seed_everything, wrap_model

log = logging.getLogger(__name__)
EVAL_BATCH = 64


def build_model(cfg: ClassifyConfig, *, num_classes: int, sam_channels: int) -> SlcaClassifier:
    """The backbone (random or local timm weights), with SLCA blocks at the chosen stages for `slca`."""
    backbone = build_backbone(
        cfg.backbone,
        num_classes=num_classes,
        image_size=cfg.backbone_image_size,
        weights=cfg.backbone_weights,
    )
    stages = resolve_stages(cfg.slca_stages, stage_infos(backbone)) if cfg.method == "slca" else []
    return SlcaClassifier(
        backbone=backbone,
        stages=stages,
        sam_channels=sam_channels,
        reduction=cfg.slca_reduction,
        pooling=cfg.slca_pooling,
        mode=cfg.slca_mode,
    )


def backbone_norm(model: SlcaClassifier) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own input normalisation, from timm's data config."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model.backbone)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def train_indices(cfg: ClassifyConfig, prepared: Prepared) -> np.ndarray:
    return label_fraction_indices(prepared.split["train"], prepared.labels, cfg.label_fraction, cfg.seed)


def fit_probe(cfg: ClassifyConfig, prepared: Prepared, idx_train: np.ndarray) -> tuple[dict, dict[str, Any]]:
    """The linear probe on pooled SAM features, C chosen on the validation split: (weights, info)."""
    x = prepared.sam_global()
    idx_val = prepared.split["val"]
    weights, history, best_c = fit_linear_probe(
        x_train=x[idx_train], y_train=prepared.labels[idx_train], x_val=x[idx_val], y_val=prepared.labels[idx_val],
        num_classes=len(prepared.class_names), monitor=cfg.monitor, seed=cfg.seed,
    )  # fmt: skip
    return weights, {"probe_C": best_c, "probe_C_grid": history}


def probe_probs(prepared: Prepared, weights: dict, idx: np.ndarray) -> np.ndarray:
    return probe_probabilities(weights, prepared.sam_global()[idx])


class NetworkFit:
    """A trained slca / baseline network and how to score images with it."""

    def __init__(self, model: SlcaClassifier, inputs: Callable[..., Any], result: Any) -> None:
        self.model, self.inputs, self.result = model, inputs, result

    def probs(self, idx: np.ndarray) -> np.ndarray:
        def forward(m: torch.nn.Module, batch_idx: torch.Tensor) -> torch.Tensor:
            x, s = self.inputs(batch_idx, train=False)
            return torch.softmax(m(x, s), dim=1)

        chunks = torch.from_numpy(idx).split(EVAL_BATCH)
        return collect_outputs(self.model, chunks, forward).double().numpy()


def train_network(
    cfg: ClassifyConfig, prepared: Prepared, idx_train: np.ndarray, *, ctx: DistContext, progress: bool,
    resume_dir: Path | None, resume: bool,
) -> NetworkFit:  # fmt: skip
    """slca or baseline through the shared loop (AdamW, cosine, early stopping on --monitor; DDP under torchrun)."""
    generator = seed_everything(cfg.seed + ctx.rank)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    uses_sam = cfg.method == "slca"
    sam = prepared.sam_windows(cfg.slca_window, cfg.slca_pooling) if uses_sam else None
    images = prepared.images(cfg.backbone_image_size)
    labels = torch.from_numpy(prepared.labels)
    model = build_model(
        cfg, num_classes=len(prepared.class_names), sam_channels=prepared.sam_channels if uses_sam else 0
    )
    mean, std = backbone_norm(model)
    ddp_model = wrap_model(model, ctx)
    device = ctx.device

    def inputs(batch_idx: torch.Tensor, *, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = normalise(images[batch_idx], mean=mean, std=std)
        s = sam[batch_idx] if sam is not None else None
        if train and cfg.augment == "flip":
            x, s = flip_pair(x, s, generator=generator)
        if train and cfg.augment in ("flip", "photometric"):
            x = photometric(x, generator=generator)
        return x.to(device), (s.to(device) if s is not None else None)

    def loss_fn(m: torch.nn.Module, batch_idx: torch.Tensor) -> torch.Tensor:
        x, s = inputs(batch_idx, train=True)
        return F.cross_entropy(m(x, s), labels[batch_idx].to(device))

    idx_val = prepared.split["val"]

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(
            y_true=prepared.labels[idx_val], probs=NetworkFit(m, inputs, None).probs(idx_val)
        )

    train_set = torch.from_numpy(idx_train)
    # BatchNorm cannot train on a batch of 1: drop a last batch of one sample. Under DDP each rank sees
    # ceil(n / world) samples (DistributedSampler pads), so the check is on the per-rank count.
    per_rank = -(-len(idx_train) // ctx.world_size)
    drop_last = per_rank % cfg.batch_size == 1 and per_rank > 1
    if ctx.enabled:
        sampler = DistributedSampler(
            train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
        )
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last)
    else:
        loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=drop_last
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    stopper = EarlyStopping(
        monitor=cfg.monitor, mode="min" if cfg.monitor == "loss" else "max", patience=cfg.patience
    )
    result = fit(
        model=ddp_model, train_loader=loader, loss_fn=loss_fn, validate=validate, optimizer=optimizer,
        epochs=cfg.epochs, stopper=stopper, scheduler=scheduler, ctx=ctx, progress=progress,
        desc=f"{cfg.method} f={cfg.label_fraction:g} s={cfg.seed}",
        resume_dir=resume_dir, resume=resume, fingerprint=cfg.fingerprint(),
    )  # fmt: skip
    return NetworkFit(model, inputs, result)
