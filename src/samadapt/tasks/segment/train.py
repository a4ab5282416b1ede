"""Train one segmentation head on labelled volumes and evaluate it per patient volume (Dice, HD95 in mm).

Run folder: config.yaml (everything `predict` needs), head.safetensors, metrics.json, per_volume.csv,
history.csv, splits.json, training_curves.png, overlays.png, report.html.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from samadapt.data.volumes import VolumeDataset, read_splits_file, read_volumes, split_patients
from samadapt.errors import ConfigError
from samadapt.evaluation.segmentation import summarize, volume_scores
from samadapt.tasks.segment.heads import CHECKPOINT_INIT, EMBEDDING_HEADS, build_head, count_parameters
from samadapt.tasks.segment.inference import predict_volume
from samadapt.tasks.segment.slices import (
    ImageList,
    SliceSet,
    augment_pair,
    augmented_views,
    build_slices,
    image_tensor,
    loss_grid,
    resize_label,
)
from samadapt.training.config import save_run_config
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.loop import fit
from samadapt.training.resume import clear_resume, resume_dir, start_run
from samadapt.training.seed import seed_everything
from samadapt.training.weights import save_weights
from samadapt.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


def default_store() -> Path:
    return Path(os.environ.get("SAMADAPT_STORE", Path.home() / ".cache" / "samadapt" / "store"))


def make_loss() -> torch.nn.Module:
    from monai.losses import DiceCELoss

    # Cross-entropy over all classes + soft Dice over the foreground classes, Dice pooled over the batch.
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


def _logits_at(head: torch.nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    logits = head(x)
    if logits.shape[-1] != size:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits


def _collate_online(items: list[tuple[Any, torch.Tensor]]) -> tuple[list[np.ndarray], torch.Tensor]:
    """Online encoding: keep the raw square slices as a list (volumes differ in size), stack the targets."""
    return [x.numpy() for x, _ in items], torch.stack([y for _, y in items])


class TrainSlices(Dataset):
    """One item per training slice: (head input, target at the loss grid), drawn as described in slices.py."""

    def __init__(
        self,
        *,
        mode: str,  # "cached" (embeddings of stored views), "pixels" (U-Net), "online" (encode every batch)
        slices: SliceSet,
        image_size: int,
        aug_views: int,
        view_rows: list[list[int]] | None = None,
        view_labels: list[np.ndarray] | None = None,
        table: Any = None,
    ) -> None:
        self.mode, self.slices, self.image_size, self.aug_views = mode, slices, image_size, aug_views
        self.view_rows, self.view_labels, self.table = view_rows, view_labels, table
        self.grid = loss_grid(image_size)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if self.mode == "cached":
            rows = self.view_rows[i]
            r = rows[int(torch.randint(len(rows), (1,)))]
            return torch.from_numpy(self.table[r]), resize_label(self.view_labels[r], self.grid)
        image, label = self.slices.images[i], self.slices.labels[i]
        # Same mix as the cached views: the slice as is with probability 1 / (aug_views + 1).
        if self.aug_views and int(torch.randint(self.aug_views + 1, (1,))) > 0:
            image, label = augment_pair(image, label, np.random.default_rng(int(torch.randint(2**31, (1,)))))
        target = resize_label(label, self.grid)
        if self.mode == "pixels":
            return image_tensor([image], self.image_size)[0], target
        return torch.from_numpy(image), target


def _resolve_splits(dataset: VolumeDataset, *, seed: int, splits_file: Path | None) -> dict[str, list[str]]:
    if splits_file is not None:
        return read_splits_file(Path(splits_file), dataset)
    auto = dataset.root / "splits.json"
    if auto.is_file():
        return read_splits_file(auto, dataset)
    return split_patients(dataset.patients, seed=seed)


def training_patients(
    dataset: VolumeDataset, *, seed: int, splits_file: str | Path | None = None
) -> list[str]:
    """The training patients `run_segmentation` draws `--train-volumes` from, for this data and seed."""
    return _resolve_splits(dataset, seed=seed, splits_file=Path(splits_file) if splits_file else None)[
        "train"
    ]


def run_segmentation(
    *,
    data: str | Path,
    head: str,
    out: str | Path,
    encoder: str = "sam_vit_b",
    checkpoint: str | Path | None = None,
    encoder_arch: str | None = None,
    precision: str = "fp32",
    image_size: int = 1024,
    train_volumes: int | None = None,
    epochs: int = 120,
    batch_size: int = 4,
    lr: float = 5e-4,
    patience: int = 30,
    aug_views: int = 2,
    online_encoder: bool = False,
    seed: int = 0,
    label_names: list[str] | None = None,
    splits_file: str | Path | None = None,
    store: str | Path | None = None,
    unet_channels: tuple[int, ...] = (32, 64, 128, 256, 512),
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `head` on `data` and write the run folder `out`; returns the metrics dict written to metrics.json.

    Training state is saved in RUN/.resume after every epoch; `resume` continues an interrupted run from it.
    """
    start = time.perf_counter()
    out = Path(out)
    fingerprint = {
        "data": str(Path(data).resolve()), "head": head, "encoder": encoder, "encoder_arch": encoder_arch,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "precision": precision,
        "image_size": image_size, "train_volumes": train_volumes, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "patience": patience, "aug_views": aug_views, "online_encoder": online_encoder, "seed": seed,
        "label_names": label_names, "splits_file": str(splits_file) if splits_file else None,
        "unet_channels": list(unet_channels),
    }  # fmt: skip
    if head not in ("autosam", "cnn", "linear", "unet"):
        raise ConfigError(f"unknown head {head!r}; choose autosam, cnn, linear or unet")
    if image_size % 16 or image_size < 64:
        raise ConfigError(f"--image-size must be a multiple of 16 and at least 64, got {image_size}")
    seed_everything(seed)
    dataset = read_volumes(data, label_names=label_names)
    splits = _resolve_splits(dataset, seed=seed, splits_file=Path(splits_file) if splits_file else None)
    available = len(splits["train"])
    if train_volumes is not None and not 1 <= train_volumes <= available:
        raise ConfigError(
            f"--train-volumes must be between 1 and {available} (training patients), got {train_volumes}"
        )
    train_patients = splits["train"][: train_volumes or available]
    train = build_slices(dataset.cases_of(train_patients))
    val = build_slices(dataset.cases_of(splits["val"]))
    test = build_slices(dataset.cases_of(splits["test"]))
    num_classes = dataset.num_classes
    for name, s in (("train", train), ("val", val), ("test", test)):
        top = max(int(lab.max()) for lab in s.labels) if len(s) else 0
        if top >= num_classes:
            raise ConfigError(
                f"{dataset.root}: {name} labels go up to {top} but {num_classes - 1} label names were given "
                f"({', '.join(dataset.label_names)}); pass --label-names"
            )
    start_run(out, resume=resume)  # the data read and checked: only now may an earlier run's outputs go
    grid = loss_grid(image_size)

    model = build_head(head, num_classes=num_classes, unet_channels=tuple(unet_channels))
    enc = None
    init_from: list[str] = []
    tables: dict[str, Any] = {}
    if head in EMBEDDING_HEADS:
        from samadapt.encoders import load_encoder
        from samadapt.store import embed_dataset

        enc = load_encoder(encoder, checkpoint, precision=precision, image_size=image_size, arch=encoder_arch)
        store_dir = Path(store) if store else default_store()
        if checkpoint is not None and head in CHECKPOINT_INIT:
            from samadapt.encoders.checkpoint import check_finite, load_state_dict_safely
            from samadapt.tasks.segment.autosam import load_sam_decoder_weights

            sam_state = load_state_dict_safely(checkpoint)
            # load_encoder checked image_encoder.* only; NaN/Inf decoder weights would train into a NaN loss.
            check_finite(sam_state, path=checkpoint)
            init_from = load_sam_decoder_weights(model, sam_state, source=str(checkpoint))
        elif head in CHECKPOINT_INIT:
            log.warning("no --checkpoint: the %s head starts from random decoder weights", head)
        for name, s in (("val", val), ("test", test)):
            tables[name] = embed_dataset(ImageList(s.images, s.ids), enc, store_dir, progress=progress)[
                "neck"
            ]
        if online_encoder:
            train_set = TrainSlices(mode="online", slices=train, image_size=image_size, aug_views=aug_views)
        else:
            images, labels, rows, ids = augmented_views(train, views=aug_views, seed=seed)
            table = embed_dataset(ImageList(images, ids), enc, store_dir, progress=progress)["neck"]
            train_set = TrainSlices(
                mode="cached", slices=train, image_size=image_size, aug_views=aug_views,
                view_rows=rows, view_labels=labels, table=table,
            )  # fmt: skip
    else:
        train_set = TrainSlices(mode="pixels", slices=train, image_size=image_size, aug_views=aug_views)

    def inputs_of(split: str, s: SliceSet, idx: np.ndarray) -> torch.Tensor:
        if head == "unet":
            return image_tensor([s.images[i] for i in idx], image_size)
        return torch.from_numpy(tables[split][idx])

    loss = make_loss()

    def loss_fn(module: torch.nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if head in EMBEDDING_HEADS and online_encoder:
            x = enc.embed(list(x), batch_size=len(x))  # uint8 squares; sides differ between volumes
        return loss(_logits_at(module, x, grid), y[:, None].long())

    val_targets = torch.stack([resize_label(lab, grid) for lab in val.labels]).long()

    def validate(module: torch.nn.Module) -> dict[str, float]:
        inter = np.zeros(num_classes)
        total = np.zeros(num_classes)
        losses = []
        for begin in range(0, len(val), 16):
            idx = np.arange(begin, min(begin + 16, len(val)))
            logits = _logits_at(module, inputs_of("val", val, idx), grid)
            y = val_targets[idx]
            losses.append(float(loss(logits, y[:, None])) * len(idx))
            pred = logits.argmax(1)
            for c in range(1, num_classes):
                inter[c] += float(((pred == c) & (y == c)).sum())
                total[c] += float((pred == c).sum() + (y == c).sum())
        dice = [2 * inter[c] / total[c] for c in range(1, num_classes) if total[c] > 0]
        return {"loss": sum(losses) / max(1, len(val)), "dice": float(np.mean(dice)) if dice else 0.0}

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=False,
        collate_fn=_collate_online if train_set.mode == "online" else None,
    )
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=lr)
    result = fit(
        model=model,
        train_loader=loader,
        loss_fn=loss_fn,
        validate=validate,
        optimizer=optimizer,
        epochs=epochs,
        stopper=EarlyStopping(monitor="dice", mode="max", patience=patience),
        progress=progress,
        desc=f"train {head}",
        resume_dir=resume_dir(out),
        resume=resume,
        fingerprint=fingerprint,
    )

    # Per-volume evaluation at each volume's own grid and spacing.
    metrics: dict[str, Any] = {}
    per_volume_rows: list[dict[str, Any]] = []
    predictions: dict[str, list[np.ndarray]] = {}
    for split, s in (("val", val), ("test", test)):
        per_volume = []
        predictions[split] = []
        for ci, (case, volume) in enumerate(zip(s.cases, s.volumes)):
            idx = np.array([i for i, c in enumerate(s.case_index) if c == ci])
            pred = predict_volume(
                model, head_name=head, volume=volume, image_size=image_size, inputs=inputs_of(split, s, idx)
            )
            predictions[split].append(pred)
            dice, hd95 = volume_scores(pred, volume.label, spacing=volume.spacing, num_classes=num_classes)
            per_volume.append({"dice": dice, "hd95": hd95})
            row = {"split": split, "case": case.id, "patient": case.patient}
            row.update({f"dice_{n}": float(d) for n, d in zip(dataset.label_names, dice)})
            row.update({f"hd95_{n}": float(h) for n, h in zip(dataset.label_names, hd95)})
            per_volume_rows.append(row)
        metrics[split] = summarize(per_volume, dataset.label_names)

    metrics.update(
        {
            "head": head,
            "encoder": None if head == "unet" else encoder,
            "train_volumes": len(train_patients),
            "train_slices": len(train),
            "label_names": list(dataset.label_names),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "best_val": result.best_val,
            "head_parameters": count_parameters(model),
            "initialised_from_checkpoint": len(init_from),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    config = {
        "task": "segment",
        "head": head,
        "encoder": encoder,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "encoder_arch": encoder_arch,
        "precision": precision,
        "image_size": image_size,
        "num_classes": num_classes,
        "label_names": list(dataset.label_names),
        "unet_channels": list(unet_channels),
        "data": str(Path(data).resolve()),
        "layout": dataset.layout,
        "train_volumes": len(train_patients),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "aug_views": aug_views,
        "online_encoder": online_encoder,
        "seed": seed,
        "intensity_window": "per-volume 0.5-99.5 percentile clip, min-max to uint8",
    }
    _write_run(out, model=model, config=config, metrics=metrics, splits=splits, train_patients=train_patients,
               history=result.history, best_epoch=result.best_epoch, rows=per_volume_rows, test=test,
               test_predictions=predictions["test"], label_names=dataset.label_names)  # fmt: skip
    clear_resume(out)  # metrics.json is written: the run is complete
    return metrics


def _write_run(
    out: Path,
    *,
    model: torch.nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    splits: dict[str, list[str]],
    train_patients: list[str],
    history: list[dict[str, float]],
    best_epoch: int,
    rows: list[dict[str, Any]],
    test: SliceSet,
    test_predictions: list[np.ndarray],
    label_names: tuple[str, ...],
) -> None:
    from samadapt.reports.curves import plot_training_curves
    from samadapt.reports.html import write_html_report
    from samadapt.reports.tables import write_csv_rows
    from samadapt.tasks.segment.report import plot_overlays

    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "head.safetensors", model.state_dict(), metadata={"head": config["head"]})
    save_run_config(out / "config.yaml", config)
    atomic_write_json(out / "splits.json", {**splits, "train_used": train_patients})
    write_csv_rows(out / "per_volume.csv", rows)
    write_csv_rows(out / "history.csv", history)
    figures = []
    if history:
        figures.append(("training curves", plot_training_curves(out / "training_curves.png", history=history,
                                                                best_epoch=best_epoch)))  # fmt: skip
    if test.volumes:
        figures.append(("test slices: image, ground truth, prediction",
                        plot_overlays(out / "overlays.png", volumes=test.volumes, predictions=test_predictions,
                                      case_ids=[c.id for c in test.cases], label_names=label_names)))  # fmt: skip
    atomic_write_json(out / "metrics.json", metrics)
    summary = {split: {"dice_mean": metrics[split]["dice_mean"], "hd95_mean": metrics[split]["hd95_mean"],
                       **{f"dice_{k}": v for k, v in metrics[split]["dice"].items()},
                       **{f"hd95_{k}": v for k, v in metrics[split]["hd95"].items()}} for split in ("val", "test")}  # fmt: skip
    write_html_report(
        out / "report.html",
        title=f"Segmentation: {config['head']} head"
        + ("" if config["head"] == "unet" else f" on {config['encoder']}"),
        summary=summary,
        tables=[("Per volume (Dice, HD95 in mm)", rows)],
        figures=figures,
        notes=[
            f"{metrics['train_volumes']} training patients ({metrics['train_slices']} slices), best epoch "
            f"{best_epoch}, {metrics['head_parameters']:,} trainable parameters.",
            "Dice and HD95 per patient volume at the volume's voxel spacing; HD95 of a structure missed entirely "
            "is the volume diagonal.",
        ],
    )
