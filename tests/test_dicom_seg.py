"""DICOM-SEG out with highdicom, read back with pydicom alone and with highdicom; DICOM-SEG labels in."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_synth import OBLIQUE_IOP, random_stored, write_series
from samadapt.data.dicom_seg import read_dicom_seg, write_dicom_seg
from samadapt.data.dicom_series import read_dicom_series
from samadapt.data.volumes import read_volume_file, read_volumes
from samadapt.errors import ConfigError, DataError
from samadapt.tasks.segment.predict import write_label_volume

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NAMES = ["liver", "spleen", "left kidney"]


def _labels(shape: tuple[int, int, int], *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int16)
    labels[1:4, 1:3, 1:] = 1
    labels[4:, 3:, :2] = 2
    labels[rng.random(shape) < 0.05] = 3
    labels[:, :, 2] = 0  # an empty slice: no frame is stored for it
    return labels


def _labels_from_pydicom(ds: pydicom.Dataset, sop_uids: list[str]) -> np.ndarray:
    """Rebuild the label volume from the raw SEG with pydicom only: per frame, its segment and source slice."""
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    out = np.zeros((len(sop_uids), int(ds.Rows), int(ds.Columns)), dtype=np.int16)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[sop_uids.index(str(source))][frame > 0] = number
    return out.transpose(2, 1, 0)  # [slice, row, col] -> [X, Y, Z]


@pytest.fixture()
def series(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder, random_stored((5, 6, 7), seed=3), iop=OBLIQUE_IOP)
    return folder


def test_written_seg_reads_back_exactly_with_pydicom_and_highdicom(series, tmp_path):
    import highdicom as hd

    _, _, _, datasets = read_dicom_series(series)
    labels = _labels((7, 6, 5))
    out = write_dicom_seg(labels, source=series, out=tmp_path / "out" / "seg.dcm", label_names=NAMES)
    assert out == tmp_path / "out" / "seg.dcm"
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temporary left behind

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    sop_uids = [str(d.SOPInstanceUID) for d in datasets]
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == set(sop_uids)
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == NAMES
    for segment in ds.SegmentSequence:
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"  # SCT Tissue
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "samadapt"
    # each frame sits where its source slice sits; one segment's frames run monotonically through the stack
    # (highdicom sorts them along the slice normal in its own (slice, row, col) right-handed order, i.e. from
    # our last slice to our first)
    for number in (1, 2, 3):
        slices = []
        for f in ds.PerFrameFunctionalGroupsSequence:
            if int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != number:
                continue
            z = sop_uids.index(
                str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            )
            np.testing.assert_allclose(
                [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient],
                [float(v) for v in datasets[z].ImagePositionPatient],
                atol=1e-4,
            )
            slices.append(z)
        assert 2 not in slices and len(slices) > 1
        assert slices in (sorted(slices), sorted(slices, reverse=True))
    np.testing.assert_array_equal(_labels_from_pydicom(ds, sop_uids), labels)

    seg = hd.seg.segread(out)
    on_source = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(np.asarray(on_source).transpose(2, 1, 0), labels)

    back, names = read_dicom_seg(out, source=series)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, labels)
    assert names == {1: "liver", 2: "spleen", 3: "left kidney"}


def test_seg_geometry_is_the_source_geometry(series, tmp_path):
    import highdicom as hd

    image, affine, _, _ = read_dicom_series(series)
    labels = _labels(image.shape, seed=1)
    labels[:, :, 2] = 1  # every slice holds a segment, so the SEG volume spans the whole series
    out = write_dicom_seg(labels, source=series, out=tmp_path / "seg.dcm", label_names=NAMES)
    vol = hd.seg.segread(out).get_volume(combine_segments=True)  # [slice, row, col], LPS, highdicom's order
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for s, r, c in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        world = lps @ vol.affine @ np.array([s, r, c, 1.0])
        x, y, z = (int(round(v)) for v in np.linalg.solve(affine, world)[:3])
        assert labels[x, y, z] == vol.array[s, r, c]


def test_nifti_and_dicom_seg_outputs_agree(series, tmp_path):
    image, affine, _ = read_volume_file(series)
    reference = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(reference))  # the series converted with our affine
    labels = _labels(image.shape, seed=2)
    nifti_out = write_label_volume(reference, labels, tmp_path / "pred.nii.gz")
    seg_out = write_dicom_seg(labels, source=series, out=tmp_path / "pred.dcm", label_names=NAMES)
    from_nifti, nifti_affine, _ = read_volume_file(nifti_out, label=True)
    from_seg, _ = read_dicom_seg(seg_out, source=series)
    np.testing.assert_array_equal(from_nifti.astype(np.int16), from_seg)
    np.testing.assert_allclose(nifti_affine, affine, atol=1e-5)


def test_generic_layout_with_dicom_seg_labels(tmp_path):
    root = tmp_path / "data"
    for k, case in enumerate(["case_a", "case_b", "case_c"]):
        write_series(root / "images" / case, random_stored((3, 5, 4), seed=k), seed=k)
        _, _, _, datasets = read_dicom_series(root / "images" / case)
        labels = np.zeros((4, 5, 3), dtype=np.int16)
        labels[k : k + 2, 1:4, :] = 1
        labels[0, 0, 0] = 2
        write_dicom_seg(
            labels, source=datasets, out=root / "labels" / f"{case}.dcm", label_names=["RV", "LV"]
        )
    dataset = read_volumes(root)
    assert dataset.layout == "generic" and dataset.label_names == ("RV", "LV")
    assert [c.id for c in dataset.cases] == ["case_a", "case_b", "case_c"]
    vol = dataset.cases[1].load()
    assert vol.image.shape == vol.label.shape == (4, 5, 3)
    assert vol.label.dtype == np.int16 and int(vol.label[1, 1, 0]) == 1 and int(vol.label[0, 0, 0]) == 2
    # dataset.json wins over the segment labels
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    assert read_volumes(root).label_names == ("a", "b")


def test_segment_labels_must_agree_across_cases(tmp_path):
    root = tmp_path / "data"
    for k, names in enumerate((["RV", "LV"], ["LV", "RV"])):
        write_series(root / "images" / f"c{k}", random_stored((2, 4, 4), seed=k), seed=k)
        labels = np.ones((4, 4, 2), dtype=np.int16)
        write_dicom_seg(
            labels, source=root / "images" / f"c{k}", out=root / "labels" / f"c{k}.dcm", label_names=names
        )
    with pytest.raises(DataError, match=r"c1\.dcm: segment 1 is 'LV' but c0\.dcm calls it 'RV'"):
        read_volumes(root)


def test_seg_of_another_series_is_refused(series, tmp_path):
    other = tmp_path / "other"
    write_series(other, random_stored((5, 6, 7), seed=9), iop=OBLIQUE_IOP)
    out = write_dicom_seg(_labels((7, 6, 5)), source=other, out=tmp_path / "seg.dcm", label_names=NAMES)
    with pytest.raises(DataError, match=r"seg\.dcm: FrameOfReferenceUID .* differs from the image series"):
        read_dicom_seg(out, source=series)


def test_write_errors_leave_nothing_behind(series, tmp_path):
    out = tmp_path / "o" / "seg.dcm"
    with pytest.raises(DataError, match=r"seg\.dcm: label volume shape \(6, 7, 5\) does not match"):
        write_dicom_seg(np.zeros((6, 7, 5), np.int16), source=series, out=out, label_names=NAMES)
    with pytest.raises(DataError, match=r"label values must lie in 0\.\.3 .* found 0\.\.4"):
        too_high = np.zeros((7, 6, 5), np.int16)
        too_high[3, 2, 1] = 4
        write_dicom_seg(too_high, source=series, out=out, label_names=NAMES)
    with pytest.raises(ConfigError, match="label_names repeat a name"):
        write_dicom_seg(np.zeros((7, 6, 5), np.int16), source=series, out=out, label_names=["a", "a"])
    with pytest.raises(ConfigError, match=r"segment_codes names structures not in label_names: \['heart'\]"):
        write_dicom_seg(
            np.zeros((7, 6, 5), np.int16),
            source=series,
            out=out,
            label_names=NAMES,
            segment_codes={"heart": ()},
        )
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_segment_codes_override(series, tmp_path):
    from pydicom.sr.codedict import codes

    out = write_dicom_seg(
        _labels((7, 6, 5)),
        source=series,
        out=tmp_path / "seg.dcm",
        label_names=NAMES,
        segment_codes={"liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver)},
        algorithm_name="autosam-head",
    )
    liver = pydicom.dcmread(out, stop_before_pixels=True).SegmentSequence[0]
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert liver.SegmentAlgorithmName == "autosam-head"


def test_seg_made_on_another_copy_of_the_scan_is_placed_by_position(series, tmp_path):
    """Same scan re-exported (new series and instance UIDs, same FrameOfReference and geometry): by geometry."""
    _, _, _, datasets = read_dicom_series(series)
    copy = tmp_path / "copy"
    write_series(
        copy,
        random_stored((5, 6, 7), seed=3),
        iop=OBLIQUE_IOP,
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    labels = _labels((7, 6, 5), seed=4)
    out = write_dicom_seg(labels, source=copy, out=tmp_path / "seg.dcm", label_names=NAMES)
    back, _ = read_dicom_seg(out, source=series)
    np.testing.assert_array_equal(back, labels)
    # a grid that the frames do not lie on (other pixel spacing) is refused, not resampled
    other = tmp_path / "other"
    write_series(
        other,
        random_stored((5, 6, 7)),
        iop=OBLIQUE_IOP,
        pixel_spacing=(0.5, 0.5),
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    with pytest.raises(
        DataError, match=r"seg\.dcm: its frames do not lie on the voxel grid of the image series"
    ):
        read_dicom_seg(out, source=other)
