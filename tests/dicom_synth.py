"""Synthetic single-frame DICOM series written with pydicom, with known geometry, for the DICOM tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

OBLIQUE_IOP = (
    # a row direction and a column direction, orthonormal, tilted away from every world axis
    (0.8660254, 0.5, 0.0),
    (-0.1294095, 0.2241439, -0.9659258),
)


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    iop: tuple[tuple[float, float, float], tuple[float, float, float]] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    origin: tuple[float, float, float] = (-100.0, -80.0, 30.0),
    pixel_spacing: tuple[float, float] = (0.7, 0.9),  # (between rows, between columns), as DICOM orders it
    slice_step: float = 2.5,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_uid: str | None = None,
    seed: int = 0,
    suffix: str = "",
) -> list[Path]:
    """Write `stored` ([Z, rows, cols] uint16/int16 stored values) as one series, files in shuffled order.

    Slice k sits at ``origin + k * slice_step * normal``; InstanceNumber is scrambled and file names are
    random, so only the positions tell the order. Returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.asarray(iop[0]), np.asarray(iop[1])
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    n = stored.shape[0]
    names = [f"{rng.integers(10**9):09d}{suffix}" for _ in range(n)]
    instance_numbers = rng.permutation(n) + 1
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientName = "Synthetic^Patient"
        ds.PatientID = "SYN001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 3
        ds.SeriesDescription = f"synthetic {modality}"
        ds.InstanceNumber = int(instance_numbers[k])
        ds.Manufacturer = "pydicom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_step * normal]
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = float(abs(slice_step))
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def random_stored(shape: tuple[int, int, int], *, seed: int = 0) -> np.ndarray:
    """Random uint16 stored values [Z, rows, cols]."""
    return np.random.default_rng(seed).integers(0, 3000, size=shape, dtype=np.uint16)


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)
