"""Segmentation heads on labelled volumes: prepare (volumes, fixed patient split, cached embeddings), fit one head,
evaluate per patient volume (Dice, HD95 in mm). `SegmentTask` (task.py) calls these for the engine.

The patient split comes from `split_seed` only, so every training seed and method of a sweep is tested on the same
patients; `seed` picks the training patients (nested: for one seed a smaller subset lies inside a larger one) and
the initialisation and augmentation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from samadapt.data.volumes import (
    VolumeDataset,
    patient_splits,
    read_splits_file,
    read_volumes,
    training_subset,
)
from samadapt.errors import ConfigError, DataError
from samadapt.evaluation.segmentation import summarize, volume_scores
from samadapt.tasks.segment.augment import get_augmentation
from samadapt.tasks.segment.config import SegmentConfig, default_encoder_size
from samadapt.tasks.segment.heads import CHECKPOINT_INIT, EMBEDDING_HEADS, build_head, count_parameters
from samadapt.tasks.segment.inference import predict_volume
from samadapt.tasks.segment.slices import (
    ImageList,
    SliceSet,
    augmented_views,
    build_slices,
    image_tensor,
    loss_grid,
    resize_label,
)
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.loop import fit
from samadapt.training.seed import seed_everything

log = logging.getLogger(__name__)


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
        augment: Any = None,
        view_rows: list[list[int]] | None = None,
        view_labels: list[np.ndarray] | None = None,
        table: Any = None,
    ) -> None:
        self.mode, self.slices, self.image_size, self.aug_views = mode, slices, image_size, aug_views
        self.augment = augment
        self.view_rows, self.view_labels, self.table = view_rows, view_labels, table
        self.grid = loss_grid(image_size)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if self.mode == "cached":
            rows = self.view_rows[i]
            r = rows[int(torch.randint(len(rows), (1,)))]
            return torch.from_numpy(np.asarray(self.table[r], dtype=np.float32)), resize_label(
                self.view_labels[r], self.grid
            )
        image, label = self.slices.images[i], self.slices.labels[i]
        # Same mix as the cached views: the slice as is with probability 1 / (aug_views + 1).
        if self.augment is not None and self.aug_views and int(torch.randint(self.aug_views + 1, (1,))) > 0:
            image, label = self.augment(image, label, np.random.default_rng(int(torch.randint(2**31, (1,)))))
        target = resize_label(label, self.grid)
        if self.mode == "pixels":
            return image_tensor([image], self.image_size)[0], target
        return torch.from_numpy(image), target


def resolve_splits(
    dataset: VolumeDataset, *, split_seed: int, splits_file: str | Path | None
) -> dict[str, list[str]]:
    """--splits FILE, else the data folder's splits.json, else a 70/15/15 patient split seeded by `split_seed`."""
    if splits_file is not None:
        return read_splits_file(Path(splits_file), dataset)
    auto = dataset.root / "splits.json"
    if auto.is_file():
        return read_splits_file(auto, dataset)
    return patient_splits(dataset.patients, split_seed=split_seed)


@dataclass
class SegPrepared:
    """Volumes, the fixed patient split, val/test slices and (lazily) their cached embeddings."""

    cfg: SegmentConfig
    dataset: VolumeDataset
    splits: dict[str, list[str]]
    val: SliceSet
    test: SliceSet
    progress: bool = True
    _encoder: Any = None
    _tables: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self.cfg.replace(encoder_image_size=self.cfg.encoder_size).load_encoder(
                self.cfg.device or "cpu"
            )
        return self._encoder

    def table(self, split: str) -> Any:
        """The encoder's embeddings of the val or test slices, from the store (encoded once)."""
        if split not in self._tables:
            from samadapt.store import embed_dataset

            s = self.val if split == "val" else self.test
            self._tables[split] = embed_dataset(
                ImageList(s.images, s.ids), self.encoder(), self.cfg.store_dir(), progress=self.progress
            )["neck"]
        return self._tables[split]


def prepare(cfg: SegmentConfig, *, progress: bool = True) -> SegPrepared:
    if not cfg.data:
        raise ConfigError("--data DIR is required")
    dataset = read_volumes(cfg.data, label_names=cfg.label_names)
    splits = resolve_splits(dataset, split_seed=cfg.split_seed, splits_file=cfg.splits)
    val = build_slices(dataset.cases_of(splits["val"]))
    test = build_slices(dataset.cases_of(splits["test"]))
    prepared = SegPrepared(cfg=cfg, dataset=dataset, splits=splits, val=val, test=test, progress=progress)
    _check_labels(prepared, [("val", val), ("test", test)])
    return prepared


def _check_labels(prepared: SegPrepared, sets: list[tuple[str, SliceSet]]) -> None:
    num_classes = prepared.num_classes
    for name, s in sets:
        top = max(int(lab.max()) for lab in s.labels) if len(s) else 0
        if top >= num_classes:
            raise ConfigError(
                f"{prepared.dataset.root}: {name} labels go up to {top} but {num_classes - 1} label names were "
                f"given ({', '.join(prepared.dataset.label_names)}); pass --label-names"
            )


@dataclass
class HeadFit:
    model: torch.nn.Module
    train_patients: list[str]
    train_slices: int
    initialised_from: list[str]
    result: Any


def fit_head(
    cfg: SegmentConfig, prepared: SegPrepared, *, resume_dir: Path, resume: bool, progress: bool
) -> HeadFit:
    head = cfg.method
    available = len(prepared.splits["train"])
    if cfg.train_volumes is not None and cfg.train_volumes > available:
        raise ConfigError(
            f"--train-volumes must be between 1 and {available} (training patients), got {cfg.train_volumes}"
        )
    if head in EMBEDDING_HEADS and cfg.encoder_size != default_encoder_size(cfg.encoder):
        log.info("%s head at encoder size %d (%s's own, AutoSAM's for SAM: %d): a coarser embedding grid", head,
                 cfg.encoder_size, cfg.encoder, default_encoder_size(cfg.encoder))  # fmt: skip
    seed_everything(cfg.seed)
    patients = training_subset(prepared.splits["train"], cfg.train_volumes or available, seed=cfg.seed)
    train = build_slices(prepared.dataset.cases_of(patients))
    if not len(train):
        raise DataError(f"{cfg.data}: the training patients {patients[:3]} hold no labelled slices")
    _check_labels(prepared, [("train", train)])
    size = cfg.input_size
    grid = loss_grid(size)
    num_classes = prepared.num_classes
    model = build_head(head, num_classes=num_classes, unet_channels=tuple(cfg.unet_channels),
                       mask_tokens_per_class=cfg.mask_tokens_per_class, learn_iou_token=cfg.learn_iou_token)  # fmt: skip
    augment = get_augmentation(cfg.augment) if cfg.augment != "none" else None
    init_from: list[str] = []
    enc = None
    if head in EMBEDDING_HEADS:
        from samadapt.store import embed_dataset

        enc = prepared.encoder()
        if cfg.checkpoint is not None and head in CHECKPOINT_INIT:
            from samadapt.encoders.checkpoint import check_finite, load_state_dict_safely
            from samadapt.tasks.segment.autosam import load_sam_decoder_weights

            sam_state = load_state_dict_safely(cfg.checkpoint)
            # load_encoder checked image_encoder.* only; NaN/Inf decoder weights would train into a NaN loss.
            check_finite(sam_state, path=cfg.checkpoint)
            init_from = load_sam_decoder_weights(model, sam_state, source=str(cfg.checkpoint))
        elif head in CHECKPOINT_INIT:
            log.warning("no --checkpoint: the %s head starts from random decoder weights", head)
        if cfg.online_encoder:
            train_set = TrainSlices(mode="online", slices=train, image_size=size, aug_views=cfg.aug_views,
                                    augment=augment)  # fmt: skip
        else:
            views = cfg.aug_views if augment is not None else 0
            images, labels, rows, ids = augmented_views(train, views=views, seed=cfg.seed, augment=augment)
            table = embed_dataset(ImageList(images, ids), enc, cfg.store_dir(), progress=progress)["neck"]
            train_set = TrainSlices(mode="cached", slices=train, image_size=size, aug_views=cfg.aug_views,
                                    view_rows=rows, view_labels=labels, table=table)  # fmt: skip
    else:
        train_set = TrainSlices(mode="pixels", slices=train, image_size=size, aug_views=cfg.aug_views,
                                augment=augment)  # fmt: skip

    loss = make_loss()

    def loss_fn(module: torch.nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if enc is not None and cfg.online_encoder:
            x = enc.embed(list(x), batch_size=len(x))  # uint8 squares; sides differ between volumes
        return loss(_logits_at(module, x, grid), y[:, None].long())

    val = prepared.val
    val_targets = torch.stack([resize_label(lab, grid) for lab in val.labels]).long()

    def validate(module: torch.nn.Module) -> dict[str, float]:
        inter = np.zeros(num_classes)
        total = np.zeros(num_classes)
        losses = []
        for begin in range(0, len(val), 16):
            idx = np.arange(begin, min(begin + 16, len(val)))
            logits = _logits_at(module, head_inputs(cfg, prepared, "val", idx), grid)
            y = val_targets[idx]
            losses.append(float(loss(logits, y[:, None])) * len(idx))
            pred = logits.argmax(1)
            for c in range(1, num_classes):
                inter[c] += float(((pred == c) & (y == c)).sum())
                total[c] += float((pred == c).sum() + (y == c).sum())
        dice = [2 * inter[c] / total[c] for c in range(1, num_classes) if total[c] > 0]
        return {"loss": sum(losses) / max(1, len(val)), "dice": float(np.mean(dice)) if dice else 0.0}

    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=False,
                        collate_fn=_collate_online if train_set.mode == "online" else None)  # fmt: skip
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=cfg.lr)
    result = fit(
        model=model, train_loader=loader, loss_fn=loss_fn, validate=validate, optimizer=optimizer,
        epochs=cfg.epochs, stopper=EarlyStopping(monitor="dice", mode="max", patience=cfg.patience),
        progress=progress, desc=f"train {head}", resume_dir=resume_dir, resume=resume,
        fingerprint=cfg.fingerprint(),
    )  # fmt: skip
    return HeadFit(model=model, train_patients=patients, train_slices=len(train), initialised_from=init_from,
                   result=result)  # fmt: skip


def head_inputs(cfg: SegmentConfig, prepared: SegPrepared, split: str, idx: np.ndarray) -> torch.Tensor:
    s = prepared.val if split == "val" else prepared.test
    if cfg.method == "unet":
        return image_tensor([s.images[i] for i in idx], cfg.unet_image_size)
    return torch.from_numpy(np.asarray(prepared.table(split)[idx], dtype=np.float32))


def evaluate_head(cfg: SegmentConfig, prepared: SegPrepared, fitted: HeadFit) -> tuple[dict, list, dict]:
    """Per-volume Dice and HD95 (mm) at each volume's own grid: (metrics, per-volume rows, test predictions)."""
    names = prepared.dataset.label_names
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    predictions: dict[str, list[np.ndarray]] = {}
    for split in ("val", "test"):
        s = prepared.val if split == "val" else prepared.test
        per_volume = []
        predictions[split] = []
        for ci, (case, volume) in enumerate(zip(s.cases, s.volumes)):
            idx = np.array([i for i, c in enumerate(s.case_index) if c == ci])
            pred = predict_volume(fitted.model, head_name=cfg.method, volume=volume, image_size=cfg.input_size,
                                  inputs=head_inputs(cfg, prepared, split, idx))  # fmt: skip
            predictions[split].append(pred)
            dice, hd95 = volume_scores(
                pred, volume.label, spacing=volume.spacing, num_classes=prepared.num_classes
            )
            per_volume.append({"dice": dice, "hd95": hd95})
            row = {"split": split, "case": case.id, "patient": case.patient}
            row.update({f"dice_{n}": float(d) for n, d in zip(names, dice)})
            row.update({f"hd95_{n}": float(h) for n, h in zip(names, hd95)})
            rows.append(row)
        metrics[split] = summarize(per_volume, names)
    metrics.update(
        {
            "head": cfg.method,
            "encoder": None if cfg.method == "unet" else cfg.encoder,
            "encoder_image_size": None if cfg.method == "unet" else cfg.encoder_size,
            "unet_image_size": cfg.unet_image_size if cfg.method == "unet" else None,
            "n_train": len(fitted.train_patients),
            "train_volumes": len(fitted.train_patients),
            "train_slices": fitted.train_slices,
            "label_names": list(names),
            "best_val": fitted.result.best_val,
            "head_parameters": count_parameters(fitted.model),
            "initialised_from_checkpoint": len(fitted.initialised_from),
        }
    )
    return metrics, rows, predictions
