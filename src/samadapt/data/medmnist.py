"""MedMNIST v2 / MedMNIST+ ``.npz`` files (``retinamnist.npz``, ``retinamnist_224.npz``, ...).

Keys ``{split}_images`` / ``{split}_labels`` for split in train, val, test (at least one pair; every
images key needs its labels key). Images (N, H, W) or (N, H, W, 3), uint8 (other dtypes go through
`to_uint8`); labels (N, 1) or (N,) class indices, or (N, C) 0/1 multi-label (ChestMNIST).
Ids are ``<file name>#<split>/<row>``. Class names come from the official MedMNIST INFO table
(copied below for the 2D datasets, so the `medmnist` package and its dependencies are not needed),
else "0".."K-1". Each split's image array is decompressed on first use and kept in memory (not pickled
to data-loader workers).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.data.dataset import ImageDataset
from samadapt.data.images import to_uint8
from samadapt.data.splits import SPLITS
from samadapt.errors import DataError

_ORGAN = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
# Official label names from medmnist's INFO[flag]["label"] (MedMNIST v2 / v3), in index order.
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],  # ordinal diabetic-retinopathy grades, named by number
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}


def medmnist_flag(path: Path) -> str:
    """``retinamnist_224.npz`` -> ``retinamnist`` (MedMNIST+ appends the image size)."""
    return re.sub(r"_\d+$", "", path.stem.lower())


def _npz_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an npz without decompressing it (reads the .npy header)."""
    with archive.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return shape, dtype


class NpzImages:
    """Loads rows of ``{split}_images`` lazily; the decompressed arrays stay out of pickles."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_arrays": {}}

    def __call__(self, locator: tuple[str, int]) -> np.ndarray:
        split, row = locator
        if split not in self._arrays:
            with np.load(self.path, allow_pickle=False) as npz:
                self._arrays[split] = npz[f"{split}_images"]
        image = self._arrays[split][row]
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return to_uint8(image, source=f"{self.path}#{split}/{row}")


def read_medmnist(path: Path, *, class_names: Sequence[str] | None = None) -> ImageDataset:
    """A MedMNIST ``.npz`` file with its official train/val/test splits."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
            headers = {key: _npz_header(archive, key) for key in keys if key.endswith("_images")}
        with np.load(path, allow_pickle=False) as npz:
            raw_labels = {key: npz[key] for key in keys if key.endswith("_labels")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read as a MedMNIST .npz file: {error}") from error

    present = [split for split in SPLITS if f"{split}_images" in keys or f"{split}_labels" in keys]
    expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    missing = [
        f"{split}_{kind}"
        for split in present
        for kind in ("images", "labels")
        if f"{split}_{kind}" not in keys
    ]
    if not present or missing:
        raise DataError(
            f"{path}: expected MedMNIST keys {expected}; missing {missing or expected}, found {sorted(keys)}"
        )

    ids, locators, splits, label_parts = [], [], [], []
    for split in present:
        shape, dtype = headers[f"{split}_images"]
        if dtype.hasobject:  # would need pickle to load, which we never allow
            raise DataError(
                f"{path}: {split}_images holds Python objects (dtype {dtype}); expected a uint8 array"
            )
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise DataError(
                f"{path}: {split}_images has shape {shape}; expected (N, H, W) or (N, H, W, 3) 2D images"
            )
        labels = raw_labels[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim not in (1, 2) or len(labels) != shape[0]:
            raise DataError(
                f"{path}: {split}_labels has shape {raw_labels[f'{split}_labels'].shape} "
                f"for {shape[0]} images; expected (N, 1), (N,) or (N, C)"
            )
        numeric = labels.dtype == np.bool_ or (
            np.issubdtype(labels.dtype, np.number) and not np.issubdtype(labels.dtype, np.complexfloating)
        )
        # text ("benign"), bytes, datetimes fail before np.round, which would raise TypeError on them
        if not numeric or (
            not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels))
        ):
            raise DataError(
                f"{path}: {split}_labels must be integers (class indices), found dtype {labels.dtype}"
            )
        label_parts.append(labels.astype(np.int64))
        ids.extend(f"{path.name}#{split}/{row}" for row in range(shape[0]))
        locators.extend((split, row) for row in range(shape[0]))
        splits.extend([split] * shape[0])

    if len({part.ndim for part in label_parts}) != 1 or len({part.shape[1:] for part in label_parts}) != 1:
        raise DataError(f"{path}: label arrays disagree in shape between splits")
    labels = np.concatenate(label_parts)
    names = _class_names(path, labels, class_names)
    return ImageDataset(
        ids=ids,
        labels=labels,
        splits=splits,
        class_names=names,
        source=path,
        format="medmnist",
        locators=locators,
        load=NpzImages(path),
    )


def _class_names(path: Path, labels: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    count = labels.shape[1] if labels.ndim == 2 else int(labels.max(initial=-1)) + 1
    if class_names is not None:
        names = list(class_names)
    else:
        official = MEDMNIST_CLASSES.get(medmnist_flag(path))
        names = list(official) if official is not None else [str(i) for i in range(count)]
    too_few = len(names) < count if labels.ndim == 1 else len(names) != count
    if too_few:
        raise DataError(
            f"{path}: labels need {count} classes but {len(names)} class names are known ({names[:5]}...)"
        )
    return names
