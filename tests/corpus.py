"""The bad-input corpus: builders that write one broken (or merely unusual) input each into a tmp folder.

Nothing binary is committed: every file is generated here, from a few real pixels, at test time.
`IMAGE_CASES` feed `samadapt embed --data`, `VOLUME_CASES` feed `samadapt train --task segment --data`,
`CHECKPOINT_CASES` feed `samadapt embed --checkpoint`. Each case knows what a good error must say.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Case:
    """`make(folder) -> (path to pass to the CLI, file the message must name)`; `message`: regex it must match."""

    name: str
    make: Callable[[Path], tuple[Path, Path]]
    message: str


def sample_rgb(size: int = 32, seed: int = 0) -> np.ndarray:
    """A small smooth colour image (JPEG-friendly) with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _single(name: str, data: Callable[[], bytes]) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        path = _write(folder / name, data())
        return path, path

    return make


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height grey pixels (decompression-bomb shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows only: the file is tiny, its header is not
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _truncated(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(sample_rgb(64)).save(buffer, format=kind)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def _dicom_without_pixels(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Anonymous"
    ds.Modality = "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _npz(name: str, arrays: Callable[[], dict[str, np.ndarray]]) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        np.savez(path, **arrays())
        return path, path

    return make


def medmnist_arrays(n: int = 4, size: int = 28, seed: int = 0, classes: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1))
    return arrays


def _with(**changes: np.ndarray | None) -> Callable[[], dict[str, np.ndarray]]:
    def arrays() -> dict[str, np.ndarray]:
        base = medmnist_arrays()
        for key, value in changes.items():
            if value is None:
                base.pop(key)
            else:
                base[key] = value
        return base

    return arrays


def _object_images() -> np.ndarray:
    # Pickled Python objects in an .npz: np.load(allow_pickle=False) must refuse them.
    images = np.empty((4, 28, 28), dtype=object)
    images.fill(0)
    return images


def _truncated_npz(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cut.npz"
    np.savez_compressed(path, **medmnist_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, path


def _csv_missing_files(folder: Path) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    _write(images / "a.png", png_bytes(sample_rgb()))
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label\nimages/a.png,benign\nimages/gone.png,malignant\n")
    return manifest, manifest


def _folder_with_one_bad_image(folder: Path) -> tuple[Path, Path]:
    for i in range(3):
        _write(folder / "data" / f"ok{i}.png", png_bytes(sample_rgb(seed=i)))
    bad = _write(folder / "data" / "ok1_broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder / "data", bad


def _all_class_folders_empty(folder: Path) -> tuple[Path, Path]:
    root = folder / "classes"
    for name in ("benign", "malignant"):
        (root / name / "sub").mkdir(parents=True, exist_ok=True)
    _write(root / "benign" / "sub" / "x.png", png_bytes(sample_rgb()))
    (root / "benign" / "sub" / "x.png").unlink()  # leave only empty folders behind
    # A folder of empty folders is "a plain folder of images" with none in it.
    return root, root


# 2D inputs through `samadapt embed --data`: each must fail with one line naming the file.
IMAGE_CASES: list[Case] = [
    Case("truncated_png", _single("cut.png", lambda: _truncated("PNG")), "truncated|corrupt"),
    Case("truncated_jpeg", _single("cut.jpg", lambda: _truncated("JPEG")), "truncated|corrupt"),
    Case("zero_byte", _single("empty.png", lambda: b""), "empty"),
    Case("text_as_png", _single("notes.png", lambda: b"Patient notes: no pixels here.\n"), "not an image"),
    Case("text_as_jpeg", _single("notes.jpg", lambda: b"GIF89a but not really\n" * 3), "not an image"),
    Case("one_by_one", _single("dot.png", lambda: png_bytes(np.zeros((1, 1), np.uint8))), "1x1"),
    Case("bomb_png", _single("bomb.png", lambda: bomb_png(100_000, 100_000)), "too large"),
    Case("bomb_png_warning_zone", _single("bomb2.png", lambda: bomb_png(10_000, 10_000)), "too large"),
    Case("dicom_without_pixels", lambda f: (_dicom_without_pixels(f / "report.dcm"),) * 2, "no pixel data"),
    Case("npz_missing_keys", _npz("breastmnist.npz", _with(val_labels=None)), "missing.*val_labels"),
    Case(
        "npz_wrong_image_shape",
        _npz("breastmnist.npz", _with(train_images=np.zeros((4, 28, 28, 5), np.uint8))),
        r"train_images.*shape",
    ),
    Case(
        "npz_label_count_mismatch",
        _npz("breastmnist.npz", _with(train_labels=np.zeros((3, 1), np.int64))),
        "train",
    ),
    Case(
        "npz_labels_out_of_range",  # BreastMNIST has 2 classes
        _npz("breastmnist.npz", _with(train_labels=np.array([[0], [1], [7], [1]]))),
        "class",
    ),
    Case(
        "npz_negative_labels",
        _npz("somemnist.npz", _with(test_labels=np.array([[0], [-1], [1], [1]]))),
        "label",
    ),
    Case("npz_object_images", _npz("breastmnist.npz", _with(train_images=_object_images())), "train_images"),
    Case(
        "npz_string_labels",  # labels saved as text ("benign"), not class indices
        _npz("breastmnist.npz", _with(train_labels=np.array([["a"], ["b"], ["a"], ["b"]]))),
        "train_labels",
    ),
    Case("npz_truncated", _truncated_npz, "npz"),
    Case("csv_missing_files", _csv_missing_files, "gone.png"),
    Case("folder_with_one_bad_image", _folder_with_one_bad_image, "not an image|truncated|corrupt"),
    Case("only_empty_class_folders", _all_class_folders_empty, "no image"),
]


# The IMAGE_CASES that are one bad file (not a whole dataset): `train` gets them inside a labelled class folder,
# `predict` gets the file itself.
IMAGE_FILE_CASES: list[Case] = [
    c for c in IMAGE_CASES if not c.name.startswith(("npz_", "csv_", "folder_", "only_"))
]


def labelled_folder_with(case: Case, folder: Path) -> tuple[Path, Path]:
    """A two-class ImageFolder (3 good images per class) with the case's bad file among the second class."""
    root = folder / "labelled"
    for label, seeds in (("benign", range(3)), ("malignant", range(3, 6))):
        for seed in seeds:
            _write(root / label / f"ok{seed}.png", png_bytes(sample_rgb(seed=seed)))
    _, culprit = case.make(root / "malignant")
    return root, culprit


def unusual_but_valid_images(folder: Path) -> dict[str, Path]:
    """Images `read_image` converts by its documented rules; `samadapt embed` must accept all of them."""
    rgb = sample_rgb(40)
    grey16 = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 37).astype(np.uint16)
    rgba = np.dstack([rgb, np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)])
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    files = {
        "grey16.png": png_bytes(grey16),
        "rgba.png": png_bytes(rgba),
        "la.png": png_bytes(rgba[..., [0, 3]]),
        "palette.png": _pil_png(palette),
        "palette_transparent.png": _pil_png(palette_transparent, transparency=0),
        "two_by_two.png": png_bytes(np.array([[0, 255], [255, 0]], np.uint8)),
    }
    return {name: _write(folder / name, data) for name, data in files.items()}


def _pil_png(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


# ---- hostile checkpoints -------------------------------------------------------------------------------------


class Payload:
    """Unpickling this object writes `marker` (what a malicious checkpoint would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return exec, (f"open({self.marker!r}, 'w').write('pwned')", {})  # type: ignore[return-value]


def tiny_sam_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random SAM ViT encoder saved the official way (flat state dict, `image_encoder.` prefix)."""
    from samadapt.encoders.registry import TINY_ARCHS
    from samadapt.encoders.sam_vit import SamViTEncoder

    torch.manual_seed(seed)
    module = SamViTEncoder(**TINY_ARCHS["sam"], img_size=1024)
    return {f"image_encoder.{k}": v for k, v in module.state_dict().items()}


def _pickle_in_torch_zip(marker: Path) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sam_vit_b_evil.pth"
        state = tiny_sam_state()
        state["image_encoder.payload"] = Payload(marker)  # type: ignore[assignment]
        torch.save(state, path)
        return path, path

    return make


def _raw_pickle(marker: Path) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "legacy_evil.pth"
        path.write_bytes(pickle.dumps({"model": Payload(marker)}))
        return path, path

    return make


def _state_file(
    name: str, edit: Callable[[dict[str, torch.Tensor]], None]
) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        state = tiny_sam_state()
        edit(state)
        path = folder / name
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        return path, path

    return make


def _set(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value

    return edit


def _reshape(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = torch.zeros(state[key].shape[0] + 8, *state[key].shape[1:])

    return edit


def checkpoint_cases(marker: Path) -> list[Case]:
    """Checkpoints `samadapt embed --checkpoint` must refuse; the pickle cases write `marker` if ever run."""
    mlp = "image_encoder.blocks.1.mlp.lin1.weight"
    return [
        Case("pickle_payload_torch_zip", _pickle_in_torch_zip(marker), "refused|pickle"),
        Case("pickle_payload_raw_pickle", _raw_pickle(marker), "refused|not a PyTorch checkpoint"),
        Case("wrong_shapes", _state_file("wrong_shape.pth", _reshape(mlp)), "does not fit"),
        Case("nan_weights", _state_file("nan.pth", _set(mlp, float("nan"))), "NaN or Inf"),
        Case("inf_weights", _state_file("inf.safetensors", _set(mlp, float("inf"))), "NaN or Inf"),
    ]


# ---- volumes for `samadapt train --task segment` -------------------------------------------------------------


def write_volume_dataset(
    root: Path,
    *,
    cases: int = 3,
    shape: tuple[int, int, int] = (24, 24, 2),
    label_names: tuple[str, ...] = ("disc",),
) -> Path:
    """A generic-layout segmentation dataset (images/ + labels/ NIfTI, dataset.json) with a disc to segment."""
    import json

    import nibabel as nib

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    x, y = np.mgrid[0 : shape[0], 0 : shape[1]]
    for i in range(cases):
        disc = (np.hypot(x - shape[0] / 2, y - shape[1] / 2) < shape[0] / 4).astype(np.uint8)
        label = np.repeat(disc[:, :, None], shape[2], axis=2)
        image = (label * 150 + rng.normal(50, 10, shape)).astype(np.float32)
        affine = np.diag([1.5, 1.5, 5.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "images" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / f"case{i}.nii.gz"))
    names = {"0": "background", **{str(i + 1): name for i, name in enumerate(label_names)}}
    (root / "dataset.json").write_text(json.dumps({"labels": names}))
    return root


def _replace_volume(
    kind: str, make_array: Callable[[np.ndarray], np.ndarray]
) -> Callable[[Path], tuple[Path, Path]]:
    def make(folder: Path) -> tuple[Path, Path]:
        import nibabel as nib

        root = write_volume_dataset(folder / "volumes")
        path = root / kind / "case1.nii.gz"
        original = nib.load(str(path))
        array = make_array(np.asarray(original.dataobj))
        nib.save(nib.Nifti1Image(array, original.affine), str(path))
        return root, path

    return make


def _nan_image(image: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[3:9, 3:9, :] = np.nan
    return out


def _truncated_volume(folder: Path) -> tuple[Path, Path]:
    root = write_volume_dataset(folder / "volumes")
    path = root / "images" / "case2.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return root, path


VOLUME_CASES: list[Case] = [
    Case(
        "nifti_4d",
        _replace_volume("images", lambda a: np.repeat(a[..., None], 2, axis=3).astype(np.float32)),
        "3D",
    ),
    Case("nifti_nan", _replace_volume("images", _nan_image), "NaN|finite"),
    Case(
        "mismatched_image_label",
        _replace_volume("labels", lambda a: a[:20].copy()),
        "does not match",
    ),
    Case("labels_out_of_range", _replace_volume("labels", lambda a: a * 7), "label"),
    Case("truncated_nifti", _truncated_volume, "NIfTI|truncated|corrupt"),
]
