"""`FewShotTask`: MedFocusCLIP (SAM 2 masks as visual prompts for CLIP) and its few-shot baselines, for the engine.

Flow: `run.Resources` (dataset, CLIP, masker, prepared inputs; shared by a sweep) -> `methods.fit_method` ->
val/test probabilities -> the engine's run folder, plus the overlay gallery that explains MedFocusCLIP's input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from samadapt.engine.task import Evaluation, Fitted, Output, RunContext, Task
from samadapt.errors import DataError
from samadapt.tasks.fewshot.config import PRESETS, FewShotConfig
from samadapt.tasks.fewshot.methods import METHODS, get_method
from samadapt.tasks.fewshot.run import Resources, gallery, load_resources


class FewShotTask(Task):
    name = "fewshot"
    Config = FewShotConfig
    methods = tuple(METHODS)
    budget_field = "data_fraction"
    headline_metrics = ("accuracy", "auc", "balanced_accuracy", "f1_macro")
    presets = PRESETS
    sweep_defaults: ClassVar[dict[str, Any]] = {
        "method": list(METHODS), "data_fraction": [0.05, 0.1, 0.2, 0.5, 1.0], "seed": 1,
    }  # fmt: skip
    prepare_fields = (
        "data", "split_seed", "class_names", "clip", "clip_checkpoint", "quick_gelu", "masker", "masker_checkpoint",
        "masker_arch", "masker_image_size", "masker_implementation", "mask_cache", "device", "points_per_side", "points_per_batch",
        "pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh", "crop_n_layers",
        "min_mask_region_area", "multimask_output", "overlay_palette", "overlay_alpha", "overlay_outline",
        "overlay_outline_color", "overlay_outline_width", "overlay_max_masks", "max_area_fraction",
    )  # fmt: skip

    def prepare(self, cfg: FewShotConfig, *, progress: bool) -> Resources:  # type: ignore[override]
        return load_resources(cfg, out=Path(cfg.out or "."))

    def _indices(self, cfg: FewShotConfig, res: Resources) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training images of the budget; the validation images any selection may use (by default at most
        min(K, 4) per class, the few-shot protocol of CoOp and Tip-Adapter); the whole test split."""
        from samadapt.data.splits import label_fraction_indices
        from samadapt.tasks.fewshot.methods import validation_indices

        ds = res.dataset
        idx_train = label_fraction_indices(ds.split_indices("train"), ds.labels, cfg.data_fraction, cfg.seed)
        idx_val, idx_test = ds.split_indices("val"), ds.split_indices("test")
        if len(idx_test) == 0:
            raise DataError(f"{cfg.data}: the test split is empty")
        idx_val = validation_indices(idx_val, ds.labels, ds.labels[idx_train], cfg.options, seed=cfg.seed)
        return idx_train, idx_val, idx_test

    def fit(self, cfg: FewShotConfig, res: Resources, run: RunContext) -> Fitted:  # type: ignore[override]
        from samadapt.tasks.fewshot.heads import learned_state
        from samadapt.tasks.fewshot.methods import fit_method
        from samadapt.training.seed import seed_everything

        spec = get_method(cfg.method)
        seed_everything(cfg.seed)
        idx_train, idx_val, _ = self._indices(cfg, res)
        opts = cfg.options
        train_in, val_in = res.inputs(spec.input, idx_train, opts), res.inputs(spec.input, idx_val, opts)
        labels = res.dataset.labels
        fingerprint = {
            k: v for k, v in cfg.fingerprint().items() if k not in ("clip_checkpoint", "masker_checkpoint")
        }
        fingerprint["clip_identity"] = _identity(
            res
        )  # the models by content: a moved checkpoint still resumes
        model, info, history = fit_method(
            cfg.method, res.clip, res.class_names, train=train_in, train_y=labels[idx_train], val=val_in,
            val_y=labels[idx_val], options=opts, seed=cfg.seed, resume_dir=run.resume_dir, resume=run.resume,
            fingerprint=fingerprint,
        )  # fmt: skip
        best_epoch = info.pop("best_epoch", None)
        return Fitted(weights=learned_state(model), model=model, history=history, best_epoch=best_epoch,
                      info={**info, "n_train": int(len(idx_train))})  # fmt: skip

    def evaluate(self, cfg: FewShotConfig, res: Resources, fitted: Fitted) -> Evaluation:  # type: ignore[override]
        from samadapt.evaluation.classification import classification_metrics
        from samadapt.reports.predictions import prediction_rows
        from samadapt.tasks.fewshot.methods import evaluate_probs

        spec = get_method(cfg.method)
        idx_train, idx_val, idx_test = self._indices(cfg, res)
        opts = cfg.options
        val_in, test_in = res.inputs(spec.input, idx_val, opts), res.inputs(spec.input, idx_test, opts)
        train_in = res.inputs(spec.input, idx_train, opts)
        n_classes = len(res.class_names)
        probs_val = evaluate_probs(fitted.model, val_in) if len(idx_val) else np.zeros((0, n_classes))
        probs_test = evaluate_probs(fitted.model, test_in)
        labels = res.dataset.labels
        counts = np.concatenate([train_in.mask_counts, val_in.mask_counts, test_in.mask_counts])
        masked = spec.input != "plain"
        metrics: dict[str, Any] = {
            "val": classification_metrics(y_true=labels[idx_val], probs=probs_val) if len(idx_val) else {},
            "test": classification_metrics(y_true=labels[idx_test], probs=probs_test),
            "n_val": int(len(idx_val)),
            "n_test": int(len(idx_test)),
            "clip": res.clip.name,
            "clip_weights": cfg.clip_checkpoint or "random",
            "quick_gelu": res.clip.quick_gelu,
            "masker": cfg.masker if masked else None,
            "data_fraction": cfg.data_fraction,
            "label_fraction": cfg.data_fraction,
            "mean_masks_per_image": float(counts.mean()) if masked and len(counts) else None,
            "images_without_masks": int((counts == 0).sum()) if masked else None,
        }
        eval_idx = np.concatenate([idx_val, idx_test])
        splits = ["val"] * len(idx_val) + ["test"] * len(idx_test)
        probs = np.concatenate([probs_val, probs_test])
        rows = prediction_rows(ids=[res.dataset.ids[i] for i in eval_idx], probs=probs, class_names=res.class_names,
                               y_true=labels[eval_idx], split=splits)  # fmt: skip
        return Evaluation(metrics=metrics, predictions=rows,
                          payload=(labels[eval_idx], probs, splits, idx_test, probs_test, test_in))  # fmt: skip

    def write_outputs(self, cfg, res: Resources, fitted, evaluation, run_dir: Path) -> list[Output]:  # type: ignore[override]
        from samadapt.reports.classification_run import classification_figures

        y, probs, splits, idx_test, probs_test, test_in = evaluation.payload
        outputs = [Output(c, p) for c, p in classification_figures(
            run_dir, y_true=y, probs=probs, splits=splits, class_names=res.class_names)]  # fmt: skip
        spec = get_method(cfg.method)
        if spec.input != "plain":
            shown = gallery(run_dir, cfg.method, spec.input, res, idx_test[:8], probs_test[:8],
                            res.dataset.labels[idx_test[:8]], test_in, cfg.options)  # fmt: skip
            outputs += [Output(c, p) for c, p in shown]
        return outputs

    def recorded(self, cfg: FewShotConfig, res: Resources) -> dict[str, Any]:  # type: ignore[override]
        masked = get_method(cfg.method).input != "plain"
        return {
            "class_names": list(res.class_names),
            "clip_identity": res.clip.identity(),
            "masker_identity": res.masker.cache_key_fields() if masked and res.masker is not None else None,
        }

    def describe(self, cfg: FewShotConfig, evaluation: Evaluation) -> list[str]:  # type: ignore[override]
        spec = get_method(cfg.method)
        m = evaluation.metrics
        notes = [
            f"method {cfg.method}: {spec.description}; CLIP {m['clip']} "
            f"({'weights ' + str(cfg.clip_checkpoint) if cfg.clip_checkpoint else 'RANDOM weights'}, "
            f"QuickGELU {'on' if m['quick_gelu'] else 'off'})",
            f"data fraction {cfg.data_fraction:g}, seed {cfg.seed}; prompt template {cfg.prompt_template!r}",
        ]
        if spec.input != "plain":
            notes.append(
                f"SAM 2 masker {cfg.masker}: {m['mean_masks_per_image']:.1f} masks per image on average, "
                f"{m['images_without_masks']} images without any mask (those are used unchanged)."
            )
        return notes

    def protocol(self, cfg: FewShotConfig) -> list[dict[str, str]]:  # type: ignore[override]
        """Where this run's method differs from its reference (README, "Reference protocols")."""
        o = cfg.options
        rows: list[dict[str, str]] = []

        def row(setting: str, reference: str, ours: str, why: str) -> None:
            rows.append({"setting": setting, "reference": reference, "this run": ours, "why": why})

        if o.val_budget != "few-shot":
            row("validation budget", "at most min(K, 4) images per class", "the full validation split",
                "asked for with --val-budget full (more labels than the budget)")  # fmt: skip
        family = get_method(cfg.method).family
        if cfg.method.startswith("tip-adapter"):
            if o.aug_views != 10:
                row(
                    "cache views",
                    "mean of 10 augmented views",
                    f"{o.aug_views} views",
                    "chosen with --aug-views",
                )
            row("alpha/beta search", "200 x 20 grid on a few-shot validation set",
                f"{o.tip_search_steps[0]} x {o.tip_search_steps[1]} up to beta {o.tip_search_scale[0]:g}, alpha "
                f"{o.tip_search_scale[1]:g}", "grid ranges of the reference's ImageNet config")  # fmt: skip
            if cfg.method == "tip-adapter-f":
                row("fine-tuning views", "fresh augmented views every epoch", "views cycled: epoch e uses view e % V",
                    "frozen-CLIP features of a view are computed once")  # fmt: skip
        if family == "coop":
            if o.coop_schedule != "by-shots" or o.coop_select != "last":
                row("CoOp epochs", "200 at 16 shots, 100 at 4-8, 50 at 1-2, last epoch kept",
                    f"{o.coop_schedule}, {o.coop_select} epoch", "chosen by the user")  # fmt: skip
            row("CoOp augmentation", "random crop (scale 0.08-1) + flip", "random crop (scale 0.5-1) + flip, views "
                "cycled", "the frozen-CLIP features of a view are computed once")  # fmt: skip
        if cfg.method == "clip-adapter":
            row("CLIP-Adapter optimiser", "not in the reference repository", "SGD 2e-3, cosine, batch 32",
                "CoOp's recipe (unverified for CLIP-Adapter)")  # fmt: skip
        if cfg.method == "medfocus-attn":
            if o.attn_mode != "falip":
                row("attention bias", "FALIP: +[0, 0.2] Gaussian in the CLS row, last 4 of 12 blocks",
                    f"{o.attn_mode}: -{o.attn_strength:g} outside the masks", "the earlier strong variant")  # fmt: skip
            row("training", "FALIP is training-free", "the CLIP image tower is fine-tuned (MedFocusCLIP)",
                "MedFocusCLIP trains CLIP on the few-shot data")  # fmt: skip
        if cfg.method == "medfocus" and (cfg.points_per_side != 32 or cfg.pred_iou_thresh != 0.8):
            row("SAM 2 masks", "official generator settings (32 points, 0.8 / 0.95)",
                f"{cfg.points_per_side} points, {cfg.pred_iou_thresh:g} / {cfg.stability_score_thresh:g}",
                "chosen by the user")  # fmt: skip
        return rows

    def export_models(self, cfg: FewShotConfig, recorded: dict[str, Any], *, run: Path, checkpoints) -> tuple:  # type: ignore[override]
        return _export_items(cfg, recorded, run=run, checkpoints=checkpoints)

    # ---- predict --------------------------------------------------------------------------------------------
    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
        parser.add_argument("--clip-checkpoint", default=None, help="CLIP weights, if moved since training")
        parser.add_argument(
            "--masker-checkpoint", default=None, help="SAM 2 weights, if moved since training"
        )

    def checkpoints(self, cfg: FewShotConfig, recorded: dict[str, Any]) -> list:  # type: ignore[override]
        found = [
            ("clip", cfg.clip_checkpoint, (recorded.get("clip_identity") or {}).get("clip_checkpoint_sha256"))
        ]
        if get_method(cfg.method).input != "plain":
            mident = recorded.get("masker_identity") or {}
            found.append(("masker", cfg.masker_checkpoint, mident.get("checkpoint_sha256")))
        return found

    def predict(self, cfg, recorded, *, run: Path, args: argparse.Namespace, progress: bool) -> Path:  # type: ignore[override]
        from samadapt.tasks.fewshot.predict import predict_images

        return predict_images(
            cfg=cfg, recorded=recorded, run=run, images=list(args.images), out=Path(args.out),
            clip_checkpoint=args.checkpoints.get("clip"), masker_checkpoint=args.checkpoints.get("masker"),
            device=args.device or cfg.device or "cpu", progress=progress,
        )  # fmt: skip


def _export_items(cfg, recorded, *, run, checkpoints):
    from samadapt.tasks.fewshot.export import export_items

    return export_items(cfg, recorded, run=run, clip_checkpoint=checkpoints.get("clip"))


def _identity(res: Resources) -> dict[str, Any]:
    return {k: v for k, v in res.clip.identity().items() if k != "clip_checkpoint"}
