"""read_dataset: every format built in tmp_path, format detection, splits and label-fraction subsets."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from samadapt.data import ImageDataset, detect_format, label_fraction_indices, read_dataset
from samadapt.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def save(path: Path, image: np.ndarray | None = None) -> np.ndarray:
    """Write a small PNG/JPEG (random unless given) and return what was written."""
    image = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8) if image is None else image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return image


def make_image_folder(root: Path, counts: dict[str, int], split: str | None = None) -> None:
    for name, count in counts.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            save(folder / f"{name}_{i:02d}.png")


def test_plain_folder_is_recursive_sorted_and_unlabelled(tmp_path: Path) -> None:
    cell = save(tmp_path / "b" / "cell.png", skimage.data.cell()[:40, :30])
    save(tmp_path / "a.png")
    save(tmp_path / "b" / "deep" / "c.jpg")
    save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = read_dataset(tmp_path)
    assert dataset.format == "images" and dataset.labels is None
    assert dataset.ids == ["a.png", "b/cell.png", "b/deep/c.jpg"]
    assert dataset.splits == [None, None, None]  # unlabelled: nothing to stratify, left alone
    np.testing.assert_array_equal(dataset.image(1), cell)
    assert dataset.path(1) == tmp_path / "b" / "cell.png"
    assert read_dataset(tmp_path / "a.png").ids == ["a.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        read_dataset(tmp_path / "empty")


def test_image_folder_without_splits_gets_seeded_stratified_splits(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"benign": 20, "malignant": 10, "empty": 0})
    with pytest.warns(UserWarning, match="holds no images"):
        raw = read_dataset(tmp_path, fill_splits=False)
    assert raw.format == "imagefolder" and raw.class_names == ["benign", "empty", "malignant"]
    assert np.bincount(raw.labels).tolist() == [20, 0, 10] and set(raw.splits) == {None}

    split_a = raw.ensure_splits(seed=3, val_fraction=0.2, test_fraction=0.2)
    split_b = raw.ensure_splits(seed=3, val_fraction=0.2, test_fraction=0.2)
    split_c = raw.ensure_splits(seed=4, val_fraction=0.2, test_fraction=0.2)
    assert split_a.splits == split_b.splits and split_a.splits != split_c.splits
    for name, size in (("train", 18), ("val", 6), ("test", 6)):
        idx = split_a.split_indices(name)
        assert len(idx) == size
        assert np.bincount(split_a.labels[idx], minlength=3).tolist() == [size * 2 // 3, 0, size // 3]
    assert raw.splits == [None] * 30  # ensure_splits returns a copy


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 6, "dog": 6}, "train")
    make_image_folder(tmp_path, {"cat": 2, "dog": 2}, "valid")
    make_image_folder(tmp_path, {"cat": 3, "dog": 2, "eel": 1}, "test")
    dataset = read_dataset(tmp_path)
    assert dataset.class_names == ["cat", "dog", "eel"]  # union over splits, same indices everywhere
    assert [len(dataset.split_indices(s)) for s in ("train", "val", "test")] == [12, 4, 6]
    assert dataset.ids[0] == "test/cat/cat_00.png"
    eel = dataset.ids.index("test/eel/eel_00.png")
    assert dataset.labels[eel] == 2 and dataset.splits[eel] == "test"

    only_train_test = tmp_path / "tt"
    make_image_folder(only_train_test, {"cat": 10, "dog": 10}, "train")
    make_image_folder(only_train_test, {"cat": 3, "dog": 3}, "test")
    filled = read_dataset(only_train_test, split_seed=1)
    assert len(filled.split_indices("test")) == 6  # official test split untouched
    assert len(filled.split_indices("val")) == 3 and len(filled.split_indices("train")) == 17
    assert all(
        dataset_id.startswith("train/") for dataset_id in filled.subset(filled.split_indices("val")).ids
    )


def write_medmnist(
    path: Path, sizes=(8, 3, 4), classes: int = 5, rgb: bool = False, multilabel: int = 0
) -> dict:
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = RNG.integers(0, 256, size=shape, dtype=np.uint8)
        if multilabel:
            arrays[f"{split}_labels"] = RNG.integers(0, 2, size=(n, multilabel), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_npz_official_splits_names_and_lazy_images(tmp_path: Path) -> None:
    arrays = write_medmnist(tmp_path / "retinamnist_224.npz", rgb=True)
    dataset = read_dataset(tmp_path / "retinamnist_224.npz")
    assert dataset.format == "medmnist" and len(dataset) == 15
    assert dataset.class_names == ["0", "1", "2", "3", "4"]
    assert dataset.ids[8] == "retinamnist_224.npz#val/0" and dataset.splits[8] == "val"
    assert dataset.labels.shape == (15,) and dataset.labels[:8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    np.testing.assert_array_equal(dataset.image(13), arrays["test_images"][2])
    assert dataset.path(0) is None
    # Decompressed arrays stay behind when the dataset is sent to a data-loader worker.
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < arrays["train_images"].nbytes
    np.testing.assert_array_equal(clone.image(0), arrays["train_images"][0])

    write_medmnist(tmp_path / "breastmnist.npz", classes=2)
    assert read_dataset(tmp_path / "breastmnist.npz").class_names == ["malignant", "normal, benign"]
    write_medmnist(tmp_path / "breastmnist_64.npz", classes=3)
    with pytest.raises(DataError, match="3 classes but 2 class names"):
        read_dataset(tmp_path / "breastmnist_64.npz")

    chest = write_medmnist(tmp_path / "chestmnist.npz", multilabel=14)
    multi = read_dataset(tmp_path / "chestmnist.npz")
    assert multi.multilabel and multi.labels.shape == (15, 14) and multi.class_names[0] == "atelectasis"
    np.testing.assert_array_equal(multi.labels[:8], chest["train_labels"])

    write_medmnist(tmp_path / "mydata.npz", classes=3)
    assert read_dataset(tmp_path / "mydata.npz").class_names == ["0", "1", "2"]


def test_medmnist_npz_with_missing_keys_or_bad_shapes(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "nolabels.npz", train_images=images)
    with pytest.raises(DataError, match="missing \\['train_labels'\\]") as caught:
        read_dataset(tmp_path / "nolabels.npz")
    assert "nolabels.npz" in str(caught.value)
    np.savez(tmp_path / "count.npz", train_images=images, train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match="for 4 images"):
        read_dataset(tmp_path / "count.npz")
    np.savez(
        tmp_path / "vol.npz", train_images=np.zeros((2, 8, 8, 8), np.uint8), train_labels=np.zeros((2, 1))
    )
    with pytest.raises(DataError, match="2D images"):
        read_dataset(tmp_path / "vol.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match="broken.npz"):
        read_dataset(tmp_path / "broken.npz")


def test_csv_manifest(tmp_path: Path) -> None:
    for i in range(12):
        save(tmp_path / "imgs" / f"{i}.png")
    rows = [
        f"imgs/{i}.png,{'nevus' if i % 3 else 'melanoma'},{'valid' if i == 11 else ''}" for i in range(12)
    ]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n\n")
    dataset = read_dataset(tmp_path / "m.csv", split_seed=0, val_fraction=0.25, test_fraction=0.25)
    assert dataset.format == "manifest" and dataset.class_names == ["melanoma", "nevus"]
    assert dataset.ids[0] == "imgs/0.png" and dataset.labels[:3].tolist() == [0, 1, 1]
    assert dataset.splits[11] == "val"  # given splits are kept; the unassigned rest is split
    assert len(dataset.split_indices("test")) == 3 and len(dataset.split_indices("train")) == 8

    assert read_dataset(tmp_path, fill_splits=False).ids == dataset.ids  # the folder holding one manifest
    fixed = read_dataset(tmp_path / "m.csv", class_names=["nevus", "melanoma"], fill_splits=False)
    assert fixed.labels[:3].tolist() == [1, 0, 0]
    with pytest.raises(DataError, match="not among the class names"):
        read_dataset(tmp_path / "m.csv", class_names=["nevus"])

    (tmp_path / "ints.csv").write_text("path,label\n" + "".join(f"imgs/{i}.png,{i % 4}\n" for i in range(8)))
    assert read_dataset(tmp_path / "ints.csv", fill_splits=False).class_names == ["0", "1", "2", "3"]

    (tmp_path / "missing.csv").write_text("path,label\nimgs/0.png,a\nimgs/nope.png,b\nimgs/gone.png,a\n")
    with pytest.raises(DataError, match="2 listed image\\(s\\) do not exist.*nope.png") as caught:
        read_dataset(tmp_path / "missing.csv")
    assert "missing.csv" in str(caught.value)
    (tmp_path / "noheader.csv").write_text("imgs/0.png,a\n")
    with pytest.raises(DataError, match="header"):
        read_dataset(tmp_path / "noheader.csv")
    (tmp_path / "badsplit.csv").write_text("path,label,split\nimgs/0.png,a,holdout\n")
    with pytest.raises(DataError, match="holdout"):
        read_dataset(tmp_path / "badsplit.csv")
    (tmp_path / "gap.csv").write_text("path,label\nimgs/0.png,a\nimgs/1.png,\n")
    with pytest.raises(DataError, match="empty label on line"):
        read_dataset(tmp_path / "gap.csv")


def write_isic(root: Path, split_word: str, rows: list[tuple[str, float, float]]) -> None:
    data = root / f"ISIC-2017_{split_word}_Data"
    for image_id, _, _ in rows:
        save(data / f"{image_id}.jpg")
        save(data / f"{image_id}_superpixels.png")
    (root / f"ISIC-2017_{split_word}_Part1_GroundTruth").mkdir(parents=True)
    lines = "".join(f"{i},{m},{s}\n" for i, m, s in rows)
    (root / f"ISIC-2017_{split_word}_Part3_GroundTruth.csv").write_text(
        "image_id,melanoma,seborrheic_keratosis\n" + lines
    )


def test_isic_2017_official_layout(tmp_path: Path) -> None:
    write_isic(
        tmp_path, "Training", [("ISIC_0000000", 0.0, 0.0), ("ISIC_0000001", 1.0, 0.0), ("ISIC_0000002", 0, 1)]
    )
    write_isic(tmp_path, "Validation", [("ISIC_0001000", 0.0, 1.0)])
    write_isic(tmp_path, "Test_v2", [("ISIC_0002000", 1.0, 0.0), ("ISIC_0002001", 0.0, 0.0)])
    assert detect_format(tmp_path) == "isic"
    dataset = read_dataset(tmp_path)
    assert dataset.class_names == ["melanoma", "seborrheic_keratosis", "nevus"]
    assert len(dataset) == 6  # superpixel PNGs are not examples
    assert dataset.labels.tolist() == [0, 2, 2, 0, 1, 1]  # sorted CSVs: Test_v2, Training, Validation
    assert dataset.splits == ["test", "test", "train", "train", "train", "val"]
    assert dataset.ids[2] == "ISIC-2017_Training_Data/ISIC_0000000.jpg"
    assert dataset.image(0).shape == (12, 10, 3)

    single = read_dataset(tmp_path / "ISIC-2017_Validation_Part3_GroundTruth.csv", fill_splits=False)
    assert single.format == "isic" and single.labels.tolist() == [1] and single.splits == ["val"]

    bad = tmp_path / "bad"
    write_isic(bad, "Training", [("ISIC_0000000", 1.0, 1.0)])
    with pytest.raises(DataError, match="at most one set"):
        read_dataset(bad)
    (bad / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text(
        "image_id,melanoma,seborrheic_keratosis\nISIC_0000000,0,0\nISIC_0009999,0,0\n"
    )
    with pytest.raises(DataError, match="ISIC_0009999"):
        read_dataset(bad)


def test_label_fraction_indices_stratified_nested_and_seeded() -> None:
    labels = np.array([0] * 100 + [1] * 30 + [2] * 3)
    train = np.arange(0, 133)
    subsets = {f: label_fraction_indices(train, labels, f, seed=7) for f in (0.01, 0.05, 0.1, 0.5, 1.0)}
    for fraction, subset in subsets.items():
        counts = np.bincount(labels[subset], minlength=3)
        assert counts.min() >= 1  # every class survives even at 1 %
        assert counts[0] == max(1, round(fraction * 100))
    assert set(subsets[0.05]) <= set(subsets[0.1]) <= set(subsets[0.5])
    np.testing.assert_array_equal(subsets[0.1], label_fraction_indices(train, labels, 0.1, seed=7))
    assert not np.array_equal(subsets[0.1], label_fraction_indices(train, labels, 0.1, seed=8))
    assert len(subsets[1.0]) == 133

    # Only the given train indices are drawn from, and labels index the whole dataset.
    part = label_fraction_indices(np.arange(50, 133), labels, 0.2, seed=0)
    assert part.min() >= 50 and set(labels[part]) == {0, 1, 2}

    multi = (np.random.default_rng(0).random((200, 5)) < [0.5, 0.3, 0.1, 0.02, 0.01]).astype(np.int64)
    chosen = label_fraction_indices(np.arange(200), multi, 0.02, seed=1)
    assert multi[chosen].sum(0).min() >= 1
    with pytest.raises(ValueError, match="fraction"):
        label_fraction_indices(train, labels, 0.0, seed=0)


def test_dataset_api_and_user_errors(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "folder", {"a": 4, "b": 4})
    dataset = read_dataset(tmp_path / "folder", format="imagefolder", fill_splits=False)
    sub = dataset.subset([5, 0])
    assert isinstance(sub, ImageDataset) and sub.ids == [dataset.ids[5], dataset.ids[0]]
    assert sub.labels.tolist() == [1, 0] and sub.class_names == ["a", "b"]
    np.testing.assert_array_equal(sub.image(0), dataset.image(5))
    assert "imagefolder dataset" in dataset.summary() and "unassigned: 8 (a: 4, b: 4)" in dataset.summary()
    unlabelled = read_dataset(tmp_path / "folder", format="images")
    assert unlabelled.labels is None and len(unlabelled) == 8

    with pytest.raises(ConfigError, match="unknown dataset format"):
        read_dataset(tmp_path / "folder", format="coco")
    with pytest.raises(ConfigError, match="unknown split"):
        dataset.split_indices("holdout")
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nowhere")
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="pass format="):
        read_dataset(tmp_path / "data.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1-example dataset cannot be split: clear error, no crash
        make_image_folder(tmp_path / "two", {"a": 1})
        with pytest.raises(DataError, match="cannot fill missing splits"):
            read_dataset(tmp_path / "two")
    with pytest.raises(DataError, match="labels must be class indices"):
        ImageDataset(
            ids=["x"],
            labels=np.array([3]),
            splits=[None],
            class_names=["a", "b"],
            source=tmp_path / "labels.csv",
            format="manifest",
            locators=[None],
            load=lambda _: np.zeros((2, 2), np.uint8),
        )


def test_dicom_files_without_an_image_suffix_are_found(tmp_path: Path) -> None:
    """DICOM exports often name files IM0001 or by UID: a folder of them is a dataset, DICOMDIR is not."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def write_dicom(path: Path, pixels: np.ndarray | None, **elements: str) -> None:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        if pixels is not None:
            ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
        for key, value in elements.items():
            setattr(ds, key, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)

    stored = (np.arange(24 * 20).reshape(24, 20) * 5).astype(np.uint16)
    write_dicom(tmp_path / "scans" / "patient1" / "IM0001", stored)
    write_dicom(tmp_path / "scans" / "patient1" / "1.2.840.113619.2.55.3.7", stored)
    write_dicom(tmp_path / "scans" / "patient2" / "slice.dcm", stored)
    write_dicom(tmp_path / "scans" / "DICOMDIR", None, PatientName="Anon")  # an index, no pixels
    (tmp_path / "scans" / "patient1" / "notes").write_text("not an image")
    # Patient subfolders would read as classes (the detection rule), so ask for an unlabelled folder.
    dataset = read_dataset(tmp_path / "scans", format="images")
    assert dataset.ids == ["patient1/1.2.840.113619.2.55.3.7", "patient1/IM0001", "patient2/slice.dcm"]
    assert all(dataset.image(i).dtype == np.uint8 and dataset.image(i).shape == (24, 20) for i in range(3))
    single = tmp_path / "scans" / "patient1" / "IM0001"
    assert detect_format(single) == "images" and read_dataset(single).ids == ["IM0001"]

    for name in ("benign", "malignant"):  # ImageFolder of suffix-less DICOM files
        for i in range(3):
            write_dicom(tmp_path / "classes" / name / f"IM{i:04d}", stored)
    labelled = read_dataset(tmp_path / "classes", fill_splits=False)
    assert labelled.format == "imagefolder" and labelled.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_with_a_quoted_header_manifest_is_read_as_a_manifest(tmp_path: Path) -> None:
    """A CSV written with quoted fields ("path","label","split") must not turn the folder into an ImageFolder."""
    for i in range(4):
        save(tmp_path / "imgs" / f"{i}.png")
    rows = ['"path","label","split"'] + [
        f'"imgs/{i}.png","{"cat" if i % 2 else "dog"}","{("train", "train", "val", "test")[i]}"'
        for i in range(4)
    ]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert detect_format(tmp_path) == "manifest"
    dataset = read_dataset(tmp_path)
    assert dataset.format == "manifest" and dataset.class_names == ["cat", "dog"]
    assert dataset.splits == ["train", "train", "val", "test"]
