"""`SegmentTask`: prompt-free heads on a frozen SAM-family encoder (AutoSAM, CNN, linear) and the U-Net baseline.

Run folder (besides the engine's common files): splits.json, per_volume.csv, overlays.png. predictions.csv holds one
row per evaluated volume (Dice and HD95 per structure).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

from samadapt.engine.task import Evaluation, Fitted, Output, RunContext, Task
from samadapt.tasks.segment.config import METHODS, PRESETS, SegmentConfig, default_encoder_size
from samadapt.tasks.segment.heads import EMBEDDING_HEADS
from samadapt.tasks.segment.train import SegPrepared, evaluate_head, fit_head, prepare


class SegmentTask(Task):
    name = "segment"
    Config = SegmentConfig
    methods = METHODS
    budget_field = "train_volumes"
    headline_metrics = ("dice_mean", "hd95_mean")
    presets = PRESETS
    sweep_defaults: ClassVar[dict[str, Any]] = {
        "method": list(METHODS), "train_volumes": ["1", "2", "5", "all"], "seed": [0],
    }  # fmt: skip
    prepare_fields = (
        "data", "label_names", "splits", "split_seed", "encoder", "checkpoint", "encoder_arch", "encoder_image_size",
        "precision", "store",
    )  # fmt: skip

    def prepare(self, cfg: SegmentConfig, *, progress: bool) -> SegPrepared:  # type: ignore[override]
        return prepare(cfg, progress=progress)

    def fit(self, cfg: SegmentConfig, prepared: SegPrepared, run: RunContext) -> Fitted:  # type: ignore[override]
        head = fit_head(cfg, prepared, resume_dir=run.resume_dir, resume=run.resume, progress=run.progress)
        result = head.result
        return Fitted(weights=head.model.state_dict(), model=head, history=result.history,
                      best_epoch=result.best_epoch, info={"epochs_run": len(result.history)})  # fmt: skip

    def evaluate(self, cfg: SegmentConfig, prepared: SegPrepared, fitted: Fitted) -> Evaluation:  # type: ignore[override]
        metrics, rows, predictions = evaluate_head(cfg, prepared, fitted.model)
        return Evaluation(metrics=metrics, predictions=rows, payload=predictions)

    def budget_value(self, metrics: dict[str, Any], cfg: SegmentConfig) -> Any:  # type: ignore[override]
        return metrics.get("train_volumes")

    def sweep_skip(self, cfg: SegmentConfig) -> str | None:  # type: ignore[override]
        from samadapt.engine.lifecycle import prepared_for

        available = len(prepared_for(self, cfg).splits["train"])
        if cfg.train_volumes is not None and cfg.train_volumes > available:
            return f"the split has {available} training patients"
        return None

    def write_outputs(self, cfg, prepared: SegPrepared, fitted, evaluation, run_dir: Path) -> list[Output]:  # type: ignore[override]
        from samadapt.reports.tables import write_csv_rows
        from samadapt.tasks.segment.report import plot_overlays
        from samadapt.utils.atomic import atomic_write_json

        atomic_write_json(run_dir / "splits.json", {**prepared.splits, "train_used": fitted.model.train_patients,
                                                    "split_seed": cfg.split_seed})  # fmt: skip
        write_csv_rows(run_dir / "per_volume.csv", evaluation.predictions)
        outputs = [Output("Per volume (Dice, HD95 in mm)", rows=evaluation.predictions)]
        test = prepared.test
        if test.volumes:
            path = plot_overlays(run_dir / "overlays.png", volumes=test.volumes, predictions=evaluation.payload["test"],
                                 case_ids=[c.id for c in test.cases], label_names=prepared.dataset.label_names)  # fmt: skip
            outputs.insert(0, Output("test slices: image, ground truth, prediction", path))
        return outputs

    def recorded(self, cfg: SegmentConfig, prepared: SegPrepared) -> dict[str, Any]:  # type: ignore[override]
        uses_encoder = cfg.method in EMBEDDING_HEADS
        encoder = prepared.encoder() if uses_encoder else None
        return {
            "num_classes": prepared.num_classes,
            "label_names": list(prepared.dataset.label_names),
            "layout": prepared.dataset.layout,
            "checkpoint_sha256": encoder.checkpoint_sha256 if encoder is not None else None,
            "encoder_fields": encoder.cache_key_fields() if encoder is not None else None,
            "embedding_shape": list(prepared.table("val").shape[1:]) if encoder is not None else None,
            "intensity_window": "per-volume 0.5-99.5 percentile clip, min-max to uint8",
        }

    def describe(self, cfg: SegmentConfig, evaluation: Evaluation) -> list[str]:  # type: ignore[override]
        m = evaluation.metrics
        on = "" if cfg.method == "unet" else f" on {cfg.encoder} at {cfg.encoder_size} px"
        return [
            f"{cfg.method} head{on}; {m['train_volumes']} training patients ({m['train_slices']} slices), "
            f"{m['head_parameters']:,} trainable parameters; split seed {cfg.split_seed}, seed {cfg.seed}.",
            "Dice and HD95 per patient volume at the volume's voxel spacing; HD95 of a structure missed entirely "
            "is the volume diagonal.",
        ]

    def protocol(self, cfg: SegmentConfig) -> list[dict[str, str]]:  # type: ignore[override]
        rows = []
        own = default_encoder_size(cfg.encoder)
        if cfg.method in EMBEDDING_HEADS and cfg.encoder_size != own:
            rows.append({"setting": "encoder_image_size", "reference": str(own), "this run": str(cfg.encoder_size),
                         "why": "smaller encoder input for speed: a coarser embedding grid"})  # fmt: skip
        if cfg.method == "unet" and cfg.unet_image_size != 224:
            rows.append({"setting": "unet_image_size", "reference": "224", "this run": str(cfg.unet_image_size),
                         "why": "chosen by the user"})  # fmt: skip
        where = (
            "online, every batch"
            if cfg.online_encoder or cfg.method == "unet"
            else f"{cfg.aug_views} cached views"
        )
        if cfg.augment != "reference" or not (cfg.online_encoder or cfg.method == "unet"):
            rows.append({"setting": "augmentation", "reference": "every iteration: brightness, gamma, noise, "
                         "mirroring, elastic, scale 0.5-1.9", "this run": f"{cfg.augment}, {where} (+ the slice as is)",
                         "why": "cached views: the encoder never runs inside an epoch (--online-encoder for every "
                         "iteration)" if cfg.augment == "reference" else "chosen with --augment"})  # fmt: skip
        if cfg.method == "autosam" and (cfg.mask_tokens_per_class != 2 or cfg.learn_iou_token):
            rows.append({"setting": "AutoSAM tokens", "reference": "2 mask tokens per class, IoU tokens frozen",
                         "this run": f"{cfg.mask_tokens_per_class} mask tokens, IoU tokens "
                         f"{'trained' if cfg.learn_iou_token else 'frozen'}", "why": "chosen by the user"})  # fmt: skip
        rows.append({"setting": "HD95", "reference": "medpy, pixels on the 224 grid, 0 when a side is empty",
                     "this run": "MONAI, mm at the volume spacing, the diagonal when one side is empty",
                     "why": "physical units; a missed structure is not scored as perfect"})  # fmt: skip
        return rows

    # ---- predict --------------------------------------------------------------------------------------------
    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input", type=Path, required=True, help="VOLUME.nii.gz (or .nii), or a DICOM series folder"
        )
        parser.add_argument(
            "--output-format", choices=("nifti", "dicom-seg"), default=None,
            help="nifti (default) or dicom-seg (a DICOM-SEG referencing the input series; default for a .dcm --out)",
        )  # fmt: skip

    def checkpoints(self, cfg: SegmentConfig, recorded: dict[str, Any]) -> list:  # type: ignore[override]
        if cfg.method not in EMBEDDING_HEADS:
            return []
        return [("encoder", cfg.checkpoint, recorded.get("checkpoint_sha256"))]

    def predict(self, cfg, recorded, *, run: Path, args: argparse.Namespace, progress: bool) -> Path:  # type: ignore[override]
        from samadapt.tasks.segment.predict import predict_file

        return predict_file(cfg, recorded, run=run, source=args.input, out=args.out, output_format=args.output_format,
                            checkpoint=args.checkpoints.get("encoder"), device=args.device or "cpu")  # fmt: skip

    # ---- export ---------------------------------------------------------------------------------------------
    def export_encoder(self, cfg: SegmentConfig, recorded: dict[str, Any], *, checkpoint: str | None) -> Any:  # type: ignore[override]
        if cfg.method not in EMBEDDING_HEADS:
            return None
        return cfg.replace(checkpoint=checkpoint, encoder_image_size=cfg.encoder_size).load_encoder(
            "cpu", precision="fp32"
        )

    def export_models(self, cfg: SegmentConfig, recorded: dict[str, Any], *, run: Path, checkpoints) -> tuple:  # type: ignore[override]
        from samadapt.tasks.segment.export import export_items

        return export_items(cfg, recorded, run=run)
