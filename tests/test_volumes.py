"""Volume readers (ACDC and generic layouts), intensity windowing and patient-level splits."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from samadapt.data.volumes import read_volumes, split_patients, to_uint8
from samadapt.errors import DataError
from samadapt.tasks.segment.synthetic import write_acdc_like


def test_acdc_layout_reads_ed_es_frames_with_geometry(tmp_path):
    root = write_acdc_like(tmp_path / "acdc", patients=3, shape=(20, 16, 3), spacing=(1.5, 1.25, 9.0))
    # the 4D cine file and an unlabelled extra frame sit beside the frames in the real ACDC release
    nib.save(
        nib.Nifti1Image(np.zeros((20, 16, 3, 5), np.float32), np.eye(4)),
        str(root / "patient001" / "patient001_4d.nii.gz"),
    )
    ds = read_volumes(root)
    assert ds.layout == "acdc"
    assert ds.label_names == ("RV", "MYO", "LV") and ds.num_classes == 4
    assert [c.id for c in ds.cases_of(["patient001"])] == ["patient001_frame01", "patient001_frame10"]
    assert {c.phase for c in ds.cases} == {"ED", "ES"}
    vol = ds.cases[0].load()
    ref = nib.load(str(ds.cases[0].image_path))
    assert vol.image.shape == (20, 16, 3) and vol.label.shape == vol.image.shape
    np.testing.assert_allclose(vol.spacing, (1.5, 1.25, 9.0), rtol=1e-6)
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert set(np.unique(vol.label)) <= {0, 1, 2, 3}


def test_acdc_info_cfg_naming_a_missing_frame_is_a_data_error(tmp_path):
    root = write_acdc_like(tmp_path / "acdc", patients=1, shape=(8, 8, 2))
    (root / "patient001" / "Info.cfg").write_text("ED: 1\nES: 7\n")
    with pytest.raises(DataError, match="Info.cfg: names frame 7"):
        read_volumes(root)


def test_generic_layout_nifti_and_png_with_dataset_json(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    lab = np.zeros((12, 10, 2), np.uint8)
    lab[2:6, 3:7] = 1
    lab[7:9, 1:3] = 2
    nib.save(
        nib.Nifti1Image(
            np.random.default_rng(0).random((12, 10, 2)).astype(np.float32), np.diag([0.7, 0.7, 3, 1])
        ),
        str(tmp_path / "images" / "a.nii.gz"),
    )
    nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 3, 1])), str(tmp_path / "labels" / "a.nii.gz"))
    Image.fromarray((np.random.default_rng(1).random((12, 10)) * 255).astype(np.uint8)).save(
        tmp_path / "images" / "b.png"
    )
    Image.fromarray(lab[:, :, 0]).save(tmp_path / "labels" / "b.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    ds = read_volumes(tmp_path)
    assert ds.layout == "generic" and ds.label_names == ("liver", "tumour")
    assert [c.patient for c in ds.cases] == ["a", "b"]
    a, b = (c.load() for c in ds.cases)
    assert a.spacing == pytest.approx((0.7, 0.7, 3.0)) and a.label.shape == (12, 10, 2)
    assert b.image.shape == (12, 10, 1) and b.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(b.label[:, :, 0], lab[:, :, 0])
    assert read_volumes(tmp_path, label_names=["x", "y"]).label_names == ("x", "y")


def test_generic_layout_without_label_file_names_it(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "images" / "c.png")
    with pytest.raises(DataError, match="c.png: no label file"):
        read_volumes(tmp_path)


def test_to_uint8_windows_per_volume():
    rng = np.random.default_rng(0)
    vol = rng.normal(100.0, 10.0, size=(20, 20, 4)).astype(np.float32)
    vol[0, 0, 0] = 1e6  # one outlier must not squash the contrast of everything else
    u8 = to_uint8(vol)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    assert np.percentile(u8, 50) == pytest.approx(127.5, abs=8)
    assert not to_uint8(np.full((3, 3, 1), 5.0)).any()


def test_split_patients_is_seeded_disjoint_and_complete():
    patients = [f"patient{i:03d}" for i in range(1, 21)]
    a = split_patients(patients, seed=3)
    assert a == split_patients(list(reversed(patients)), seed=3)
    assert a != split_patients(patients, seed=4)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 3, 3)
    assert sorted(a["train"] + a["val"] + a["test"]) == patients
    small = split_patients(patients[:4], seed=0)
    assert min(len(v) for v in small.values()) >= 1
    with pytest.raises(DataError, match="at least 3 patients"):
        split_patients(patients[:2], seed=0)


def test_colour_png_images_become_luminance_and_colour_labels_are_refused(tmp_path):
    from PIL import Image

    from samadapt.data.volumes import read_volume_file

    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 1] = 200  # pure green: channel 0 alone would read as black
    Image.fromarray(rgb).save(tmp_path / "img.png")
    image, affine, spacing = read_volume_file(tmp_path / "img.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    assert image.shape == (6, 8, 1) and np.array_equal(image[:, :, 0], expected) and expected.max() > 100
    grey_as_rgb = np.repeat(np.arange(48, dtype=np.uint8).reshape(6, 8)[..., None] % 4, 3, axis=2)
    Image.fromarray(grey_as_rgb).save(tmp_path / "lab.png")
    label, _, _ = read_volume_file(tmp_path / "lab.png", label=True)
    assert np.array_equal(label[:, :, 0], grey_as_rgb[..., 0])
    Image.fromarray(rgb).save(tmp_path / "colour_lab.png")
    with pytest.raises(DataError, match="colour_lab.png: a colour label PNG"):
        read_volume_file(tmp_path / "colour_lab.png", label=True)
