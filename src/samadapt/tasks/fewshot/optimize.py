"""Training and evaluation of a few-shot model on in-memory tensors, through the shared loop (`training.fit`).

`forward(module, *tensors) -> logits` says how a batch reaches the model (images, images + focus grids, or
precomputed features), so fine-tuning, CoOp and Tip-Adapter-F share one loop, one early-stopping rule and one
history format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from samadapt.errors import ConfigError
from samadapt.evaluation.classification import classification_metrics
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.loop import FitResult, fit

Forward = Callable[..., torch.Tensor]


@torch.no_grad()
def predict_probs(
    module: nn.Module, forward: Forward, tensors: tuple[torch.Tensor, ...], *, batch_size: int = 64
) -> np.ndarray:
    """Softmax probabilities [N, C] (float64, so rows sum to one for scikit-learn's checks) in eval mode."""
    was_training = module.training
    module.eval()
    n = tensors[0].shape[0]
    out = [
        torch.softmax(forward(module, *(t[i : i + batch_size] for t in tensors)).double(), dim=1).cpu()
        for i in range(0, n, batch_size)
    ]
    module.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def train_module(
    module: nn.Module,
    forward: Forward,
    *,
    train: tuple[torch.Tensor, ...],
    train_y: np.ndarray,
    val: tuple[torch.Tensor, ...],
    val_y: np.ndarray,
    params: list[nn.Parameter],
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    patience: int,
    monitor: str,
    seed: int,
    eps: float = 1e-8,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-5,
    desc: str = "train",
    progress: bool = True,
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """AdamW (or SGD with momentum) + cosine schedule, cross-entropy, early stopping on `monitor` of the
    validation set. With `warmup_epochs`, the learning rate is held at `warmup_lr` for those epochs before the
    cosine decay from `lr` starts (CoOp's constant warmup). `resume_dir`, `resume` and `fingerprint` go to
    `fit` (state saved after every epoch; `resume` continues from it)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(train_y, dtype=torch.long)
    loader = DataLoader(
        TensorDataset(*train, labels),
        batch_size=min(batch_size, len(labels)),
        shuffle=True,
        generator=generator,
    )
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")
    if warmup_epochs > 0:
        cosine_epochs = max(epochs - warmup_epochs, 1)

        def factor(epoch: int) -> float:
            if epoch < warmup_epochs:
                return warmup_lr / lr
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / cosine_epochs))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *xs, y = batch
        logits = forward(model, *xs)
        return F.cross_entropy(logits, y.to(logits.device))

    def validate(model: nn.Module) -> dict[str, float]:
        if len(val_y) == 0:
            return {"loss": float("nan")}
        return classification_metrics(
            y_true=val_y, probs=predict_probs(model, forward, val, batch_size=batch_size)
        )

    mode = "min" if monitor == "loss" else "max"
    return fit(
        model=module,
        train_loader=loader,
        loss_fn=loss_fn,
        validate=validate,
        optimizer=opt,
        epochs=epochs,
        stopper=EarlyStopping(monitor=monitor, mode=mode, patience=patience),
        scheduler=scheduler,
        progress=progress,
        desc=desc,
        resume_dir=resume_dir,
        resume=resume,
        fingerprint=fingerprint,
    )
