"""`read_dataset`: one entry point that detects the dataset format and returns an `ImageDataset`.

Detection (``format=None``), first match wins:
- ``.npz`` file -> "medmnist"; ``.csv`` file -> "isic" when its header is image_id,melanoma,
  seborrheic_keratosis, else "manifest" (path,label[,split]); an image file (or a DICOM file of any
  name) -> "images" (one image);
- folder holding an ISIC ground-truth CSV -> "isic"; holding exactly one CSV with a ``path`` column ->
  "manifest";
- folder with train/val/test subfolders, or with class subfolders of images and no images of its
  own -> "imagefolder";
- any other folder -> "images" (every image below it, recursively, unlabelled).
Pass ``format=`` to override, e.g. ``format="images"`` to read a folder of patient subfolders unlabelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from samadapt.data.dataset import ImageDataset
from samadapt.data.folders import looks_like_image_folder, read_image_folder, read_images
from samadapt.data.images import IMAGE_SUFFIXES, has_dicom_magic
from samadapt.data.isic import is_isic_csv, isic_csvs, read_isic
from samadapt.data.manifest import manifest_csvs, read_manifest
from samadapt.data.medmnist import read_medmnist
from samadapt.errors import ConfigError, DataError


def _medmnist(source: Path, size_hint: int | None, class_names: Sequence[str] | None) -> ImageDataset:
    return read_medmnist(source, class_names=class_names)  # images are stored at their final size


def _images(source: Path, size_hint: int | None, class_names: Sequence[str] | None) -> ImageDataset:
    return read_images(source, size_hint=size_hint)


READERS: dict[str, Callable[[Path, int | None, Sequence[str] | None], ImageDataset]] = {
    "images": _images,
    "imagefolder": lambda s, h, c: read_image_folder(s, size_hint=h, class_names=c),
    "medmnist": _medmnist,
    "manifest": lambda s, h, c: read_manifest(s, size_hint=h, class_names=c),
    "isic": lambda s, h, c: read_isic(s, size_hint=h, class_names=c),
}


def detect_format(source: Path) -> str:
    """The dataset format of ``source`` (a key of `READERS`), by the rules in the module docstring."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".npz":
            return "medmnist"
        if suffix == ".csv":
            return "isic" if is_isic_csv(source) else "manifest"
        if suffix in IMAGE_SUFFIXES or has_dicom_magic(source):
            return "images"
        raise DataError(f"{source}: cannot tell the dataset format from suffix {suffix!r}; pass format=")
    if isic_csvs(source):
        return "isic"
    if len(manifest_csvs(source)) == 1:
        return "manifest"
    if looks_like_image_folder(source):
        return "imagefolder"
    return "images"


def read_dataset(
    source: str | Path,
    *,
    format: str | None = None,
    class_names: Sequence[str] | None = None,
    image_size_hint: int | None = None,
    fill_splits: bool = True,
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> ImageDataset:
    """Read a dataset of 2D images with labels and splits.

    ``class_names`` fixes the class order (and checks the labels against it), e.g. to read a new test
    set with a trained model's classes. ``image_size_hint`` lets large JPEGs decode at reduced scale
    (see `read_image`). With ``fill_splits`` a labelled dataset's missing splits are filled by a seeded
    stratified split (`ImageDataset.ensure_splits`); unlabelled datasets keep their splits.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if format is None:
        format = detect_format(source)
    elif format not in READERS:
        raise ConfigError(f"unknown dataset format {format!r}; expected one of {sorted(READERS)}")
    dataset = READERS[format](source, image_size_hint, class_names)
    if fill_splits and dataset.labels is not None:
        dataset = dataset.ensure_splits(
            seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
    return dataset
