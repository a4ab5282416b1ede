"""End to end on generated ACDC-style volumes: train (tiny random encoder), evaluate, predict, sweep."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from samadapt.cli.main import main
from samadapt.data.volumes import read_volumes
from samadapt.evaluation.segmentation import volume_scores
from samadapt.tasks.segment.synthetic import write_acdc_like

pytestmark = pytest.mark.filterwarnings("ignore::samadapt.encoders.RandomWeightsWarning")

TINY = ["--encoder", "sam_vit_b", "--encoder-arch", "tiny", "--encoder-image-size", "128", "--no-progress"]


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return write_acdc_like(
        tmp_path_factory.mktemp("acdc"), patients=6, shape=(64, 56, 4), spacing=(1.4, 1.4, 8.0)
    )


@pytest.fixture(scope="module")
def autosam_run(acdc, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    run = base / "autosam"
    rc = main(["train", "--task", "segment", "--data", str(acdc), "--method", "autosam", *TINY, "--epochs", "6",
               "--aug-views", "1", "--store", str(base / "store"), "--out", str(run)])  # fmt: skip
    assert rc == 0
    return run


def _history(run):
    with open(run / "history.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


def test_autosam_training_lowers_the_loss_and_beats_constant_predictions(acdc, autosam_run):
    losses = _history(autosam_run)
    assert min(losses[1:]) < 0.7 * losses[0]
    metrics = json.loads((autosam_run / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test["dice"]) == set(test["hd95"]) == {"RV", "MYO", "LV"}
    assert test["num_volumes"] == 2 and metrics["train_volumes"] == 4
    # Reference: the best a constant prediction (every voxel one class) reaches on the same test volumes.
    ds = read_volumes(acdc)
    test_patients = json.loads((autosam_run / "splits.json").read_text())["test"]
    volumes = [c.load() for c in ds.cases_of(test_patients)]
    constant = max(
        np.mean([np.mean(volume_scores(np.full_like(v.label, k), v.label, spacing=v.spacing, num_classes=4)[0])
                 for v in volumes])
        for k in range(4)
    )  # fmt: skip
    assert test["dice_mean"] > constant + 0.3
    assert test["hd95_mean"] > 0
    for name in (
        "model.safetensors",
        "config.yaml",
        "predictions.csv",
        "per_volume.csv",
        "overlays.png",
        "report.html",
        "training_curves.png",
    ):
        assert (autosam_run / name).is_file(), name


def test_predict_writes_the_input_shape_and_affine(acdc, autosam_run, tmp_path):
    test_patient = json.loads((autosam_run / "splits.json").read_text())["test"][0]
    case = next(c for c in read_volumes(acdc).cases if c.patient == test_patient)
    out = tmp_path / "mask.nii.gz"
    assert (
        main(["predict", "--run", str(autosam_run), "--input", str(case.image_path), "--out", str(out)]) == 0
    )
    ref, pred = nib.load(str(case.image_path)), nib.load(str(out))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    np.testing.assert_allclose(pred.header.get_zooms(), ref.header.get_zooms())
    labels = np.asarray(pred.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
    # The same Dice as the run's own evaluation of that volume (embedding on the fly vs. from the store).
    volume = case.load()
    dice, _ = volume_scores(labels, volume.label, spacing=volume.spacing, num_classes=4)
    with open(autosam_run / "per_volume.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["case"] == case.id and r["split"] == "test")
    assert dice == pytest.approx([float(row[f"dice_{n}"]) for n in ("RV", "MYO", "LV")], abs=0.02)


@pytest.mark.parametrize("head", ["linear", "unet"])
def test_other_heads_train_and_evaluate(acdc, head, tmp_path):
    run = tmp_path / head
    rc = main(["train", "--task", "segment", "--data", str(acdc), "--method", head, *TINY, "--epochs", "4",
               "--aug-views", "0", "--unet-channels", "8,16,32", "--train-volumes", "2",
               "--store", str(tmp_path / "store"), "--out", str(run)])  # fmt: skip
    assert rc == 0
    losses = _history(run)
    assert losses[-1] < losses[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_volumes"] == 2 and metrics["head"] == head and metrics["method"] == head
    # the test block is the mean of the per-volume rows of predictions.csv
    with open(run / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert len(rows) == metrics["test"]["num_volumes"] == 2
    per_volume = [np.mean([float(r[f"dice_{n}"]) for n in ("RV", "MYO", "LV")]) for r in rows]
    assert metrics["test"]["dice_mean"] == pytest.approx(float(np.mean(per_volume)), abs=1e-4)


def test_sweep_writes_a_table_and_resumes(acdc, tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"task: segment\ndata: {acdc}\nmethods: [linear]\ntrain-volumes: [1, all]\nepochs: 2\naug-views: 0\n"
        f"encoder: sam_vit_b\nencoder-arch: tiny\nencoder-image-size: 128\nprogress: false\n"
        f"out: {tmp_path / 'sweep'}\n"
    )
    assert main(["sweep", "--config", str(cfg)]) == 0
    out = tmp_path / "sweep"
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["budget"], r["run"]) for r in rows] == [
        ("linear", "1", "runs/linear_b1_s0"),
        ("linear", "4", "runs/linear_b-all_s0"),
    ]
    assert {"dice_mean", "hd95_mean", "dice.RV", "hd95.LV"} <= set(rows[0])
    assert (out / "label_efficiency_dice_mean.png").is_file() and (
        out / "label_efficiency_hd95_mean.png"
    ).is_file()
    assert "dice_mean" in (out / "summary.md").read_text() and (out / "report.html").is_file()
    stamp = (out / "runs" / "linear_b1_s0" / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", "--config", str(cfg)]) == 0
    assert (out / "runs" / "linear_b1_s0" / "metrics.json").stat().st_mtime_ns == stamp


def test_too_many_train_volumes_is_a_one_line_error(acdc, tmp_path, capsys):
    rc = main(["train", "--task", "segment", "--data", str(acdc), "--method", "unet", *TINY, "--train-volumes", "9",
               "--out", str(tmp_path / "r")])  # fmt: skip
    assert rc == 2
    assert "--train-volumes must be between 1 and 4" in capsys.readouterr().err


def test_online_encoder_takes_volumes_of_different_in_plane_sizes(tmp_path):
    # Real ACDC patients differ in in-plane size (e.g. 216 x 256, 256 x 232): raw slices cannot be stacked.
    data = write_acdc_like(tmp_path / "data", patients=5, shape=(40, 36, 2))
    write_acdc_like(tmp_path / "other", patients=3, shape=(30, 44, 2), seed=1)
    for pid in ("patient001", "patient003"):
        for f in (tmp_path / "data" / pid).iterdir():
            f.unlink()
        for f in (tmp_path / "other" / pid).iterdir():
            (data / pid / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "run"
    rc = main(["train", "--task", "segment", "--data", str(data), "--method", "linear", *TINY, "--epochs", "1",
               "--batch-size", "16", "--aug-views", "1", "--online-encoder", "--store", str(tmp_path / "store"),
               "--out", str(run)])  # fmt: skip
    assert rc == 0
    train = set(json.loads((run / "splits.json").read_text())["train_used"])
    other = {"patient001", "patient003"}
    assert train & other and train - other  # one batch of 12 slices holds both sizes
    assert json.loads((run / "metrics.json").read_text())["train_slices"] == 12


def test_sweep_runs_from_flags_alone_with_the_deprecated_heads_flag(acdc, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "segment", "--data", str(acdc), "--heads", "linear", "--train-volumes", "1,9",
            *TINY, "--epochs", "1", "--aug-views", "0", "--store", str(tmp_path / "store"), "--out", str(out)]  # fmt: skip
    with pytest.warns(FutureWarning, match="--heads is deprecated; use --methods"):
        assert main(argv) == 0
    with open(out / "results.csv") as fh:  # 9 > the 4 training patients: skipped, the sweep goes on
        assert [(r["method"], r["budget"]) for r in csv.DictReader(fh)] == [("linear", "1")]
    assert (out / "summary.md").is_file() and (out / "label_efficiency_dice_mean.png").is_file()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["linear_b1_s0"]


def test_deprecated_head_and_image_size_flags_name_the_new_ones(acdc, tmp_path, monkeypatch):
    import samadapt.engine.lifecycle as lifecycle

    seen = {}
    monkeypatch.setattr(lifecycle, "execute_run", lambda task, cfg, **kw: seen.setdefault("cfg", cfg) and {})
    argv = ["train", "--task", "segment", "--data", str(acdc), "--head", "unet", "--image-size", "256",
            "--out", str(tmp_path / "r")]  # fmt: skip
    with pytest.warns(FutureWarning) as caught:
        assert main(argv) == 0
    messages = [str(w.message) for w in caught]
    assert any("--head is deprecated; use --method" in m for m in messages), messages
    assert any("--image-size is deprecated; use --encoder-image-size" in m for m in messages), messages
    assert seen["cfg"].method == "unet" and seen["cfg"].encoder_image_size == 256
