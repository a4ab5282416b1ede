"""The shared training loop: plain torch, AdamW by the caller, early stopping on validation, best weights kept.

Task-neutral: the task supplies how a batch becomes a loss (`loss_fn`) and how the model is scored on the
validation set (`validate`); the loop handles epochs, DDP samplers, gradient clipping, history and the best state.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from samadapt.errors import ConfigError
from samadapt.training.distributed import DistContext, broadcast_object, mean_across_ranks, unwrap_model
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.resume import (
    ResumeState,
    load_resume,
    restore_rng,
    restore_stopper,
    rng_state,
    save_resume,
    stopper_state,
)

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What `fit` learned: per-epoch history, the best epoch and its validation metrics and weights."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val: dict[str, float]
    best_state: dict[str, torch.Tensor]
    stopped_early: bool = False
    seconds: float = 0.0


def fit(
    *,
    model: nn.Module,
    train_loader: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    validate: Callable[[nn.Module], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    stopper: EarlyStopping | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    desc: str = "train",
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` for up to `epochs` epochs and return the best state by validation.

    - `model` may be wrapped in DistributedDataParallel; `loss_fn(model, batch)` must call it (so gradients sync).
    - `validate(module)` gets the unwrapped module in eval mode and returns metrics (with "loss" for tie-breaks).
      Under DDP every rank validates the full set; rank 0's early-stopping decision is broadcast.
    - `train_loader.sampler.set_epoch(epoch)` is called when it exists (DistributedSampler reshuffles per epoch).
    - On return the model holds the best weights; `best_state` is a CPU copy of them.
    - With `resume_dir`, the full state (weights, optimizer, scheduler, early stopping, history, RNGs of python,
      numpy, torch and the loader's generator) is saved there after every epoch; with `resume` too, a saved
      state continues the run, so the result equals an uninterrupted run's. `fingerprint` (the run's settings)
      must match the saved one. The engine deletes the state once the run's outputs are written.
    """
    ctx = ctx or DistContext()
    stopper = stopper or EarlyStopping(patience=epochs + 1)
    module = unwrap_model(model)
    generators = _generators(train_loader)
    history: list[dict[str, float]] = []
    best_state = _cpu_state(module)
    best_val: dict[str, float] = {}
    stopped_early = False
    first = 0
    if ctx.enabled:  # per-rank RNG streams would need one state per rank: not supported yet
        if resume:
            raise ConfigError(
                "--resume is not supported under torchrun (DDP); rerun on one process or without it"
            )
        resume_dir = None
    saved = load_resume(resume_dir, fingerprint=fingerprint) if resume_dir is not None and resume else None
    if saved is not None:
        module.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        if scheduler is not None and saved.scheduler is not None:
            scheduler.load_state_dict(saved.scheduler)
        restore_stopper(stopper, saved.stopper)
        restore_rng(saved.rng, generators)
        history, best_state, best_val = saved.history, saved.best_state, saved.best_val
        first = epochs if saved.stopped else saved.epoch + 1
        stopped_early = saved.stopped and saved.epoch + 1 < epochs
        log.info("resuming %s after epoch %d of %d", desc, saved.epoch, epochs)
    start = time.perf_counter()
    bar = tqdm(
        range(first, epochs), desc=desc, disable=not (progress and ctx.is_main), leave=False, initial=first,
        total=epochs,
    )  # fmt: skip
    for epoch in bar:
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        losses: list[float] = []
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}: {loss.item()}")
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
        if scheduler is not None:
            scheduler.step()
        train_loss = mean_across_ranks(float(np.mean(losses)) if losses else math.nan, ctx)
        module.eval()
        with torch.no_grad():
            val = validate(module)
        improved = broadcast_object(stopper.step(epoch, val), ctx)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": float(v) for k, v in val.items()}}
        )
        # A dict, not keywords: the monitored metric may itself be called "loss".
        bar.set_postfix(
            {
                "train_loss": f"{train_loss:.3f}",
                f"val_{stopper.monitor}": f"{val.get(stopper.monitor, math.nan):.3f}",
            }
        )
        if improved:
            best_state, best_val = _cpu_state(module), dict(val)
        stop = broadcast_object(stopper.should_stop, ctx)
        if resume_dir is not None:
            state = ResumeState(
                epoch=epoch, history=history, best_val=best_val, stopped=stop, stopper=stopper_state(stopper),
                model=module.state_dict(), best_state=best_state, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None, rng=rng_state(generators),
            )  # fmt: skip
            save_resume(resume_dir, state, fingerprint=fingerprint)
        if stop:
            stopped_early = epoch + 1 < epochs
            break
    module.load_state_dict(best_state)
    return FitResult(
        history=history,
        best_epoch=stopper.best_epoch,
        best_val=best_val,
        best_state=best_state,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def collect_outputs(
    module: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], torch.Tensor]
) -> torch.Tensor:
    """Run `forward(module, batch)` in eval mode over all batches and concatenate the outputs (on CPU)."""
    was_training = module.training
    module.eval()
    outputs = [forward(module, batch).detach().float().cpu() for batch in batches]
    module.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def _generators(loader: Iterable[Any]) -> list[torch.Generator]:
    """The loader's data-order generator and the sampler's, when they are separate objects (saved for resume)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: copy.deepcopy(value.detach().cpu()) for key, value in module.state_dict().items()}
