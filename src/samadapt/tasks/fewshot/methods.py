"""The few-shot methods, as a plain registry: which input each sees, what trains, and how it is fitted.

| method         | input    | trains                                 | logits                                  |
| medfocus       | overlay  | CLIP image tower (all or last blocks)  | scale * cos(f, class prompts)           |
| medfocus-attn  | attn     | CLIP image tower, mask as attn bias    | scale * cos(f, class prompts)           |
| clip-finetune  | plain    | CLIP image tower                       | scale * cos(f, class prompts)           |
| zero-shot      | plain    | nothing                                | scale * cos(f, class prompts)           |
| linear-probe   | plain    | logistic regression on frozen features | f W^T + b                               |
| coop           | views    | prompt context vectors (SGD, as CoOp)  | scale * cos(f, text(ctx, class))        |
| clip-adapter   | views    | bottleneck MLP, residual ratio 0.2     | scale * cos(0.2 A(f) + 0.8 f, prompts)  |
| tip-adapter    | views    | nothing (cache of training features)   | 100 f W_c^T + a exp(-b(1 - f F^T)) L    |
| tip-adapter-f  | views    | cache keys                             | as tip-adapter                          |
`scale` is the checkpoint's own logit scale (exp(logit_scale)). "views": frozen-CLIP features of augmented views
of the training images (`augment.py`; `aug_views` of them, 0: the plain image only); evaluation sees plain images.

Model selection uses the validation set the run passes in: by default a few-shot one, at most
min(K, `val_shots_max` = 4) images per class for K training shots per class (`val_budget`, run.py).
- CoOp: CoOp's epochs by shots (50 at 1-2, 100 at 3-8, 200 above; `coop_schedule`), SGD 2e-3, momentum 0.9,
  weight decay 5e-4, cosine, 1 warm-up epoch at 1e-5, batch 32, the LAST epoch kept (`coop_select`).
- CLIP-Adapter: the same SGD recipe, `clip_adapter_epochs` (200), last epoch kept.
- Tip-Adapter-F: AdamW 1e-3 (eps 1e-4), cosine, 20 epochs, batch 256, the best epoch on the validation set.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samadapt.data.splits import few_shot_val_indices
from samadapt.encoders.clip import ClipModel
from samadapt.errors import ConfigError
from samadapt.tasks.fewshot.attn_bias import ATTN_MODES, FocusAttention, MaskChoice
from samadapt.tasks.fewshot.augment import fit_on_views
from samadapt.tasks.fewshot.clip_adapter import ClipAdapterHead
from samadapt.tasks.fewshot.coop import CoOpHead
from samadapt.tasks.fewshot.heads import ClipClassifier, LinearHead, PromptHead
from samadapt.tasks.fewshot.inputs import Inputs
from samadapt.tasks.fewshot.linear_probe import fit_linear_probe
from samadapt.tasks.fewshot.optimize import predict_probs, train_module
from samadapt.tasks.fewshot.overlay import OverlayStyle
from samadapt.tasks.fewshot.tip_adapter import (
    TipAdapterHead,
    cache_keys_from_views,
    one_hot,
    search_alpha_beta,
    search_grid,
)


@dataclass(frozen=True)
class MethodSpec:
    input: str  # "plain", "overlay" or "attn"
    family: str  # "finetune", "zero-shot", "linear-probe", "coop", "clip-adapter", "tip"
    description: str

    @property
    def uses_views(self) -> bool:
        """Whether the method learns from augmented views of the training images (`fit_method(train_views=)`)."""
        return self.family in VIEW_FAMILIES


VIEW_FAMILIES = ("coop", "clip-adapter", "tip")


METHODS: dict[str, MethodSpec] = {
    "medfocus": MethodSpec(
        "overlay", "finetune", "SAM 2 mask overlays -> CLIP image tower trained, prompt logits"
    ),
    "medfocus-attn": MethodSpec("attn", "finetune", "SAM 2 masks as attention bias on CLIP's patch grid"),
    "clip-finetune": MethodSpec("plain", "finetune", "CLIP image tower trained on plain images"),
    "zero-shot": MethodSpec("plain", "zero-shot", "frozen CLIP, class-prompt similarity"),
    "linear-probe": MethodSpec("plain", "linear-probe", "logistic regression on frozen CLIP features"),
    "coop": MethodSpec("plain", "coop", "learned prompt context (CoOp), frozen CLIP"),
    "clip-adapter": MethodSpec(
        "plain", "clip-adapter", "residual bottleneck adapter on frozen CLIP features"
    ),
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
    # "few-shot": at most min(K, val_shots_max) val images per class (K training shots); "full": all of them
    val_budget: str = "few-shot"
    val_shots_max: int = 4
    aug_views: int = 10  # augmented views per training image (coop, clip-adapter, tip-*); 0: the plain image
    coop_n_ctx: int = 16
    coop_epochs: int = 200  # used with coop_schedule "fixed"
    coop_schedule: str = "by-shots"  # CoOp's table: 50 epochs at 1-2 shots, 100 at 3-8, 200 above
    coop_select: str = "last"  # "best": the best validation epoch, early stopping after `patience`
    coop_lr: float = 2e-3
    coop_optimizer: str = "sgd"  # CoOp paper: SGD (momentum 0.9, wd 5e-4), cosine, 1 warmup epoch at 1e-5
    clip_adapter_epochs: int = 200
    clip_adapter_lr: float = 2e-3
    tip_alpha: float = 1.0
    tip_beta: float = 5.5
    tip_epochs: int = 20
    tip_lr: float = 1e-3
    tip_batch_size: int = 256
    tip_search_scale: list[float] = field(default_factory=lambda: [7.0, 3.0])  # (beta max, alpha max)
    tip_search_steps: list[int] = field(default_factory=lambda: [200, 20])  # (betas, alphas)
    attn_mode: str = "falip"  # "falip": +[0, attn_bias_max] foveal bias; "suppress": -attn_strength outside
    attn_bias_max: float = 0.2
    attn_strength: float = 5.0
    attn_layers: list[int] | None = None  # None: FALIP's last 4 of 12 blocks (scaled); all to suppress
    attn_rows: str = "cls"
    attn_select: str = "largest"  # which masks make the region: "largest", "top-iou" or "union"
    attn_top_k: int = 1
    max_area_fraction: float = 0.9
    overlay: OverlayStyle = field(default_factory=OverlayStyle)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mask_choice(self) -> MaskChoice:
        """Which masks make a medfocus-attn image's region (prepare its inputs with this)."""
        return MaskChoice(
            select=self.attn_select, top_k=self.attn_top_k, max_area_fraction=self.max_area_fraction
        )


def shots_per_class(labels: np.ndarray) -> int:
    """K of a run: the fewest training images of any class present (the K of a balanced K-shot set)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return int(counts.min()) if len(counts) else 0


def validation_indices(
    idx_val: np.ndarray, labels: np.ndarray, train_labels: np.ndarray, options: FewShotOptions, *, seed: int
) -> np.ndarray:
    """The validation images of a run: with `val_budget` "few-shot" (default) at most min(K, val_shots_max)
    per class (K = `shots_per_class` of the training labels), seeded by the run's seed; "full": all of them.
    Model selection and the metrics' "val" / `n_val` use this set; the test split is always complete."""
    if options.val_budget == "full":
        return idx_val
    if options.val_budget != "few-shot":
        raise ConfigError(f"--val-budget must be 'few-shot' or 'full', got {options.val_budget!r}")
    per_class = max(1, min(shots_per_class(train_labels), options.val_shots_max))
    return few_shot_val_indices(idx_val, labels, per_class=per_class, seed=seed)


def coop_epochs(shots: int, options: FewShotOptions) -> int:
    """CoOp's epochs: 50 at 1-2 shots, 100 at 4-8 (and 3), 200 at 16 (and above 8); `coop_epochs` if "fixed"."""
    if options.coop_schedule == "fixed":
        return options.coop_epochs
    if options.coop_schedule != "by-shots":
        raise ConfigError(f"--coop-schedule must be 'by-shots' or 'fixed', got {options.coop_schedule!r}")
    return 50 if shots <= 2 else 100 if shots <= 8 else 200


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
    elif spec.family == "clip-adapter":
        head = ClipAdapterHead(
            clip.encode_text(class_prompts(options.prompt_template, class_names)), scale=scale
        )
    else:
        n_cache = state["head.cache_keys"].shape[0] if state is not None else 1
        text = clip.encode_text(class_prompts(options.prompt_template, class_names))
        head = TipAdapterHead(
            text, torch.zeros(n_cache, text.shape[1]), torch.zeros(n_cache, num_classes),
            alpha=options.tip_alpha, beta=options.tip_beta, learn_keys=method == "tip-adapter-f",
        )  # fmt: skip
    focus = None
    if spec.input == "attn":
        if options.attn_mode not in ATTN_MODES:
            raise ConfigError(
                f"--attn-mode must be one of {', '.join(ATTN_MODES)}, got {options.attn_mode!r}"
            )
        focus = FocusAttention(
            visual, strength=options.attn_strength, layers=options.attn_layers, rows=options.attn_rows,
            mode=options.attn_mode, bias_max=options.attn_bias_max,
        )  # fmt: skip
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
    train_views: torch.Tensor | None = None,
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> tuple[ClipClassifier, dict[str, Any], list[dict[str, float]]]:
    """Fit `method` on the training inputs; returns (model, info for metrics.json, per-epoch history).

    `train_views` [V, N, D]: raw frozen-CLIP features of V augmented views of the N training images
    (`run.Resources.augmented_features`), used by coop, clip-adapter and tip-*; None: the plain images' features
    as the only view. Methods trained by epochs (fine-tuning, CoOp, CLIP-Adapter, Tip-Adapter-F) save their state
    in `resume_dir` after every epoch and, with `resume`, continue from it; the others just rerun."""
    spec = get_method(method)
    torch.manual_seed(seed)
    model = build_model(method, clip, class_names, options)
    info: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    resume_args = dict(resume_dir=resume_dir, resume=resume, fingerprint=fingerprint)
    if spec.family == "finetune":
        params = [p for p in model.visual.parameters() if p.requires_grad]
        info["trainable_parameters"] = sum(p.numel() for p in params)
        result = train_module(
            model, image_forward, train=train.tensors(), val=val.tensors(), params=params, epochs=options.epochs,
            lr=options.lr, weight_decay=options.weight_decay, batch_size=options.batch_size, desc=method,
            progress=options.progress, train_y=train_y, val_y=val_y, seed=seed, monitor=options.monitor,
            patience=options.patience, **resume_args,
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
            monitor=options.monitor,
        )
        model.head = head.to(train_f.device)
        info.update(chosen)
        return model, info, history
    shots = shots_per_class(train_y)
    if train_views is not None and train_views.shape[1] != len(train_y):
        raise ConfigError(
            f"{method}: {train_views.shape[1]} augmented views' images for {len(train_y)} labels"
        )
    views = (
        F.normalize(train_views.float(), dim=-1).to(train_f.device)
        if train_views is not None
        else train_f[None]
    )
    info["augmented_views"] = int(views.shape[0]) if train_views is not None else 0
    common = dict(views=views, train_y=train_y, val_features=val_f, val_y=val_y, seed=seed, desc=method,
                  progress=options.progress, monitor=options.monitor, **resume_args)  # fmt: skip
    if spec.family in ("coop", "clip-adapter"):
        if spec.family == "coop":
            params, epochs, lr = [model.head.ctx], coop_epochs(shots, options), options.coop_lr
            select = options.coop_select
        else:
            params, epochs, lr = (
                list(model.head.adapter.parameters()),
                options.clip_adapter_epochs,
                options.clip_adapter_lr,
            )
            select = "last"
        info["trainable_parameters"], info["epochs"] = sum(p.numel() for p in params), epochs
        result = fit_on_views(
            model.head, params=params, epochs=epochs, lr=lr, batch_size=options.batch_size, select=select,
            patience=options.patience if select == "best" else None, **_coop_optimizer(options), **common,
        )  # fmt: skip
        history, info["best_epoch"] = result.history, result.best_epoch
        return model, info, history
    # Tip-Adapter: the cache is the few-shot training set, keys averaged over the augmented views
    keys = cache_keys_from_views(train_views).to(train_f.device) if train_views is not None else train_f
    model.head = TipAdapterHead(
        model.head.clip_weights, keys, one_hot(train_y, len(class_names)).to(train_f.device),
        alpha=options.tip_alpha, beta=options.tip_beta, learn_keys=method == "tip-adapter-f",
    )  # fmt: skip
    if method == "tip-adapter-f":
        info["trainable_parameters"] = model.head.cache_keys.numel()
        result = fit_on_views(
            model.head, params=[model.head.cache_keys], epochs=options.tip_epochs, lr=options.tip_lr,
            optimizer="adamw", weight_decay=0.01, eps=1e-4, batch_size=options.tip_batch_size, select="best",
            **common,
        )  # fmt: skip
        history, info["best_epoch"] = result.history, result.best_epoch
    if len(val_y):
        (beta_max, alpha_max), (beta_steps, alpha_steps) = options.tip_search_scale, options.tip_search_steps
        alpha, beta, acc = search_alpha_beta(
            model.head,
            val_f,
            val_y,
            alphas=search_grid(alpha_max, alpha_steps),
            betas=search_grid(beta_max, beta_steps),
        )
        info.update({"alpha": alpha, "beta": beta, "val_accuracy_search": acc})
    return model, info, history


def evaluate_probs(model: ClipClassifier, inputs: Inputs, *, batch_size: int = 64) -> np.ndarray:
    return predict_probs(model, image_forward, inputs.tensors(), batch_size=batch_size)
