"""`ClassifyTask`: SLCA classification, the backbone baseline and the linear probe, for the engine.

Data flow: readers -> embedding store (SAM runs once per image) -> `prepare` -> `train` (shared loop) -> evaluation;
the engine writes the run folder. `predict.py` serves `samadapt predict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from samadapt.engine.task import Evaluation, Fitted, Output, RunContext, Task
from samadapt.tasks.classify.config import METHODS, PRESETS, ClassifyConfig
from samadapt.tasks.classify.prepare import Prepared, prepare

CLASSIFICATION_METRICS = ("accuracy", "auc", "balanced_accuracy", "f1_macro")


class ClassifyTask(Task):
    name = "classify"
    Config = ClassifyConfig
    methods = METHODS
    budget_field = "label_fraction"
    headline_metrics = CLASSIFICATION_METRICS
    presets = PRESETS
    sweep_defaults: ClassVar[dict[str, Any]] = {
        "method": list(METHODS), "label_fraction": [0.01, 0.05, 0.1, 0.25, 1.0], "seed": 3,
    }  # fmt: skip
    supports_ddp = True
    prepare_fields = (
        "data", "val_fraction", "test_fraction", "encoder", "checkpoint", "encoder_arch", "encoder_image_size",
        "precision", "sam_feature", "store",
    )  # fmt: skip

    def prepare(self, cfg: ClassifyConfig, *, progress: bool) -> Prepared:  # type: ignore[override]
        return prepare(cfg, progress=progress)

    def fit(self, cfg: ClassifyConfig, prepared: Prepared, run: RunContext) -> Fitted:  # type: ignore[override]
        from samadapt.tasks.classify.train import fit_probe, train_indices, train_network
        from samadapt.training import DistContext

        idx_train = train_indices(cfg, prepared)
        if cfg.method == "linear-probe":
            weights, info = fit_probe(cfg, prepared, idx_train)
            return Fitted(weights=weights, model=None, info={**info, "n_train": int(len(idx_train))})
        network = train_network(
            cfg, prepared, idx_train, ctx=run.dist or DistContext(), progress=run.progress and run.is_main,
            resume_dir=run.resume_dir, resume=run.resume,
        )  # fmt: skip
        result = network.result
        info = {
            "n_train": int(len(idx_train)),
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 2),
            "world_size": run.dist.world_size if run.dist is not None else 1,
        }
        return Fitted(weights=result.best_state, model=network, history=result.history,
                      best_epoch=result.best_epoch, info=info)  # fmt: skip

    def evaluate(self, cfg: ClassifyConfig, prepared: Prepared, fitted: Fitted) -> Evaluation:  # type: ignore[override]
        from samadapt.evaluation.classification import classification_metrics
        from samadapt.reports.predictions import prediction_rows
        from samadapt.tasks.classify.train import probe_probs

        idx_val, idx_test = prepared.split["val"], prepared.split["test"]
        eval_idx = np.concatenate([idx_val, idx_test])
        probs = (
            probe_probs(prepared, fitted.weights, eval_idx)
            if fitted.model is None
            else fitted.model.probs(eval_idx)
        )
        y = prepared.labels[eval_idx]
        n_val = len(idx_val)
        metrics = {
            "val": classification_metrics(y_true=y[:n_val], probs=probs[:n_val]),
            "test": classification_metrics(y_true=y[n_val:], probs=probs[n_val:]),
            "n_val": n_val,
            "n_test": int(len(idx_test)),
            "label_fraction": cfg.label_fraction,
            "backbone": cfg.backbone if cfg.method != "linear-probe" else None,
            "encoder": cfg.encoder if cfg.method != "baseline" else None,
            "encoder_weights": cfg.checkpoint or f"random ({cfg.encoder_arch or 'default'} arch)",
            "world_size": 1,
        }
        splits = ["val"] * n_val + ["test"] * len(idx_test)
        rows = prediction_rows(ids=[prepared.dataset.ids[i] for i in eval_idx], probs=probs,
                               class_names=prepared.class_names, y_true=y, split=splits)  # fmt: skip
        return Evaluation(metrics=metrics, predictions=rows, payload=(y, probs, splits))

    def write_outputs(self, cfg, prepared, fitted, evaluation, run_dir: Path) -> list[Output]:  # type: ignore[override]
        from samadapt.reports.classification_run import classification_figures

        y, probs, splits = evaluation.payload
        return [Output(caption, path) for caption, path in classification_figures(
            run_dir, y_true=y, probs=probs, splits=splits, class_names=prepared.class_names)]  # fmt: skip

    def recorded(self, cfg: ClassifyConfig, prepared: Prepared) -> dict[str, Any]:  # type: ignore[override]
        uses_sam = cfg.method != "baseline"
        return {
            "class_names": list(prepared.class_names),
            "encoder_fields": prepared.encoder_fields if uses_sam else None,
            "checkpoint_sha256": prepared.checkpoint_sha256 if uses_sam else None,
            "embedding_shape": list(prepared.embeddings.shape[1:])
            if uses_sam
            else None,  # [C, h, w] per image
        }

    def describe(self, cfg: ClassifyConfig, evaluation: Evaluation) -> list[str]:  # type: ignore[override]
        m = evaluation.metrics
        notes = [
            f"method {cfg.method}; encoder {cfg.encoder} ({cfg.checkpoint or 'RANDOM weights'}); backbone "
            f"{cfg.backbone} ({'weights ' + cfg.backbone_weights if cfg.backbone_weights else 'random init'})",
            f"training images: label fraction {cfg.label_fraction:g}, seed {cfg.seed}; validation {m['n_val']}, "
            f"test {m['n_test']}",
        ]
        if not cfg.checkpoint and cfg.method != "baseline":
            notes.append(
                "The SAM encoder has RANDOM weights (no checkpoint given): results do not reflect real SAM."
            )
        return notes

    def protocol(self, cfg: ClassifyConfig) -> list[dict[str, str]]:  # type: ignore[override]
        rows = [{"setting": "SLCA internals", "reference": "not published (arXiv 2505.06217)",
                 "this run": f"k={cfg.slca_window}, r={cfg.slca_reduction}, {cfg.slca_pooling}, {cfg.slca_mode}, "
                             f"stages {cfg.slca_stages}, SAM {cfg.sam_feature}",
                 "why": "our explicit reading of the method; every choice is a flag"}]  # fmt: skip
        size = cfg.encoder_image_size or 1024
        if size != 1024:
            rows.append({"setting": "encoder_image_size", "reference": "1024", "this run": str(size),
                         "why": "smaller SAM input for speed: coarser SAM grid"})  # fmt: skip
        return rows

    # ---- predict --------------------------------------------------------------------------------------------
    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
        parser.add_argument(
            "--store", default=None, help="embedding store directory (default OUT/embeddings)"
        )

    def checkpoints(self, cfg: ClassifyConfig, recorded: dict[str, Any]) -> list:  # type: ignore[override]
        if cfg.method == "baseline":
            return []
        return [("encoder", cfg.checkpoint, recorded.get("checkpoint_sha256"))]

    def predict(self, cfg, recorded, *, run: Path, args: argparse.Namespace, progress: bool) -> Path:  # type: ignore[override]
        from samadapt.tasks.classify.predict import predict_images

        return predict_images(
            cfg=cfg, recorded=recorded, run=run, images=list(args.images), out=Path(args.out), store=args.store,
            device=args.device, checkpoint=args.checkpoints.get("encoder"), progress=progress,
        )  # fmt: skip

    # ---- export ---------------------------------------------------------------------------------------------
    def export_encoder(self, cfg: ClassifyConfig, recorded: dict[str, Any], *, checkpoint: str | None) -> Any:  # type: ignore[override]
        if cfg.method == "baseline":
            return None
        return cfg.replace(checkpoint=checkpoint).load_encoder("cpu", precision="fp32")

    def export_models(
        self, cfg: ClassifyConfig, recorded: dict[str, Any], *, run: Path, checkpoints
    ) -> tuple:  # type: ignore[override]
        from samadapt.tasks.classify.export import export_items

        return export_items(cfg, recorded, run=run, checkpoint=checkpoints.get("encoder"))
