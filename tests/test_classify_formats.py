"""Every dataset format the readers know trains through `samadapt train --task classify` (binary and
multi-class; non-square ISIC-like images exercise the SAM padding crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samadapt.cli.main import main
from samadapt.reports import read_csv_rows
from samadapt.tasks.classify.synthetic import lesion_image

TINY = ["--encoder", "sam_vit_b", "--encoder-arch", "tiny", "--encoder-image-size", "64", "--no-progress"]


def _images(n: int, num_classes: int, seed: int, shape=(40, 40)):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = [
        lesion_image(rng, size=max(shape), label=int(y), lesion_contrast=0.6)[: shape[0], : shape[1]]
        for y in labels
    ]
    return images, labels


def _imagefolder(root: Path) -> Path:
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        images, labels = _images(n, 2, seed=len(split))
        for i, (image, y) in enumerate(zip(images, labels)):
            folder = root / split / ("lesion" if y else "normal")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{split}_{i}.png")
    return root


def _manifest(root: Path) -> Path:
    root.mkdir(parents=True)
    images, labels = _images(45, 3, seed=3)
    lines = ["path,label"]  # no split column: a stratified seeded split is made
    for i, (image, y) in enumerate(zip(images, labels)):
        Image.fromarray(image[..., 0]).save(root / f"img{i}.png")  # grey images
        lines.append(f"img{i}.png,{['none', 'bright', 'dark'][y]}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _isic(root: Path) -> Path:
    for split, n, name in (("Training", 24, "train"), ("Validation", 9, "val"), ("Test_v2", 9, "test")):
        images, labels = _images(n, 3, seed=n, shape=(30, 40))  # non-square, like dermoscopy photos
        folder = root / f"ISIC-2017_{split}_Data"
        folder.mkdir(parents=True)
        rows = ["image_id,melanoma,seborrheic_keratosis"]
        for i, (image, y) in enumerate(zip(images, labels)):
            image_id = f"ISIC_{name}{i:04d}"
            Image.fromarray(image).save(folder / f"{image_id}.jpg", quality=95)
            rows.append(f"{image_id},{float(y == 0)},{float(y == 1)}")
        (root / f"ISIC-2017_{split}_Part3_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(
    ("make", "method", "classes"),
    [(_imagefolder, "baseline", 2), (_manifest, "linear-probe", 3), (_isic, "slca", 3)],
)
def test_format_trains(make, method, classes, tmp_path):
    data = make(tmp_path / "data")
    out = tmp_path / "run"
    rc = main([
        "train", "--task", "classify", "--data", str(data), "--method", method, "--backbone", "resnet18", *TINY,
        "--backbone-image-size", "32", "--epochs", "1", "--batch-size", "8", "--slca-window", "2", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] > 0 and metrics["n_test"] > 0
    rows = read_csv_rows(out / "predictions.csv")
    assert len([c for c in rows[0] if c.startswith("prob_")]) == classes
    assert len(rows) == metrics["n_val"] + metrics["n_test"]
