"""Read one DICOM image series (a folder of single-frame CT / MR / ... slices) into a volume.

Array axes and affine follow our NIfTI volumes (nibabel's convention, the one dcm2niix and MONAI's readers use):

- ``image[x, y, z]``: ``x`` is the DICOM column index (along a row, direction ``ImageOrientationPatient[:3]``),
  ``y`` the row index (direction ``ImageOrientationPatient[3:]``), ``z`` the slice index. Slices are sorted by their
  position along the slice normal ``row_dir x col_dir`` (ascending), never by file name or InstanceNumber.
- ``affine`` maps ``(x, y, z, 1)`` to world millimetres in nibabel's RAS+ space. DICOM patient space is LPS+, so
  the affine is ``diag(-1, -1, 1, 1) @ A_lps`` (x and y of the world flip), where ``A_lps`` has the columns
  ``row_dir * PixelSpacing[1]``, ``col_dir * PixelSpacing[0]``, ``(IPP_last - IPP_first) / (n - 1)`` and
  ``IPP_first``.
- ``spacing``: ``(PixelSpacing[1], PixelSpacing[0], slice spacing)``; the slice spacing comes from the slice
  positions (``SliceThickness`` can differ from it for overlapping or gapped slices); a one-slice series uses
  ``SpacingBetweenSlices`` or ``SliceThickness`` (1 mm if neither is present).
- Voxel values are the modality values (``RescaleSlope`` / ``RescaleIntercept`` or a Modality LUT applied,
  e.g. Hounsfield units for CT), as float32.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samadapt.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# objects that share a folder with images but are not slices of the series
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC"})
_GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_ORIENTATION_TOL = 1e-4  # direction cosines
_SPACING_RTOL = 1e-2  # slice gaps may vary by 1% (rounded positions in real headers)


@dataclass(frozen=True)
class DicomSeries:
    """A sorted series: the volume, its geometry and the source datasets (sorted, pixel data dropped)."""

    image: np.ndarray  # float32 [X, Y, Z]
    affine: np.ndarray  # 4x4 voxel -> RAS+ world (mm)
    spacing: tuple[float, float, float]
    datasets: tuple  # pydicom Datasets, slice z = datasets[z]
    paths: tuple[Path, ...]  # file of each slice, same order

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def is_dicom_series_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding at least one DICOM file (checked by the 'DICM' preamble marker)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(_has_dicm_marker(f) for f in _candidate_files(p))


def read_dicom_series(
    folder: str | Path, *, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple]:
    """Read the DICOM series in `folder`: (float32 image [X, Y, Z], 4x4 RAS affine, spacing mm, datasets).

    `datasets` are the pydicom Datasets of the slices in array order (``image[:, :, z]`` is ``datasets[z]``),
    pixel data dropped; pass them (or the folder) to `write_dicom_seg` as the source. A folder with several
    series needs `series_uid`. See the module docstring for the axis and affine conventions."""
    series = load_dicom_series(folder, series_uid=series_uid)
    return series.image, series.affine, series.spacing, series.datasets


def load_dicom_series(folder: str | Path, *, series_uid: str | None = None) -> DicomSeries:
    """`read_dicom_series` as a `DicomSeries` (with the slice file paths)."""
    root, items, order, affine_lps, spacing = _sorted_series(folder, series_uid=series_uid)
    paths = tuple(items[i][0] for i in order)
    image = np.stack([_modality_pixels(path) for path in paths], axis=-1)  # [rows, cols, Z]
    image = np.ascontiguousarray(image.transpose(1, 0, 2))  # [cols, rows, Z] = [X, Y, Z]
    if not np.isfinite(image).all():
        raise DataError(f"{root}: voxel values are NaN or Inf after the modality rescale")
    return DicomSeries(
        image=image,
        affine=LPS_TO_RAS @ affine_lps,
        spacing=spacing,
        datasets=tuple(items[i][1] for i in order),
        paths=paths,
    )


def read_series_headers(folder: str | Path, *, series_uid: str | None = None) -> tuple:
    """The series' datasets in slice order, headers only (no pixel data read): checked like `read_dicom_series`."""
    _, items, order, _, _ = _sorted_series(folder, series_uid=series_uid)
    return tuple(items[i][1] for i in order)


def series_affine(datasets) -> np.ndarray:
    """The RAS affine of datasets already in slice order (as `read_dicom_series` returns them)."""
    items = [(Path(f"slice {i}"), ds) for i, ds in enumerate(datasets)]
    order, affine_lps, _ = _geometry(Path("series"), items)
    if order != list(range(len(items))):
        raise DataError(
            "series: datasets are not in slice order along the normal; pass them as read_dicom_series gives them"
        )
    return LPS_TO_RAS @ affine_lps


def _sorted_series(
    folder: str | Path, *, series_uid: str | None
) -> tuple[Path, list[tuple[Path, object]], list[int], np.ndarray, tuple[float, float, float]]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of DICOM files")
    by_series = _read_headers(root)
    if series_uid is None:
        if len(by_series) > 1:
            listing = "; ".join(
                f"{uid} ({len(items)} files, {items[0][1].get('SeriesDescription', '') or 'no description'})"
                for uid, items in sorted(by_series.items())
            )
            raise DataError(f"{root}: holds {len(by_series)} series, pass series_uid= one of: {listing}")
        (series_uid,) = by_series
    elif series_uid not in by_series:
        raise DataError(f"{root}: no series {series_uid}; found {sorted(by_series)}")
    items = by_series[series_uid]
    order, affine_lps, spacing = _geometry(root, items)
    return root, items, order, affine_lps, spacing


def _candidate_files(root: Path) -> list[Path]:
    return sorted(
        f
        for f in root.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"
    )


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_headers(root: Path) -> dict[str, list[tuple[Path, object]]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for path in _candidate_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError):
            continue  # not DICOM (a README, a checksum list): not part of the series
        except Exception as exc:  # pydicom raises many types for corrupt files
            raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
        if str(ds.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES or "Rows" not in ds:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(
                f"{path}: a multi-frame image ({ds.NumberOfFrames} frames); only series of single-frame "
                "slices are read (convert enhanced / multi-frame objects to a single-frame series first)"
            )
        if "SeriesInstanceUID" not in ds:
            raise DataError(f"{path}: no SeriesInstanceUID")
        by_series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not by_series:
        raise DataError(f"{root}: no DICOM image files in this folder")
    return by_series


def _float_tag(path: Path, ds, name: str, count: int) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds[name].value], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {name} is not numeric ({ds[name].value!r})") from None
    if values.shape != (count,):
        raise DataError(f"{path}: {name} must hold {count} numbers, found {list(values)}")
    return values


def _geometry(
    root: Path, items: list[tuple[Path, object]]
) -> tuple[list[int], np.ndarray, tuple[float, float, float]]:
    """Slice order along the normal, the LPS affine of the [cols, rows, Z] array and the spacing."""
    first_path, first = items[0]
    for path, ds in items:
        missing = [t for t in _GEOMETRY_TAGS if t not in ds or ds[t].value in (None, "")]
        if missing:
            raise DataError(f"{path}: missing geometry tags {', '.join(missing)}")
    orientation = _float_tag(first_path, first, "ImageOrientationPatient", 6)
    pixel_spacing = _float_tag(first_path, first, "PixelSpacing", 2)
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in items[1:]:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataError(
                f"{path}: slice size {int(ds.Rows)}x{int(ds.Columns)} differs from {shape[0]}x{shape[1]} of "
                f"{first_path.name} in the same series"
            )
        if not np.allclose(
            _float_tag(path, ds, "ImageOrientationPatient", 6), orientation, atol=_ORIENTATION_TOL
        ):
            raise DataError(
                f"{path}: ImageOrientationPatient differs from {first_path.name} in the same series"
            )
        if not np.allclose(_float_tag(path, ds, "PixelSpacing", 2), pixel_spacing, rtol=1e-6, atol=1e-6):
            raise DataError(f"{path}: PixelSpacing differs from {first_path.name} in the same series")
    if (pixel_spacing <= 0).any():
        raise DataError(f"{first_path}: PixelSpacing must be positive, found {list(pixel_spacing)}")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1.0, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1.0, atol=1e-3)
        and abs(float(row_dir @ col_dir)) < 1e-3
    ):
        raise DataError(
            f"{first_path}: ImageOrientationPatient {list(orientation)} is not two orthonormal vectors"
        )
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([_float_tag(p, ds, "ImagePositionPatient", 3) for p, ds in items])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_pos, sorted_along = positions[order], along[order]
    n = len(items)
    if n > 1:
        gaps = np.diff(sorted_along)
        if (gaps <= 1e-6).any():
            k = int(np.argmax(gaps <= 1e-6))
            raise DataError(
                f"{root}: {items[order[k]][0].name} and {items[order[k + 1]][0].name} lie at the same slice "
                "position (duplicate slices, or several acquisitions in one series)"
            )
        if gaps.max() - gaps.min() > _SPACING_RTOL * gaps.mean():
            raise DataError(
                f"{root}: slice spacing is not regular (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm along "
                "the slice normal; missing slices?)"
            )
        step = (sorted_pos[-1] - sorted_pos[0]) / (n - 1)
        in_plane = step - (step @ normal) * normal
        if np.linalg.norm(in_plane) > 1e-3 * np.linalg.norm(step) + 1e-4:
            raise DataError(
                f"{root}: slices are not stacked along their normal (sheared stack, e.g. a tilted CT gantry); "
                "resample it to an orthogonal grid first"
            )
        slice_spacing = float(np.linalg.norm(step))
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_spacing = abs(float(thickness))
        step = normal * slice_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel_spacing[1]  # x = column index, along a row
    affine[:3, 1] = col_dir * pixel_spacing[0]  # y = row index, down a column
    affine[:3, 2] = step
    affine[:3, 3] = sorted_pos[0]
    return order, affine, (float(pixel_spacing[1]), float(pixel_spacing[0]), slice_spacing)


def _modality_pixels(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as exc:  # missing pixel data, unsupported transfer syntax without a decoder, ...
        raise DataError(f"{path}: cannot decode the pixel data ({type(exc).__name__}: {exc})") from None
    if raw.ndim != 2:
        raise DataError(f"{path}: expected a grey single-frame slice, found pixel array shape {raw.shape}")
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
