"""ISIC 2017 (Part 3, lesion classification): JPEG images plus ground-truth CSVs.

Ground-truth CSV header: ``image_id,melanoma,seborrheic_keratosis`` (values 0/1, also written "0.0").
Classes, in this order: melanoma (melanoma=1), seborrheic_keratosis (seborrheic_keratosis=1),
nevus (both 0); a row with both set is refused.

Layout: pass the folder where the official archives were unzipped side by side::

    ISIC2017/
      ISIC-2017_Training_Data/ISIC_0000000.jpg ...     ISIC-2017_Training_Part3_GroundTruth.csv
      ISIC-2017_Validation_Data/...                     ISIC-2017_Validation_Part3_GroundTruth.csv
      ISIC-2017_Test_v2_Data/...                        ISIC-2017_Test_v2_Part3_GroundTruth.csv

Every CSV in the folder with that header is read; its split comes from its file name ("train",
"val"/"validation", "test"; none of them: unassigned), and its images from the subfolder whose name has
the same word (preferring one with "data" in it; segmentation "GroundTruth" and superpixel folders are
skipped), else from ``images/`` or the folder itself. A single ground-truth CSV file can also be passed,
with its images beside it or in such a subfolder. ``*_superpixels.png`` files are never read: only ids
listed in a CSV are. Ids are image paths relative to the folder.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.data.dataset import ImageDataset
from samadapt.data.images import read_image
from samadapt.data.manifest import read_csv_rows
from samadapt.errors import DataError

ISIC_CLASSES: list[str] = ["melanoma", "seborrheic_keratosis", "nevus"]
ISIC_HEADER: tuple[str, ...] = ("image_id", "melanoma", "seborrheic_keratosis")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLIT_WORDS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}


def is_isic_csv(path: Path) -> bool:
    """True for a CSV whose header starts with image_id,melanoma,seborrheic_keratosis."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return tuple(c.strip().lower() for c in first.split(","))[:3] == ISIC_HEADER


def isic_csvs(folder: Path) -> list[Path]:
    """The ISIC ground-truth CSVs directly inside ``folder``."""
    return sorted(p for p in folder.glob("*.csv") if is_isic_csv(p))


def _split_of(csv_path: Path) -> str | None:
    name = csv_path.stem.lower()
    for split, words in _SPLIT_WORDS.items():
        if any(word in name for word in words):
            return split
    return None


def _image_dirs(folder: Path, split: str | None) -> list[Path]:
    words = _SPLIT_WORDS[split] if split else ("data", "image")
    subdirs = [
        p
        for p in sorted(folder.iterdir())
        if p.is_dir()
        and any(w in p.name.lower() for w in words)
        and not any(skip in p.name.lower() for skip in ("groundtruth", "superpixel"))
    ]
    subdirs.sort(key=lambda p: "data" not in p.name.lower())  # stable: "..._Data" folders first
    return [*subdirs, folder / "images", folder]


def _find_image(dirs: list[Path], image_id: str) -> Path | None:
    for folder in dirs:
        for suffix in _IMAGE_SUFFIXES:
            candidate = folder / f"{image_id}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_ground_truth(csv_path: Path) -> tuple[list[str], list[int]]:
    header, rows = read_csv_rows(csv_path)
    if tuple(header[:3]) != ISIC_HEADER:
        raise DataError(f"{csv_path}: expected ISIC header {','.join(ISIC_HEADER)}; found {','.join(header)}")
    ids, labels = [], []
    for line, row in rows:
        try:
            mel, sk = float(row["melanoma"]), float(row["seborrheic_keratosis"])
        except (TypeError, ValueError) as error:
            raise DataError(
                f"{csv_path}: line {line}: melanoma/seborrheic_keratosis must be 0 or 1"
            ) from error
        if mel not in (0.0, 1.0) or sk not in (0.0, 1.0) or mel + sk > 1:
            raise DataError(
                f"{csv_path}: line {line}: melanoma={row['melanoma']}, seborrheic_keratosis="
                f"{row['seborrheic_keratosis']}; expected 0/1 with at most one set"
            )
        ids.append(row["image_id"].strip())
        labels.append(0 if mel else 1 if sk else 2)
    return ids, labels


def read_isic(
    source: Path, *, size_hint: int | None = None, class_names: Sequence[str] | None = None
) -> ImageDataset:
    """ISIC 2017 ground truth plus images: a folder of official CSVs, or one ground-truth CSV file."""
    root = source.parent if source.is_file() else source
    csvs = [source] if source.is_file() else isic_csvs(source)
    if not csvs:
        raise DataError(f"{source}: no ISIC ground-truth CSV (header {','.join(ISIC_HEADER)}) found")
    if class_names is not None and len(class_names) != len(ISIC_CLASSES):
        raise DataError(
            f"{source}: ISIC 2017 has {len(ISIC_CLASSES)} classes, {len(class_names)} names given"
        )
    splits_seen = [_split_of(c) for c in csvs]
    if len(csvs) > 1 and len(set(splits_seen)) != len(splits_seen):
        raise DataError(f"{source}: several ground-truth CSVs for one split: {[c.name for c in csvs]}")

    files: list[Path] = []
    labels: list[int] = []
    splits: list[str | None] = []
    seen: dict[str, Path] = {}
    for csv_path, split in zip(csvs, splits_seen):
        ids, csv_labels = _read_ground_truth(csv_path)
        dirs = _image_dirs(root, split)
        found = [_find_image(dirs, image_id) for image_id in ids]
        missing = [image_id for image_id, f in zip(ids, found) if f is None]
        if missing:
            raise DataError(
                f"{csv_path}: {len(missing)} image(s) not found in {[d.name for d in dirs]}, first: {missing[:5]}"
            )
        for image_id in ids:
            if image_id in seen:
                raise DataError(f"{csv_path}: image {image_id} is also listed in {seen[image_id].name}")
            seen[image_id] = csv_path
        files.extend(f for f in found if f is not None)
        labels.extend(csv_labels)
        splits.extend([split] * len(ids))
    return ImageDataset(
        ids=[f.relative_to(root).as_posix() for f in files],
        labels=np.array(labels, dtype=np.int64),
        splits=splits,
        class_names=list(class_names) if class_names is not None else ISIC_CLASSES,
        source=source,
        format="isic",
        locators=files,
        load=functools.partial(read_image, size_hint=size_hint),
        paths=files,
    )
