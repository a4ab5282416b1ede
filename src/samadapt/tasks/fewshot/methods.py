"""The few-shot methods, as a plain registry: which input each sees, what trains, and how it is fitted.

| method         | input    | trains                                 | logits                                  |
| medfocus       | overlay  | CLIP image tower (all or last blocks)  | scale * cos(f, class prompts)           |
| medfocus-attn  | attn     | CLIP image tower, mask as attn bias    | scale * cos(f, class prompts)           |
| clip-finetune  | plain    | CLIP image tower                       | scale * cos(f, class prompts)           |
| zero-shot      | plain    | nothing                                | scale * cos(f, class prompts)           |
| linear-probe   | plain    | logistic regression on frozen features | f W^T + b                               |
| coop           | plain    | prompt context vectors (SGD, as CoOp)  | scale * cos(f, text(ctx, class))        |
| tip-adapter    | plain    | nothing (cache of training features)   | 100 f W_c^T + a exp(-b(1 - f F^T)) L    |
| tip-adapter-f  | plain    | cache keys                             | as tip-adapter                          |
`scale` is the checkpoint's own logit scale (exp(logit_scale)).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.encoders.clip import ClipModel
from samadapt.errors import ConfigError
from samadapt.tasks.fewshot.attn_bias import FocusAttention
from samadapt.tasks.fewshot.coop import CoOpHead
from samadapt.tasks.fewshot.heads import ClipClassifier, LinearHead, PromptHead
from samadapt.tasks.fewshot.inputs import Inputs
from samadapt.tasks.fewshot.linear_probe import fit_linear_probe
from samadapt.tasks.fewshot.optimize import predict_probs, train_module
from samadapt.tasks.fewshot.overlay import OverlayStyle
from samadapt.tasks.fewshot.tip_adapter import TipAdapterHead, one_hot, search_alpha_beta


@dataclass(frozen=True)
class MethodSpec:
    input: str  # "plain", "overlay" or "attn"
    family: str  # "finetune", "zero-shot", "linear-probe", "coop", "tip"
    description: str


METHODS: dict[str, MethodSpec] = {
    "medfocus": MethodSpec(
        "overlay", "finetune", "SAM 2 mask overlays -> CLIP image tower trained, prompt logits"
    ),
    "medfocus-attn": MethodSpec("attn", "finetune", "SAM 2 masks as attention bias on CLIP's patch grid"),
    "clip-finetune": MethodSpec("plain", "finetune", "CLIP image tower trained on plain images"),
    "zero-shot": MethodSpec("plain", "zero-shot", "frozen CLIP, class-prompt similarity"),
    "linear-probe": MethodSpec("plain", "linear-probe", "logistic regression on frozen CLIP features"),
    "coop": MethodSpec("plain", "coop", "learned prompt context (CoOp), frozen CLIP"),
    "tip-adapter": MethodSpec("plain", "tip", "training-free cache of few-shot features (Tip-Adapter)"),
    "tip-adapter-f": MethodSpec("plain", "tip", "Tip-Adapter with fine-tuned cache keys"),
}


@dataclass
class FewShotOptions:
    """Every setting of a few-shot run (saved in config.yaml; the CLI flags have the same names)."""

    prompt_template: str = "This is a photo of {class}"
    epochs: int = 20
    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 32
    patience: int = 5
    monitor: str = "accuracy"
    trainable_blocks: int = -1  # -1: the whole image tower; k: the last k blocks (+ final norm, projection)
    coop_n_ctx: int = 16
    coop_epochs: int = 50
    coop_lr: float = 2e-3
    coop_optimizer: str = "sgd"  # CoOp paper: SGD (momentum 0.9, wd 5e-4), cosine, 1 warmup epoch at 1e-5
    tip_alpha: float = 1.0
    tip_beta: float = 5.5
    tip_epochs: int = 20
    tip_lr: float = 1e-3
    attn_strength: float = 5.0
    attn_layers: list[int] | None = None  # None: every block
    attn_rows: str = "cls"
    max_area_fraction: float = 0.9
    overlay: OverlayStyle = field(default_factory=OverlayStyle)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown few-shot method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def class_prompts(template: str, class_names: list[str]) -> list[str]:
    if "{class}" not in template:
        raise ConfigError(f"prompt template {template!r} must contain '{{class}}'")
    return [template.replace("{class}", name.replace("_", " ")) for name in class_names]


def logit_scale(clip: ClipModel) -> float:
    return float(clip.model.logit_scale.detach().exp().reshape(-1)[0])


def set_trainable(visual: torch.nn.Module, blocks: int) -> int:
    """Unfreeze the whole tower (blocks < 0) or its last `blocks` resblocks plus final norm and projection."""
    visual.requires_grad_(blocks < 0)
    if blocks >= 0:
        resblocks = list(visual.transformer.resblocks) if hasattr(visual, "transformer") else []
        if blocks > len(resblocks):
            raise ConfigError(
                f"--trainable-blocks {blocks}: the CLIP image tower has {len(resblocks)} blocks"
            )
        for block in resblocks[len(resblocks) - blocks :] if blocks else []:
            block.requires_grad_(True)
        if blocks:
            for name in ("ln_post", "proj"):
                part = getattr(visual, name, None)
                if isinstance(part, torch.nn.Parameter):
                    part.requires_grad_(True)
                elif isinstance(part, torch.nn.Module):
                    part.requires_grad_(True)
    return sum(p.numel() for p in visual.parameters() if p.requires_grad)


def build_model(
    method: str,
    clip: ClipModel,
    class_names: list[str],
    options: FewShotOptions,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> ClipClassifier:
    """The model skeleton of `method` (heads initialised from prompts, or shaped after a saved `state`)."""
    spec = get_method(method)
    num_classes = len(class_names)
    scale = logit_scale(clip)
    if spec.family == "finetune":
        visual = copy.deepcopy(clip.model.visual)
        set_trainable(visual, options.trainable_blocks)
    else:
        visual = clip.model.visual
    if spec.family in ("finetune", "zero-shot"):
        head = PromptHead(clip.encode_text(class_prompts(options.prompt_template, class_names)), scale=scale)
    elif spec.family == "linear-probe":
        dim = _feature_dim(clip)
        head = LinearHead(torch.zeros(num_classes, dim), torch.zeros(num_classes))
    elif spec.family == "coop":
        head = CoOpHead(clip, class_names, n_ctx=options.coop_n_ctx, scale=scale)
    else:
        n_cache = state["head.cache_keys"].shape[0] if state is not None else 1
        text = clip.encode_text(class_prompts(options.prompt_template, class_names))
        head = TipAdapterHead(
            text, torch.zeros(n_cache, text.shape[1]), torch.zeros(n_cache, num_classes),
            alpha=options.tip_alpha, beta=options.tip_beta, learn_keys=method == "tip-adapter-f",
        )  # fmt: skip
    focus = None
    if spec.input == "attn":
        focus = FocusAttention(
            visual, strength=options.attn_strength, layers=options.attn_layers, rows=options.attn_rows
        )
    return ClipClassifier(visual, head, focus=focus).to(next(clip.model.parameters()).device)


def _coop_optimizer(options: FewShotOptions) -> dict[str, Any]:
    """CoOp's published recipe (Zhou et al. 2022; Dassl configs): SGD, momentum 0.9, weight decay 5e-4,
    cosine decay, the first epoch at a constant 1e-5 against early gradient explosions. "adamw" is the
    recipe without warmup or weight decay."""
    if options.coop_optimizer == "sgd":
        return {
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "warmup_epochs": 1,
            "warmup_lr": 1e-5,
        }
    if options.coop_optimizer == "adamw":
        return {"optimizer": "adamw", "weight_decay": 0.0}
    raise ConfigError(f"--coop-optimizer must be 'sgd' or 'adamw', got {options.coop_optimizer!r}")


def _feature_dim(clip: ClipModel) -> int:
    return int(clip.model_cfg["embed_dim"])


def image_forward(
    model: ClipClassifier, images: torch.Tensor, grids: torch.Tensor | None = None
) -> torch.Tensor:
    return model(images, grids)


def head_forward(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    return head(features)


@torch.no_grad()
def frozen_features(model: ClipClassifier, inputs: Inputs, *, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    tensors = inputs.tensors()
    n = len(inputs)
    out = [model.features(*(t[i : i + batch_size] for t in tensors)) for i in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 1)


def fit_method(
    method: str,
    clip: ClipModel,
    class_names: list[str],
    *,
    train: Inputs,
    train_y: np.ndarray,
    val: Inputs,
    val_y: np.ndarray,
    options: FewShotOptions,
    seed: int,
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> tuple[ClipClassifier, dict[str, Any], list[dict[str, float]]]:
    """Fit `method` on the training inputs; returns (model, info for metrics.json, per-epoch history).

    Methods trained by epochs (fine-tuning, CoOp, Tip-Adapter-F) save their state in `resume_dir` after every
    epoch and, with `resume`, continue from it; the others (zero-shot, linear probe, Tip-Adapter) just rerun."""
    spec = get_method(method)
    torch.manual_seed(seed)
    model = build_model(method, clip, class_names, options)
    info: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    common = dict(train_y=train_y, val_y=val_y, seed=seed, monitor=options.monitor, patience=options.patience,
                  resume_dir=resume_dir, resume=resume, fingerprint=fingerprint)  # fmt: skip
    if spec.family == "finetune":
        params = [p for p in model.visual.parameters() if p.requires_grad]
        info["trainable_parameters"] = sum(p.numel() for p in params)
        result = train_module(
            model, image_forward, train=train.tensors(), val=val.tensors(), params=params, epochs=options.epochs,
            lr=options.lr, weight_decay=options.weight_decay, batch_size=options.batch_size, desc=method,
            progress=options.progress, **common,
        )  # fmt: skip
        history, info["best_epoch"] = result.history, result.best_epoch
        return model, info, history
    if spec.family == "zero-shot":
        return model, info, history
    train_f = frozen_features(model, train)
    val_f = frozen_features(model, val)
    if spec.family == "linear-probe":
        head, chosen = fit_linear_probe(
            train_f.cpu().numpy(),
            train_y,
            val_f.cpu().numpy(),
            val_y,
            num_classes=len(class_names),
            seed=seed,
        )
        model.head = head.to(train_f.device)
        info.update(chosen)
    elif spec.family == "coop":
        info["trainable_parameters"] = model.head.ctx.numel()
        result = train_module(
            model.head, head_forward, train=(train_f,), val=(val_f,), params=[model.head.ctx],
            epochs=options.coop_epochs, lr=options.coop_lr, batch_size=options.batch_size, desc=method,
            progress=options.progress, **_coop_optimizer(options), **common,
        )  # fmt: skip
        history, info["best_epoch"] = result.history, result.best_epoch
    else:  # Tip-Adapter: the cache is the few-shot training set
        text = model.head.clip_weights
        model.head = TipAdapterHead(
            text, train_f, one_hot(train_y, len(class_names)).to(train_f.device), alpha=options.tip_alpha, beta=options.tip_beta,
            learn_keys=method == "tip-adapter-f",
        )  # fmt: skip
        if method == "tip-adapter-f":
            info["trainable_parameters"] = model.head.cache_keys.numel()
            result = train_module(
                model.head, head_forward, train=(train_f,), val=(val_f,), params=[model.head.cache_keys],
                epochs=options.tip_epochs, lr=options.tip_lr, weight_decay=0.01, eps=1e-4,
                batch_size=max(options.batch_size, 256), desc=method, progress=options.progress, **common,
            )  # fmt: skip
            history, info["best_epoch"] = result.history, result.best_epoch
        if len(val_y):
            alpha, beta, acc = search_alpha_beta(model.head, val_f, val_y)
            info.update({"alpha": alpha, "beta": beta, "val_accuracy_search": acc})
    return model, info, history


def evaluate_probs(model: ClipClassifier, inputs: Inputs, *, batch_size: int = 64) -> np.ndarray:
    return predict_probs(model, image_forward, inputs.tensors(), batch_size=batch_size)
