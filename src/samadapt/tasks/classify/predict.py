"""`samadapt predict --run RUN --images ...`: class probabilities per image and SLCA attention overlays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from samadapt.data.folders import collect_images
from samadapt.encoders.checkpoint import check_finite
from samadapt.errors import CheckpointError, ConfigError
from samadapt.evaluation.linear_probe import probe_probabilities
from samadapt.reports import save_overlay, write_predictions_csv
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.features import (
    embed_into_store,
    global_sam_features,
    normalise,
    pooled_sam_features,
    resize_for_backbone,
)
from samadapt.tasks.classify.train import backbone_norm, build_model
from samadapt.training import load_weights
from samadapt.training.weights import load_weights_into

log = logging.getLogger(__name__)
BATCH = 32


def check_probe_weights(
    weights: dict[str, torch.Tensor], *, path: Path, num_features: int, num_classes: int
) -> None:
    """The linear probe's tensors must fit the features and classes, or the matrix maths fails unhelpfully."""
    missing = [k for k in ("mean", "scale", "coef", "intercept") if k not in weights]
    if missing:
        raise CheckpointError(
            f"{path}: not linear-probe weights (missing {', '.join(missing)}; found {', '.join(sorted(weights))})"
        )
    shapes = {k: tuple(weights[k].shape) for k in ("mean", "scale", "coef", "intercept")}
    outputs = (num_classes,)
    fits = (
        shapes["mean"] == shapes["scale"] == (num_features,)
        and len(shapes["coef"]) == 2
        and shapes["coef"][1] == num_features
        and shapes["coef"][0] in outputs
        and shapes["intercept"] == (shapes["coef"][0],)
    )
    if not fits:
        found = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        raise CheckpointError(
            f"{path}: linear-probe weights do not fit the run ({num_features} SAM features, {num_classes} classes "
            f"need mean/scale [{num_features}], coef [{'|'.join(map(str, outputs))}, {num_features}]; found {found})"
        )


def predict_images(
    *,
    cfg: ClassifyConfig,
    recorded: dict,
    run: Path,
    images: list[str],
    out: Path,
    store: str | None = None,
    device: str | None = None,
    checkpoint: str | None = None,
    progress: bool = False,
) -> Path:
    """Write OUT/predictions.csv (class and probabilities per image) and, for slca, OUT/overlays/<name>.png."""
    from samadapt.data import read_image

    class_names = [str(c) for c in recorded.get("class_names") or []]
    if len(class_names) < 2:
        raise ConfigError(f"{run / 'config.yaml'}: recorded.class_names must list at least 2 classes")
    fields = recorded.get("encoder_fields")
    files = collect_images(images)
    arrays = [read_image(f) for f in files]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = Path(run) / "model.safetensors"
    weights = load_weights(weights_path)
    check_finite(weights, path=weights_path)
    embeddings = None
    encoder = None
    if cfg.method != "baseline":
        trained = (fields or {}).get("precision")  # the precision "auto" resolved to at training
        encoder = cfg.replace(checkpoint=checkpoint).load_encoder(device or "cpu", precision=trained)
        if fields is not None and encoder.cache_key_fields() != fields:
            raise CheckpointError(
                f"{run}: trained with encoder settings {fields}, but the encoder now loads as "
                f"{encoder.cache_key_fields()} (another checkpoint file or size?)"
            )
        embeddings = embed_into_store(
            arrays, encoder=encoder, store_dir=store or out / "embeddings", feature=cfg.sam_feature,
            batch_size=cfg.embed_batch_size, progress=progress,
        )  # fmt: skip
    if cfg.method == "linear-probe":
        features = global_sam_features(embeddings)
        check_probe_weights(
            weights, path=weights_path, num_features=features.shape[1], num_classes=len(class_names)
        )
        probs = probe_probabilities(weights, features)
        maps = None
    else:
        probs, maps = _network_probs(
            cfg, class_names, weights, arrays, embeddings, encoder, weights_path=weights_path
        )
    ids = [str(f) for f in files]
    csv_path = write_predictions_csv(out / "predictions.csv", ids=ids, probs=probs, class_names=class_names)
    if maps is not None:
        names = _unique_stems(files)
        for name, image, heat in zip(names, arrays, maps):
            save_overlay(out / "overlays" / f"{name}.png", image=image, heatmap=heat)
    return csv_path


def _network_probs(cfg, class_names, weights, arrays, embeddings, encoder, *, weights_path):
    sam_channels = int(embeddings.shape[1]) if embeddings is not None else 0
    model = build_model(cfg, num_classes=len(class_names), sam_channels=sam_channels)
    load_weights_into(model, weights, path=weights_path)
    model.eval()
    mean, std = backbone_norm(model)
    images = resize_for_backbone(arrays, cfg.backbone_image_size)
    sam = None
    if embeddings is not None:
        sam = pooled_sam_features(
            embeddings, window=cfg.slca_window, pooling=cfg.slca_pooling, image_shapes=[a.shape[:2] for a in arrays],
            preprocessing=encoder.spec.preprocessing, input_size=encoder.image_size,
        )  # fmt: skip
    probs, maps = [], []
    with torch.no_grad():
        for start in range(0, len(arrays), BATCH):
            x = normalise(images[start : start + BATCH], mean=mean, std=std)
            s = sam[start : start + BATCH] if sam is not None else None
            probs.append(torch.softmax(model(x, s), dim=1).double().numpy())
            if s is not None and model.uses_sam:
                maps.extend(model.attention_map(s).numpy())
    return np.concatenate(probs), (maps if maps else None)


def _unique_stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for f in files:
        stem = f.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names
