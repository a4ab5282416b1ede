"""DICOM series in: slice order, modality rescale, geometry (RAS affine like our NIfTI reader), errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_synth import OBLIQUE_IOP, random_stored, write_series
from samadapt.data.dicom_series import is_dicom_series_dir, load_dicom_series, read_dicom_series
from samadapt.data.volumes import read_volume_file, read_volumes
from samadapt.errors import DataError

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _dicom_world_ras(ds: pydicom.Dataset, col: int, row: int) -> np.ndarray:
    """The DICOM standard's pixel -> patient formula (PS3.3 C.7.6.2.1.1), then LPS -> RAS."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps = (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + col * col_spacing * iop[:3]
        + row * row_spacing * iop[3:]
    )
    return lps * LPS_TO_RAS


@pytest.mark.parametrize("iop", [((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), OBLIQUE_IOP], ids=["axial", "oblique"])
def test_series_sorted_by_position_rescaled_with_the_dicom_geometry(tmp_path, iop):
    stored = random_stored((6, 5, 7), seed=1)  # [Z, rows, cols]: rows != cols catches a swapped transpose
    paths = write_series(tmp_path / "s", stored, iop=iop, slope=2.0, intercept=-1000.0, slice_step=-3.0)
    image, affine, spacing, datasets = read_dicom_series(tmp_path / "s")
    assert image.dtype == np.float32 and image.shape == (7, 5, 6)
    # write_series wrote slice k at origin + k * (-3) * normal, so ascending along the normal is reverse k
    expected_files = paths[::-1]
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [
        str(pydicom.dcmread(p).SOPInstanceUID) for p in expected_files
    ]
    expected = stored[::-1].transpose(2, 1, 0).astype(np.float32) * 2.0 - 1000.0
    np.testing.assert_array_equal(image, expected)
    assert spacing == pytest.approx((0.9, 0.7, 3.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, z = int(rng.integers(7)), int(rng.integers(5)), int(rng.integers(6))
        world = affine @ np.array([x, y, z, 1.0])
        np.testing.assert_allclose(world[:3], _dicom_world_ras(datasets[z], x, y), atol=1e-4)
    assert np.linalg.det(affine[:3, :3]) > 0  # (col, row, normal) is right-handed, as dcm2niix writes it


def test_matches_highdicom_volume_voxel_for_voxel(tmp_path):
    import highdicom as hd

    stored = random_stored((5, 4, 6), seed=2)
    paths = write_series(tmp_path / "s", stored, iop=OBLIQUE_IOP, slope=1.5, intercept=7.0)
    image, affine, _, _ = read_dicom_series(tmp_path / "s")
    vol = hd.get_volume_from_series([pydicom.dcmread(p) for p in paths])  # [slice, row, col], LPS affine
    n = vol.array.shape[0]
    for s, r, c in [(0, 0, 0), (n - 1, 3, 5), (2, 1, 4), (4, 2, 0)]:
        hd_world = (vol.affine @ np.array([s, r, c, 1.0]))[:3] * LPS_TO_RAS
        # find our slice at that world point, then compare the voxel value too
        ours = np.linalg.solve(affine, np.append(hd_world, 1.0))[:3]
        x, y, z = (int(round(v)) for v in ours)
        np.testing.assert_allclose(ours, [x, y, z], atol=1e-4)
        assert (x, y) == (c, r)
        assert image[x, y, z] == pytest.approx(float(vol.array[s, r, c]))


def test_series_and_its_nifti_conversion_are_the_same_volume(tmp_path):
    stored = random_stored((4, 6, 5), seed=3)
    write_series(tmp_path / "data" / "images" / "case1", stored, iop=OBLIQUE_IOP, suffix=".dcm")
    image, affine, spacing = read_volume_file(tmp_path / "data" / "images" / "case1")
    labels = (image > 500).astype(np.uint8)
    (tmp_path / "data" / "labels").mkdir()
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "data" / "labels" / "case1.nii.gz"))
    nifti_root = tmp_path / "nifti"
    (nifti_root / "images").mkdir(parents=True)
    (nifti_root / "labels").mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(nifti_root / "images" / "case1.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(nifti_root / "labels" / "case1.nii.gz"))

    from_dicom = read_volumes(tmp_path / "data").cases[0].load()
    from_nifti = read_volumes(nifti_root).cases[0].load()
    np.testing.assert_array_equal(from_dicom.image, from_nifti.image)
    np.testing.assert_array_equal(from_dicom.label, from_nifti.label)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
    assert from_dicom.spacing == pytest.approx(from_nifti.spacing, abs=1e-5)
    assert from_dicom.spacing == pytest.approx(spacing)


def test_mr_int16_with_rescale_and_files_that_are_not_dicom(tmp_path):
    stored = np.random.default_rng(4).integers(-500, 500, size=(3, 4, 4)).astype(np.int16)
    write_series(tmp_path / "s", stored, modality="MR", slope=0.5, intercept=10.0)
    (tmp_path / "s" / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"\0" * 10)
    assert is_dicom_series_dir(tmp_path / "s")
    image, _, _, _ = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(image, stored.transpose(2, 1, 0).astype(np.float32) * 0.5 + 10.0)


def test_one_slice_series_uses_the_slice_thickness(tmp_path):
    write_series(tmp_path / "s", random_stored((1, 4, 4)), slice_step=5.0)
    image, affine, spacing, _ = read_dicom_series(tmp_path / "s")
    assert image.shape == (4, 4, 1) and spacing[2] == pytest.approx(5.0)
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(5.0)


def test_two_series_are_refused_by_name_or_chosen_by_uid(tmp_path):
    write_series(tmp_path / "s", random_stored((3, 4, 4)), series_uid="1.2.3.1", seed=1)
    write_series(tmp_path / "s", random_stored((2, 4, 4)), series_uid="1.2.3.2", seed=2)
    with pytest.raises(DataError, match=r"holds 2 series.*1\.2\.3\.1 \(3 files.*1\.2\.3\.2 \(2 files"):
        read_dicom_series(tmp_path / "s")
    image, _, _, datasets = read_dicom_series(tmp_path / "s", series_uid="1.2.3.2")
    assert image.shape[2] == 2 and {str(d.SeriesInstanceUID) for d in datasets} == {"1.2.3.2"}
    with pytest.raises(DataError, match="no series 9.9"):
        read_dicom_series(tmp_path / "s", series_uid="9.9")


def _rewrite(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_no_dicom_files(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("no images here")
    assert not is_dicom_series_dir(tmp_path / "s")
    with pytest.raises(DataError, match=r"s: no DICOM image files"):
        read_dicom_series(tmp_path / "s")


def test_missing_geometry_tag_names_the_file(tmp_path):
    paths = write_series(tmp_path / "s", random_stored((3, 4, 4)))
    _rewrite(paths[1], ImagePositionPatient=None)
    with pytest.raises(DataError, match=rf"{paths[1].name}: missing geometry tags ImagePositionPatient"):
        read_dicom_series(tmp_path / "s")


def test_inconsistent_orientation_and_pixel_spacing(tmp_path):
    paths = write_series(tmp_path / "a", random_stored((3, 4, 4)))
    _rewrite(paths[2], ImageOrientationPatient=[float(v) for v in (*OBLIQUE_IOP[0], *OBLIQUE_IOP[1])])
    with pytest.raises(DataError, match="ImageOrientationPatient differs"):
        read_dicom_series(tmp_path / "a")
    paths = write_series(tmp_path / "b", random_stored((3, 4, 4)))
    _rewrite(paths[0], PixelSpacing=[0.5, 0.5])
    with pytest.raises(DataError, match="PixelSpacing differs"):
        read_dicom_series(tmp_path / "b")


def test_irregular_and_duplicate_slice_positions(tmp_path):
    paths = write_series(tmp_path / "gap", random_stored((4, 4, 4)))
    paths[2].unlink()  # a missing slice
    with pytest.raises(DataError, match="slice spacing is not regular"):
        read_dicom_series(tmp_path / "gap")
    paths = write_series(tmp_path / "dup", random_stored((3, 4, 4)))
    _rewrite(paths[2], ImagePositionPatient=pydicom.dcmread(paths[1]).ImagePositionPatient)
    with pytest.raises(DataError, match="same slice position"):
        read_dicom_series(tmp_path / "dup")


def test_mixed_slice_sizes(tmp_path):
    series_uid, frame_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    write_series(
        tmp_path / "s", random_stored((2, 4, 4)), series_uid=series_uid, frame_of_reference_uid=frame_uid
    )
    write_series(
        tmp_path / "s",
        random_stored((1, 4, 6)),
        series_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        origin=(-100.0, -80.0, 40.0),
        seed=5,
    )
    with pytest.raises(DataError, match=r"slice size 4x6 differs from 4x4|slice size 4x4 differs from 4x6"):
        read_dicom_series(tmp_path / "s")


def test_multi_frame_is_refused(tmp_path):
    paths = write_series(tmp_path / "s", random_stored((2, 4, 4)))
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 4, 4), np.uint16).tobytes()
    ds.save_as(paths[0])
    with pytest.raises(DataError, match=rf"{paths[0].name}: a multi-frame image \(2 frames\)"):
        load_dicom_series(tmp_path / "s")


def test_a_folder_is_not_a_label_volume(tmp_path):
    write_series(tmp_path / "s", random_stored((2, 4, 4)))
    with pytest.raises(DataError, match="a folder cannot be a label volume"):
        read_volume_file(tmp_path / "s", label=True)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_real_scanner_files_match_highdicom(tmp_path, name):
    """Real CT / JPEG-LS compressed MR slices shipped with pydicom, stacked into a 3-slice series."""
    import highdicom as hd
    from pydicom.data import get_testdata_file

    real = pydicom.dcmread(get_testdata_file(name))
    normal = np.cross(
        np.asarray(real.ImageOrientationPatient[:3], float),
        np.asarray(real.ImageOrientationPatient[3:], float),
    )
    series_uid = pydicom.uid.generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for k in (2, 0, 1):  # written out of order, names unrelated to position
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [
            float(v) for v in np.asarray(real.ImagePositionPatient, float) + 4.0 * k * normal
        ]
        ds.save_as(folder / f"IM{(7 * k + 3) % 5}")
    image, affine, spacing, datasets = read_dicom_series(folder)
    assert image.shape == (int(real.Columns), int(real.Rows), 3) and spacing[2] == pytest.approx(4.0)
    vol = hd.get_volume_from_series([pydicom.dcmread(p) for p in sorted(folder.iterdir())])
    np.testing.assert_array_equal(image, vol.array[::-1].transpose(2, 1, 0).astype(np.float32))
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine  # highdicom: [slice, row, col] from the far end
    np.testing.assert_allclose(affine[:, 0], flipped[:, 2], atol=1e-5)
    np.testing.assert_allclose(affine[:, 1], flipped[:, 1], atol=1e-5)
    np.testing.assert_allclose(affine[:, 2], -flipped[:, 0], atol=1e-5)
    np.testing.assert_allclose(affine @ [0, 0, 2, 1], flipped[:, 3], atol=1e-4)


def test_tilted_gantry_stack_is_refused(tmp_path):
    paths = write_series(tmp_path / "s", random_stored((3, 4, 4)))
    for k, path in enumerate(paths):  # shift each slice sideways: a sheared stack
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 1.5 * k, *ds.ImagePositionPatient[1:]]
        ds.save_as(path)
    with pytest.raises(DataError, match="not stacked along their normal"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize("seed", range(4))
def test_random_orientations_spacings_and_steps(tmp_path, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a random rotation's first two columns: row and column dirs
    iop = (tuple(q[:, 0]), tuple(q[:, 1]))
    pixel_spacing = tuple(float(v) for v in rng.uniform(0.3, 2.0, size=2))
    step = float(rng.choice([-1, 1]) * rng.uniform(0.5, 6.0))
    stored = random_stored((4, 3, 5), seed=seed)
    write_series(tmp_path / "s", stored, iop=iop, pixel_spacing=pixel_spacing, slice_step=step, seed=seed)
    image, affine, spacing, datasets = read_dicom_series(tmp_path / "s")
    assert spacing == pytest.approx((pixel_spacing[1], pixel_spacing[0], abs(step)), rel=1e-5)
    order = list(range(4)) if step > 0 else list(range(3, -1, -1))
    np.testing.assert_array_equal(image, stored[order].transpose(2, 1, 0).astype(np.float32) - 1024.0)
    for x, y, z in [(0, 0, 0), (4, 2, 3), (2, 1, 1)]:
        np.testing.assert_allclose(
            (affine @ [x, y, z, 1.0])[:3], _dicom_world_ras(datasets[z], x, y), atol=1e-4
        )
