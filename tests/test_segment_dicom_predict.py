"""`samadapt predict --task segment` on a DICOM series: NIfTI out and DICOM-SEG out carry the same mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_synth import random_stored, write_series
from samadapt.cli.main import main
from samadapt.data.dicom_seg import read_dicom_seg
from samadapt.tasks.segment.synthetic import write_acdc_like


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_predict")
    data = write_acdc_like(root / "acdc", patients=4, shape=(32, 28, 3))
    run = root / "run"
    argv = ["train", "--task", "segment", "--data", str(data), "--method", "unet", "--unet-image-size", "32",
            "--unet-channels", "8,16", "--epochs", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    return root, run


def test_dicom_series_in_nifti_and_dicom_seg_out_agree(unet_run) -> None:
    root, run = unet_run
    series = root / "series"
    paths = write_series(series, random_stored((3, 28, 32), seed=1))
    nifti, seg = root / "pred.nii.gz", root / "pred.dcm"
    assert (
        main(["predict", "--run", str(run), "--input", str(series), "--out", str(nifti), "--no-progress"])
        == 0
    )
    assert main(["predict", "--run", str(run), "--input", str(series), "--out", str(seg), "--output-format",
                 "dicom-seg", "--no-progress"]) == 0  # fmt: skip
    from_nifti = np.asarray(nib.load(str(nifti)).dataobj)
    from_seg, names = read_dicom_seg(seg, source=series)
    assert from_seg.shape == from_nifti.shape == (32, 28, 3)
    np.testing.assert_array_equal(from_seg, from_nifti)
    assert list(names.values()) == ["RV", "MYO", "LV"]
    ds = pydicom.dcmread(seg)
    assert ds.Modality == "SEG"
    source_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid


def test_dicom_seg_needs_a_series_input(unet_run, capsys) -> None:
    root, run = unet_run
    volume = next((root / "acdc").glob("patient*/patient*_frame01.nii.gz"))
    rc = main(["predict", "--run", str(run), "--input", str(volume), "--out", str(root / "x.dcm")])
    assert rc == 2 and "DICOM series folder" in capsys.readouterr().err
