"""DICOM-SEG out (a label volume over a DICOM series) and back in, with highdicom.

`write_dicom_seg` writes a BINARY Segmentation object (as TotalSegmentator and MONAI Label do): segment ``i``
(1..K) is label value ``i`` and carries ``label_names[i - 1]`` as its SegmentLabel, every structure in
`label_names` gets a segment (so segment numbers equal label values in every file, whether or not a structure
was found), frames reference the source slices (their SOPInstanceUIDs, in the source slice order) and the source
FrameOfReference. Slices where a segment is empty have no frame (highdicom's ``omit_empty_frames``).

Coded concepts: without `segment_codes`, every segment's SegmentedPropertyCategory and SegmentedPropertyType
are SNOMED CT 85756007 "Tissue" (the generic codes MONAI Label's default template uses); pass
``segment_codes={"liver": (category_code, type_code)}`` (pydicom.sr.coding.Code, e.g.
``codes.SCT.AnatomicalStructure``, ``codes.SCT.Liver``) for the structures you know.

`read_dicom_seg` maps a DICOM-SEG back onto the grid of its source series: label value = segment number, names
from the segment labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from samadapt.data.dicom_series import LPS_TO_RAS, DicomSeries, read_series_headers, series_affine
from samadapt.errors import ConfigError, DataError
from samadapt.utils.atomic import atomic_path

SeriesSource = (
    str | Path | DicomSeries | Sequence
)  # a series folder, a DicomSeries, or datasets in slice order


def write_dicom_seg(
    labels: np.ndarray,
    *,
    source: SeriesSource,
    out: str | Path,
    label_names: Sequence[str],
    algorithm_name: str = "samadapt",
    algorithm_version: str | None = None,
    segment_codes: Mapping[str, tuple] | None = None,
    series_description: str = "Segmentation",
    series_number: int = 300,
    manufacturer: str = "samadapt",
) -> Path:
    """Write `labels` (int [X, Y, Z] on the source series' grid, 0 = background) as a DICOM-SEG file at `out`.

    `source` is the series folder (as given to `read_volume_file`) or its datasets in slice order (the fourth
    value of `read_dicom_series`). Returns `out`. The file is written atomically."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = Path(out)
    datasets = _source_datasets(source)
    n_slices = len(datasets)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (cols, rows, n_slices):
        raise DataError(
            f"{out}: label volume shape {arr.shape} does not match the source series grid "
            f"{(cols, rows, n_slices)} (columns, rows, slices)"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.rint(arr)):
            raise DataError(f"{out}: labels must be whole numbers, found dtype {arr.dtype} with fractions")
    names = [str(n) for n in label_names]
    if not names:
        raise ConfigError(f"{out}: label_names is empty; name the structures 1..K")
    if len(set(names)) != len(names):
        raise ConfigError(f"{out}: label_names repeat a name: {names}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > len(names):
        raise DataError(
            f"{out}: label values must lie in 0..{len(names)} (one per label name), found {low}..{high}"
        )
    codes_by_name = dict(segment_codes or {})
    unknown = sorted(set(codes_by_name) - set(names))
    if unknown:
        raise ConfigError(f"{out}: segment_codes names structures not in label_names: {unknown}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version or _samadapt_version(),
    )
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = codes_by_name.get(name, (codes.SCT.Tissue, codes.SCT.Tissue))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    pixels = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.uint16 if len(names) > 255 else np.uint8)
    try:
        seg = hd.seg.Segmentation(
            source_images=list(datasets),
            pixel_array=pixels,  # [slices, rows, cols], frame k of the source = datasets[k]
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=algorithm_name,
            software_versions=_samadapt_version(),
            device_serial_number="0",
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom rejects unusable source headers
        raise DataError(f"{out}: highdicom cannot build a Segmentation from this series ({exc})") from None
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out


def read_dicom_seg(path: str | Path, *, source: SeriesSource) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG onto its source series' grid: (int16 labels [X, Y, Z], {segment number: label}).

    Label value = segment number (0 = background). `source` is the image series (folder or datasets in slice
    order), sharing the SEG's FrameOfReference. Frames are placed by their references to the series' instances,
    or, for a SEG made on another copy of the scan (other instance UIDs), by their plane positions when those lie
    on the series' voxel grid (no resampling)."""
    import highdicom as hd

    p = Path(path)
    datasets = _source_datasets(source)
    try:
        seg = hd.seg.segread(p)
    except Exception as exc:  # pydicom / highdicom raise many types for files that are not a SEG
        raise DataError(f"{p}: not a readable DICOM-SEG file ({type(exc).__name__}: {exc})") from None
    frame_uid = str(datasets[0].get("FrameOfReferenceUID", ""))
    if str(seg.get("FrameOfReferenceUID", "")) != frame_uid:
        raise DataError(
            f"{p}: FrameOfReferenceUID {seg.get('FrameOfReferenceUID', 'missing')} differs from the image "
            f"series' {frame_uid}; the segmentation belongs to another scan"
        )
    series_uid = str(datasets[0].SeriesInstanceUID)
    referenced = {
        str(item.SeriesInstanceUID)
        for item in seg.get("ReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in item
    }
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise DataError(f"{p}: a FRACTIONAL segmentation; expected a BINARY or LABELMAP DICOM-SEG as labels")
    names = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    if series_uid in referenced:
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
                combine_segments=True,
                relabel=False,
                assert_missing_frames_are_empty=True,
                dtype=np.int16,
            )
            return np.ascontiguousarray(np.asarray(pixels).transpose(2, 1, 0)).astype(np.int16), names
        except (ValueError, KeyError, AttributeError):
            pass  # frames without per-frame source references: place them by their positions instead
    try:
        return _labels_by_geometry(seg, datasets), names
    except (ValueError, RuntimeError) as exc:
        raise DataError(
            f"{p}: its frames do not lie on the voxel grid of the image series {series_uid} (the SEG references "
            f"{sorted(referenced) or 'no series'}; {exc})"
        ) from None


def _labels_by_geometry(seg, datasets: tuple) -> np.ndarray:
    """Place the SEG's frames on the series grid by position (highdicom crops / pads / flips, never resamples)."""
    import highdicom as hd

    affine_lps = LPS_TO_RAS @ series_affine(datasets)  # the RAS <-> LPS flip is its own inverse
    grid = hd.VolumeGeometry(
        affine=affine_lps,
        spatial_shape=(int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)),
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
    )
    volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.int16).match_geometry(grid)
    return np.ascontiguousarray(volume.array).astype(np.int16)


def read_segment_labels(path: str | Path) -> dict[int, str]:
    """{segment number: SegmentLabel} of a DICOM-SEG, read from the header only."""
    import pydicom

    p = Path(path)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        return {int(item.SegmentNumber): str(item.SegmentLabel) for item in ds.SegmentSequence}
    except Exception as exc:  # not DICOM, or no SegmentSequence
        raise DataError(
            f"{p}: not a DICOM-SEG with a SegmentSequence ({type(exc).__name__}: {exc})"
        ) from None


def _source_datasets(source: SeriesSource) -> tuple:
    if isinstance(source, DicomSeries):
        return source.datasets
    if isinstance(source, (str, Path)):
        return read_series_headers(source)
    datasets = tuple(source)
    if not datasets:
        raise DataError("write_dicom_seg: the source series holds no datasets")
    return datasets


def _samadapt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samadapt")
    except PackageNotFoundError:
        return "0"
