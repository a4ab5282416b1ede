"""Augmented views of the few-shot training images, and training a head on their frozen-CLIP features.

The references learn from random augmentations of the few-shot images: Tip-Adapter averages 10 views
(RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip, then CLIP's normalisation) into each cache key and
Tip-Adapter-F, CoOp and CLIP-Adapter train on fresh random views every epoch. With the image tower frozen, a
view's CLIP feature never changes, so `V` views per image are computed once (`augmented_view`, deterministic per
(seed, image index, view); cached by `run.Resources.augmented_features` across the runs of a sweep) and epoch e
trains on view ``e % V`` of every image (`ViewSampler`): V >= epochs gives a fresh view every epoch, a smaller V
reuses them cyclically. One view set (scale 0.5-1) serves every method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from samadapt.encoders.clip import ClipModel, to_pil_rgb
from samadapt.errors import ConfigError
from samadapt.evaluation.classification import classification_metrics
from samadapt.tasks.fewshot.optimize import predict_probs
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.loop import FitResult, fit

CROP_SCALE = (0.5, 1.0)  # Tip-Adapter's RandomResizedCrop scale


def view_transform(clip: ClipModel):
    """RandomResizedCrop(size, scale=(0.5, 1)) + RandomHorizontalFlip + ToTensor + CLIP's mean / std."""
    from torchvision import transforms as T

    cfg = clip.preprocess_cfg
    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    interpolation = modes.get(str(cfg.get("interpolation", "bicubic")), T.InterpolationMode.BICUBIC)
    return T.Compose(
        [
            T.RandomResizedCrop(clip.image_size, scale=CROP_SCALE, interpolation=interpolation),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(mean=tuple(cfg["mean"]), std=tuple(cfg["std"])),
        ]
    )


def view_seed(seed: int, index: int, view: int, *, stream: int = 0) -> int:
    """A 32-bit seed for (seed, index, view) (stream 1: the epoch orders of `ViewSampler`)."""
    return int(np.random.SeedSequence([int(stream), int(seed), int(index), int(view)]).generate_state(1)[0])


def augmented_view(image: np.ndarray, *, transform, seed: int, index: int, view: int) -> torch.Tensor:
    """View `view` of dataset image `index`: the same tensor for the same (seed, index, view), whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed, index, view))
        return transform(to_pil_rgb(image))


@torch.no_grad()
def encode_images(visual: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Raw (not normalised) image-tower features [M, D] in eval mode."""
    was_training = visual.training
    visual.eval()
    device = next(visual.parameters()).device
    out = [visual(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    visual.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


class ViewSampler(Sampler[int]):
    """Epoch e: every image once, at view e % V, in an order seeded by (seed, e) (flat index v * N + i).

    The order depends only on (seed, epoch), so a resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, n: int, views: int, *, seed: int) -> None:
        self.n, self.views, self.seed, self.epoch = n, views, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(view_seed(self.seed, 0, self.epoch, stream=1))
        view = self.epoch % self.views
        return iter((view * self.n + torch.randperm(self.n, generator=generator)).tolist())

    def __len__(self) -> int:
        return self.n


class _Views(Dataset):
    def __init__(self, views: torch.Tensor, labels: torch.Tensor) -> None:
        self.views, self.labels, self.n = views, labels, views.shape[1]

    def __len__(self) -> int:
        return int(self.views.shape[0] * self.n)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        view, i = divmod(k, self.n)
        return self.views[view, i], self.labels[i]


class LastEpoch(EarlyStopping):
    """Keep the last epoch and never stop early (CoOp, CLIP-Adapter: a fixed number of epochs)."""

    def step(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.best_score, self.best_epoch, self.bad_epochs = (float(epoch), 0.0), epoch, 0
        return True


def cosine_with_warmup(
    opt: torch.optim.Optimizer, *, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch cosine decay from `lr`; the first `warmup_epochs` held at `warmup_lr` (Dassl's constant warmup)."""
    cosine_epochs = max(epochs - warmup_epochs, 1)

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_lr / lr
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / cosine_epochs))  # a float: resumable

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit_on_views(
    head: nn.Module,
    *,
    views: torch.Tensor,
    train_y: np.ndarray,
    val_features: torch.Tensor,
    val_y: np.ndarray,
    params: list[nn.Parameter],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    eps: float = 1e-8,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-5,
    select: str = "last",
    monitor: str = "accuracy",
    patience: int | None = None,
    desc: str = "train",
    progress: bool = True,
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """Cross-entropy training of `head` on L2-normalised view features `views` [V, N, D] (epoch e: view e % V),
    through the shared loop (`training.fit`: history, resume). `select` "last" keeps the final epoch (no early
    stopping); "best" keeps the best epoch on (`val_features`, `val_y`) by `monitor`, stopping after `patience`
    epochs without improvement (None: never)."""
    if views.ndim != 3 or views.shape[1] != len(train_y):
        raise ConfigError(f"{desc}: views must be [V, {len(train_y)}, D], got {tuple(views.shape)}")
    labels = torch.as_tensor(train_y, dtype=torch.long)
    loader = DataLoader(
        _Views(views, labels),
        batch_size=min(batch_size, len(labels)),
        sampler=ViewSampler(len(labels), views.shape[0], seed=seed),
    )
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")
    scheduler = cosine_with_warmup(
        opt, lr=lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr
    )

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y.to(logits.device))

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def validate(model: nn.Module) -> dict[str, float]:
        if len(val_y) == 0:
            return {"loss": float("nan")}
        probs = predict_probs(model, forward, (val_features,), batch_size=max(batch_size, 64))
        return classification_metrics(y_true=val_y, probs=probs)

    mode = "min" if monitor == "loss" else "max"
    if select == "last":
        stopper: EarlyStopping = LastEpoch(monitor=monitor, mode=mode, patience=epochs + 1)
    elif select == "best":
        stopper = EarlyStopping(
            monitor=monitor, mode=mode, patience=epochs + 1 if patience is None else patience
        )
    else:
        raise ConfigError(f"epoch selection must be 'last' or 'best', got {select!r}")
    return fit(
        model=head, train_loader=loader, loss_fn=loss_fn, validate=validate, optimizer=opt, epochs=epochs,
        stopper=stopper, scheduler=scheduler, progress=progress, desc=desc, resume_dir=resume_dir, resume=resume,
        fingerprint=fingerprint,
    )  # fmt: skip
