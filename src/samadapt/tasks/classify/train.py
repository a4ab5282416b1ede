"""One classification run (slca, baseline or linear-probe) on prepared data, writing everything into RUN."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from samadapt.data import label_fraction_indices
from samadapt.evaluation.classification import classification_metrics
from samadapt.tasks.classify.backbone import build_backbone, resolve_stages, stage_infos
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.features import flip_pair, normalise, photometric
from samadapt.tasks.classify.linear_probe import fit_linear_probe, probe_probabilities
from samadapt.tasks.classify.model import SlcaClassifier
from samadapt.tasks.classify.outputs import write_run_outputs
from samadapt.tasks.classify.prepare import Prepared
from samadapt.training import (
    DistContext,
    EarlyStopping,
    collect_outputs,
    fit,
    save_run_config,
    save_weights,
    seed_everything,
    wrap_model,
)
from samadapt.training.resume import clear_resume, resume_dir, start_run

log = logging.getLogger(__name__)
EVAL_BATCH = 64


def build_model(cfg: ClassifyConfig, *, num_classes: int, sam_channels: int) -> SlcaClassifier:
    """The backbone (random or local timm weights), with SLCA blocks at the chosen stages for `slca`."""
    backbone = build_backbone(
        cfg.backbone, num_classes=num_classes, image_size=cfg.image_size, weights=cfg.backbone_weights
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
    cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def train_indices(cfg: ClassifyConfig, prepared: Prepared) -> np.ndarray:
    return label_fraction_indices(prepared.split["train"], prepared.labels, cfg.label_fraction, cfg.seed)


def run_classification(
    cfg: ClassifyConfig,
    prepared: Prepared,
    out: Path,
    *,
    ctx: DistContext | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one method; on rank 0 write config.yaml, model.safetensors, plots, report, metrics.

    Network training saves its state in RUN/.resume after every epoch; `resume` continues from it.
    """
    ctx = ctx or DistContext()
    out = Path(out)
    if ctx.is_main:
        start_run(out, resume=resume)
    start = time.perf_counter()
    idx_train = train_indices(cfg, prepared)
    eval_idx = np.concatenate([prepared.split["val"], prepared.split["test"]])
    if cfg.method == "linear-probe":
        probs, history, best_epoch, weights, fit_info = _linear_probe(cfg, prepared, idx_train, eval_idx)
    else:
        probs, history, best_epoch, weights, fit_info = _train_network(
            cfg, prepared, idx_train, eval_idx, ctx, progress, out=out, resume=resume
        )
    if not ctx.is_main:
        return {}
    n_val = len(prepared.split["val"])
    y = prepared.labels[eval_idx]
    metrics: dict[str, Any] = {
        "val": classification_metrics(y_true=y[:n_val], probs=probs[:n_val]),
        "test": classification_metrics(y_true=y[n_val:], probs=probs[n_val:]),
        "n_train": int(len(idx_train)),
        "n_val": n_val,
        "n_test": int(len(prepared.split["test"])),
        "method": cfg.method,
        "backbone": cfg.backbone if cfg.method != "linear-probe" else None,
        "encoder": cfg.encoder,
        "encoder_weights": cfg.checkpoint or f"random ({cfg.encoder_arch or 'default'} arch)",
        "label_fraction": cfg.label_fraction,
        "seed": cfg.seed,
        "best_epoch": best_epoch,
        "seconds": round(time.perf_counter() - start, 2),
        "world_size": ctx.world_size,
        **fit_info,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(
        out / "config.yaml", {"task": "classify", **cfg.to_dict(), "class_names": prepared.class_names,
                              "encoder_fields": prepared.encoder_fields}
    )  # fmt: skip
    save_weights(out / "model.safetensors", weights, metadata={"method": cfg.method})
    notes = [
        f"method {cfg.method}; encoder {prepared.encoder_description or cfg.encoder}; "
        f"backbone {cfg.backbone} ({'weights ' + cfg.backbone_weights if cfg.backbone_weights else 'random init'})",
        f"{len(idx_train)} training images ({cfg.label_fraction:g} of {len(prepared.split['train'])}), seed {cfg.seed}",
    ]
    if not cfg.checkpoint:
        notes.append(
            "The SAM encoder has RANDOM weights (no checkpoint given): results do not reflect real SAM features."
        )
    write_run_outputs(
        out,
        metrics=metrics,
        class_names=prepared.class_names,
        ids=[prepared.dataset.ids[i] for i in eval_idx],
        splits=["val"] * n_val + ["test"] * (len(eval_idx) - n_val),
        y_true=y,
        probs=probs,
        history=history,
        best_epoch=best_epoch,
        notes=notes,
    )
    clear_resume(out)  # metrics.json is written: the run is complete
    return metrics


def _linear_probe(cfg, prepared, idx_train, eval_idx):
    x = prepared.sam_global()
    idx_val = prepared.split["val"]
    weights, history, best_c = fit_linear_probe(
        x_train=x[idx_train], y_train=prepared.labels[idx_train], x_val=x[idx_val], y_val=prepared.labels[idx_val],
        num_classes=len(prepared.class_names), monitor=cfg.monitor, seed=cfg.seed,
    )  # fmt: skip
    info = {"probe_C": best_c, "probe_C_grid": history}
    return probe_probabilities(weights, x[eval_idx]), None, None, weights, info


def _train_network(cfg, prepared, idx_train, eval_idx, ctx, progress, *, out: Path, resume: bool):
    generator = seed_everything(cfg.seed + ctx.rank)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    uses_sam = cfg.method == "slca"
    sam = prepared.sam_windows(cfg.slca_window, cfg.slca_pooling) if uses_sam else None
    images = prepared.images(cfg.image_size)
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

    def forward_eval(m: torch.nn.Module, batch_idx: torch.Tensor) -> torch.Tensor:
        x, s = inputs(batch_idx, train=False)
        return torch.softmax(m(x, s), dim=1)

    def probs_of(m: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
        chunks = torch.from_numpy(idx).split(EVAL_BATCH)
        return collect_outputs(m, chunks, forward_eval).double().numpy()

    idx_val = prepared.split["val"]

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(y_true=prepared.labels[idx_val], probs=probs_of(m, idx_val))

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
        resume_dir=resume_dir(out), resume=resume, fingerprint=_fingerprint(cfg),
    )  # fmt: skip
    probs = probs_of(model, eval_idx) if ctx.is_main else None
    info = {
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 2),
    }
    return probs, result.history, result.best_epoch, result.best_state, info


def _fingerprint(cfg: ClassifyConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (not where it runs or how it reports)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("out", "device", "store")}
