"""Labelled volumes for segmentation: the ACDC layout and a generic `images/` + `labels/` layout.

Layouts (auto-detected by `read_volumes`):
- ACDC: ``patientXXX/patientXXX_frameYY.nii.gz`` with ``patientXXX_frameYY_gt.nii.gz`` and ``Info.cfg``
  (``ED: 1``, ``ES: 12``). The ED and ES frames named in Info.cfg are used; without Info.cfg every frame that has a
  ``_gt`` file. One patient = both frames (a "labelled volume" in the AutoSAM protocol means one patient).
  Labels 0 background, 1 RV, 2 MYO, 3 LV.
- generic: ``images/NAME.nii(.gz)`` + ``labels/NAME.nii(.gz)``, or ``images/NAME.png`` + ``labels/NAME.png``
  (a PNG pair is a one-slice volume with 1 mm spacing), or ``images/NAME/`` (a DICOM series folder, see
  `samadapt.data.dicom_series`) + ``labels/NAME.nii(.gz)`` or ``labels/NAME.dcm`` (a DICOM-SEG over that series:
  label value = segment number). Each case is its own patient. Label names come from ``dataset.json``
  (nnU-Net / MSD style ``"labels": {"0": "background", "1": "liver"}``) when present, else from the DICOM-SEG
  segment labels.

Geometry is kept: every `Volume` carries the NIfTI affine and voxel spacing (mm); 2D slices are taken along the
third array axis (the short-axis stack in ACDC), so predictions stack back into the input's grid.

Intensity windowing for the encoder (`to_uint8`): per volume, clip to the 0.5-99.5 percentiles of its voxels,
then min-max to 0-255. One window per volume keeps slices of a volume comparable to each other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samadapt.errors import ConfigError, DataError

ACDC_LABEL_NAMES = ("RV", "MYO", "LV")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PNG_SUFFIX = ".png"
DICOM_SEG_SUFFIX = ".dcm"
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
_ACDC_FRAME = re.compile(r"^(?P<patient>.+)_frame(?P<frame>\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class Volume:
    """One image volume (float32, [X, Y, Z]) with its label volume (int, same shape) and geometry."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    spacing: tuple[float, float, float]  # voxel size in mm along the three array axes

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[2])


@dataclass(frozen=True)
class VolumeCase:
    """A case on disk: `id` is unique (e.g. ``patient001_frame01``), `patient` groups cases for splits."""

    id: str
    patient: str
    image_path: Path
    label_path: Path | None
    phase: str | None = None  # "ED" / "ES" for ACDC

    def load(self) -> Volume:
        source = None
        if self.image_path.is_dir():
            from samadapt.data.dicom_series import load_dicom_series

            series = load_dicom_series(self.image_path)
            image, affine, spacing, source = series.image, series.affine, series.spacing, series.datasets
        else:
            image, affine, spacing = read_volume_file(self.image_path)
        label = None
        if self.label_path is not None and _is_dicom_seg_name(self.label_path):
            if source is None:
                raise DataError(
                    f"{self.label_path}: a DICOM-SEG label needs a DICOM series image folder, not {self.image_path}"
                )
            from samadapt.data.dicom_seg import read_dicom_seg

            label_f, _ = read_dicom_seg(self.label_path, source=source)
        elif self.label_path is not None:
            label_f, _, _ = read_volume_file(self.label_path, label=True)
        if self.label_path is not None:
            if label_f.shape != image.shape:
                raise DataError(
                    f"{self.label_path}: label shape {label_f.shape} does not match image shape {image.shape} "
                    f"({self.image_path})"
                )
            label = np.rint(label_f).astype(np.int16)
            if label.min() < 0:
                raise DataError(f"{self.label_path}: labels must be >= 0, found {int(label.min())}")
        return Volume(image=image, label=label, affine=affine, spacing=spacing)


@dataclass(frozen=True)
class VolumeDataset:
    root: Path
    layout: str  # "acdc" or "generic"
    cases: tuple[VolumeCase, ...]
    label_names: tuple[str, ...]  # foreground structures, index i is label value i + 1

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.label_names) + 1

    @property
    def patients(self) -> list[str]:
        return sorted({c.patient for c in self.cases})

    def cases_of(self, patients: list[str]) -> list[VolumeCase]:
        wanted = set(patients)
        return [c for c in self.cases if c.patient in wanted]


def read_volume_file(
    path: str | Path, *, label: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI volume, a PNG slice or a DICOM series folder: (float32 [X, Y, Z], 4x4 affine, spacing mm).

    A colour PNG image becomes grey by luminance (PIL's "L", ITU-R 601); a colour PNG label map must hold the
    label in equal channels (a grey label saved as RGB), since colours have no defined label values.
    A DICOM series folder (one series) is read by `samadapt.data.dicom_series.read_dicom_series`: the same axes
    and RAS affine as its NIfTI conversion. DICOM-SEG labels need their image series: `VolumeCase.load` or
    `samadapt.data.dicom_seg.read_dicom_seg`."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        if label:
            raise DataError(f"{p}: a folder cannot be a label volume; use a NIfTI file or a DICOM-SEG (.dcm)")
        from samadapt.data.dicom_series import read_dicom_series

        image, affine, spacing, _ = read_dicom_series(p)
        return image, affine, spacing
    if label and _is_dicom_seg_name(p):
        raise DataError(
            f"{p}: a DICOM-SEG label is read onto its image series (read_dicom_seg(path, source=...))"
        )
    if name.endswith(PNG_SUFFIX):
        from PIL import Image

        try:
            with Image.open(p) as img:
                mode = img.mode
                arr = np.asarray(
                    img if label or mode in ("L", "I", "I;16", "F", "P", "1") else img.convert("L")
                )
        except OSError as exc:
            raise DataError(f"{p}: not a readable PNG ({exc})") from None
        if arr.ndim == 3:
            colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]  # alpha carries no label
            if label and not (colour == colour[..., :1]).all():
                raise DataError(
                    f"{p}: a colour label PNG ({mode}); save labels as grey or palette PNGs holding the label "
                    "values 0, 1, 2, ..."
                )
            arr = arr[..., 0]
        return arr.astype(np.float32)[:, :, None], np.eye(4), (1.0, 1.0, 1.0)
    if not name.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{p}: expected a .nii, .nii.gz or .png file or a DICOM series folder")
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise DataError(f"{p}: expected a 3D volume (X, Y, Z), found shape {data.shape}")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{p}: {bad} voxels are NaN or Inf; fix or mask them before training")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    spacing = (zooms + (1.0, 1.0, 1.0))[:3]
    return data, np.asarray(img.affine, dtype=np.float64), spacing  # type: ignore[return-value]


def to_uint8(image: np.ndarray, *, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Window a volume (or slice) to uint8: clip to its own [low, high] percentiles, then min-max to 0-255."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return np.rint(scaled * 255.0).astype(np.uint8)


def read_volumes(
    source: str | Path, *, label_names: list[str] | tuple[str, ...] | None = None
) -> VolumeDataset:
    """Find the labelled volumes under `source` (ACDC or generic layout, auto-detected)."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if (root / "images").is_dir():
        cases, names = _generic_cases(root)
        layout = "generic"
    else:
        cases = _acdc_cases(root)
        names = ACDC_LABEL_NAMES
        layout = "acdc"
    if not cases:
        raise DataError(
            f"{root}: found no labelled volumes; expected the ACDC layout (patientXXX/patientXXX_frameYY.nii.gz "
            "with _gt and Info.cfg) or images/ + labels/ folders"
        )
    if label_names is not None:
        names = tuple(label_names)
    if names is None:
        names = tuple(f"class{i}" for i in range(1, _max_label(cases) + 1))
    return VolumeDataset(root=root, layout=layout, cases=tuple(cases), label_names=tuple(names))


def _acdc_cases(root: Path) -> list[VolumeCase]:
    cases: list[VolumeCase] = []
    patient_dirs = sorted(
        {p.parent for p in root.rglob("*_frame*_gt.nii*")} | {p.parent for p in root.rglob("Info.cfg")}
    )
    for pdir in patient_dirs:
        phases = _read_info_cfg(pdir / "Info.cfg") if (pdir / "Info.cfg").is_file() else {}
        frames: dict[int, Path] = {}
        for f in sorted(pdir.iterdir()):
            m = _ACDC_FRAME.match(f.name)
            if m:
                frames[int(m.group("frame"))] = f
        wanted = {frame: phase for phase, frame in phases.items()} if phases else {k: None for k in frames}
        for frame, phase in sorted(wanted.items()):
            image_path = frames.get(frame)
            if image_path is None:
                raise DataError(
                    f"{pdir / 'Info.cfg'}: names frame {frame} ({phase}) but no such .nii(.gz) file"
                )
            label_path = _with_suffix(image_path, "_gt")
            if label_path is None:
                if phases:
                    raise DataError(
                        f"{image_path}: no ground truth file {image_path.name.split('.')[0]}_gt.nii.gz"
                    )
                continue
            stem = image_path.name.split(".")[0]
            cases.append(
                VolumeCase(
                    id=stem, patient=pdir.name, image_path=image_path, label_path=label_path, phase=phase
                )
            )
    return cases


def _read_info_cfg(path: Path) -> dict[str, int]:
    phases: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("ED", "ES"):
            try:
                phases[key.strip()] = int(float(value.strip()))
            except ValueError:
                raise DataError(
                    f"{path}: {key.strip()} must be a frame number, found {value.strip()!r}"
                ) from None
    if not phases:
        raise DataError(f"{path}: expected 'ED: N' and 'ES: M' lines")
    return phases


def _with_suffix(image_path: Path, suffix: str) -> Path | None:
    stem = image_path.name.split(".")[0]
    for ext in NIFTI_SUFFIXES:
        candidate = image_path.parent / f"{stem}{suffix}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _is_dicom_seg_name(path: Path) -> bool:
    return path.name.lower().endswith(DICOM_SEG_SUFFIX)


def _case_stem(path: Path, *, labels: bool = False) -> str | None:
    name = path.name
    if name.startswith("."):
        return None
    if path.is_dir():
        return None if labels else name  # images/CASE/: a DICOM series folder
    for ext in (*NIFTI_SUFFIXES, PNG_SUFFIX, *((DICOM_SEG_SUFFIX,) if labels else ())):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _generic_cases(root: Path) -> tuple[list[VolumeCase], tuple[str, ...] | None]:
    labels_dir = root / "labels"
    if not labels_dir.is_dir():
        raise DataError(f"{root}: has images/ but no labels/ folder")
    label_files = {_case_stem(p, labels=True): p for p in labels_dir.iterdir() if _case_stem(p, labels=True)}
    cases = []
    for image_path in sorted((root / "images").iterdir()):
        stem = _case_stem(image_path)
        if stem is None:
            continue
        label_path = label_files.get(stem)
        if label_path is None:
            raise DataError(f"{image_path}: no label file labels/{stem}.* beside it")
        cases.append(VolumeCase(id=stem, patient=stem, image_path=image_path, label_path=label_path))
    names = None
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            labels = json.loads(meta.read_text())["labels"]
            by_value = (
                {int(v): str(k) for k, v in labels.items()}
                if _values_are_ints(labels)
                else {int(k): str(v) for k, v in labels.items()}
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(
                f'{meta}: expected a \'labels\' mapping such as {{"0": "background", "1": "RV"}}'
            ) from None
        names = tuple(by_value[i] for i in sorted(by_value) if i > 0)
    elif any(c.label_path is not None and _is_dicom_seg_name(c.label_path) for c in cases):
        names = _dicom_seg_names(cases)
    return cases, names


def _dicom_seg_names(cases: list[VolumeCase]) -> tuple[str, ...]:
    """Label names from the DICOM-SEG segment labels (segment number = label value), the same in every file."""
    from samadapt.data.dicom_seg import read_segment_labels

    by_number: dict[int, tuple[str, Path]] = {}
    for case in cases:
        if case.label_path is None or not _is_dicom_seg_name(case.label_path):
            continue
        for number, name in read_segment_labels(case.label_path).items():
            seen = by_number.setdefault(number, (name, case.label_path))
            if seen[0] != name:
                raise DataError(
                    f"{case.label_path}: segment {number} is {name!r} but {seen[1].name} calls it {seen[0]!r}; "
                    "give the same segment numbers to the same structures, or a dataset.json with the labels"
                )
    top = max(by_number, default=0)
    return tuple(by_number[i][0] if i in by_number else f"class{i}" for i in range(1, top + 1))


def _values_are_ints(labels: dict) -> bool:
    # nnU-Net v2 writes {"background": 0, "RV": 1}; MSD / v1 write {"0": "background", "1": "RV"}
    return all(isinstance(v, int) for v in labels.values())


def _max_label(cases: list[VolumeCase]) -> int:
    top = 0
    for case in cases:
        if case.label_path is not None and _is_dicom_seg_name(case.label_path):
            from samadapt.data.dicom_seg import read_segment_labels

            top = max(top, *read_segment_labels(case.label_path), 0)
        elif case.label_path is not None:
            data, _, _ = read_volume_file(case.label_path, label=True)
            top = max(top, int(np.rint(data.max())))
    return max(top, 1)


def split_patients(
    patients: list[str],
    *,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict[str, list[str]]:
    """Seeded patient-level split into train/val/test (70/15/15 by default); every split gets >= 1 patient.

    `seed` is the split seed: the result depends on it and on the set of patients only (not on their order),
    never on a training seed. AutoSAM fixes its splits once (``create_acdc_folds``: 70/15/15 of the patients,
    saved to ``splits.pkl``) and trains every run on a prefix of that fold's training list; `patient_splits`
    and `training_subset` do the same with seeds instead of a file."""
    unique = sorted(set(patients))
    if len(unique) < 3:
        raise DataError(f"need at least 3 patients for a train/val/test split, found {len(unique)}")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n = len(order)
    n_val = max(1, int(round(n * fractions[1])))
    n_test = max(1, int(round(n * fractions[2])))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"split fractions {fractions} leave no training patient out of {n}")
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def patient_splits(
    patients: list[str],
    *,
    split_seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict[str, list[str]]:
    """{train, val, test} patients from the split seed alone: every training seed and method of a sweep that
    passes the same `split_seed` is validated and tested on the same patients."""
    return split_patients(patients, seed=split_seed, fractions=fractions)


def training_subset(train_patients: list[str], n: int, *, seed: int) -> list[str]:
    """The `n` training patients a run with training seed `seed` uses, out of a split's training patients.

    Nested: for one seed, the subset of n is a prefix of the subset of n + 1 (smaller budgets inside larger
    ones, as AutoSAM's ``tr_keys[0:tr_size]``); the order depends on the seed and the set of patients only."""
    unique = sorted(set(train_patients))
    if not 1 <= n <= len(unique):
        raise ConfigError(f"asked for {n} training patients; the split's training part has {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [unique[i] for i in order[:n]]


def read_splits_file(path: Path, dataset: VolumeDataset) -> dict[str, list[str]]:
    """A user's own patient split: JSON ``{"train": [...], "val": [...], "test": [...]}`` of patient ids."""
    try:
        data = json.loads(path.read_text())
        splits = {k: [str(p) for p in data[k]] for k in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: expected JSON with 'train', 'val' and 'test' lists of patients ({exc})"
        ) from None
    known = set(dataset.patients)
    for split, ids in splits.items():
        missing = [p for p in ids if p not in known]
        if missing:
            raise DataError(
                f"{path}: {split} names unknown patients {missing[:3]}; known e.g. {sorted(known)[:3]}"
            )
    return splits
