"""`samadapt train|predict|sweep --task fewshot` through the real CLI entry point, on tiny random-weight models."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from samadapt.cli.main import main
from samadapt.encoders.clip import write_tiny_clip
from samadapt.encoders.masks import write_tiny_sam2
from samadapt.tasks.fewshot.synthetic import write_toy_npz


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_cli")
    clip_config, clip_ckpt = write_tiny_clip(root)
    return {
        "root": root,
        "data": write_toy_npz(root / "toy.npz"),
        "clip": clip_config,
        "clip_ckpt": clip_ckpt,
        "sam2": write_tiny_sam2(root / "tiny_sam2.pt"),
    }


def _masker_flags(f):
    return [
        "--masker", "sam2_hiera_t", "--masker-checkpoint", str(f["sam2"]), "--masker-arch", "tiny",
        "--masker-image-size", "128", "--points-per-side", "4", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--mask-cache", str(f["root"] / "masks"),
    ]  # fmt: skip


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_then_predict_reproduces_test_probabilities(files, tmp_path):
    f = files
    run = tmp_path / "run"
    code = main(
        ["train", "--task", "fewshot", "--data", str(f["data"]), "--method", "medfocus", "--clip", str(f["clip"]),
         "--clip-checkpoint", str(f["clip_ckpt"]), *_masker_flags(f), "--data-fraction", "0.5", "--seed", "3",
         "--epochs", "2", "--class-names", "band,square", "--overlay-alpha", "0.6", "--out", str(run), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["data_fraction"] == 0.5 and 0 <= metrics["test"]["accuracy"] <= 1
    assert yaml.safe_load((run / "config.yaml").read_text())["options"]["overlay"]["alpha"] == 0.6
    # predict on the test images written as PNG files: same probabilities as the run's own predictions
    images = tmp_path / "images"
    images.mkdir()
    test_images = np.load(f["data"])["test_images"]
    for i in range(3):
        Image.fromarray(test_images[i]).save(images / f"case{i}.png")
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(out)]) == 0
    predicted = _read_csv(out / "predictions.csv")
    expected = {r["id"]: r for r in _read_csv(run / "predictions.csv") if r["split"] == "test"}
    assert len(predicted) == 3 and len(list((out / "overlays").glob("*.png"))) == 3
    for i, row in enumerate(predicted):
        ref = expected[f"toy.npz#test/{i}"]
        assert row["predicted"] == ref["predicted"]
        assert abs(float(row["prob_square"]) - float(ref["prob_square"])) < 1e-5


def test_sweep_from_yaml_resumes_and_reports(files, tmp_path):
    f = files
    config = tmp_path / "sweep.yaml"
    out = tmp_path / "sweep"
    config.write_text(
        yaml.safe_dump(
            {"task": "fewshot", "data": str(f["data"]), "clip": str(f["clip"]), "clip-checkpoint": str(f["clip_ckpt"]),
             "methods": ["zero-shot", "linear-probe", "tip-adapter"], "data-fraction": [0.5, 1.0], "seeds": 1,
             "out": str(out), "no-progress": True}
        )
    )  # fmt: skip
    assert main(["sweep", "--config", str(config)]) == 0
    rows = _read_csv(out / "results.csv")
    assert len(rows) == 6 and {r["method"] for r in rows} == {"zero-shot", "linear-probe", "tip-adapter"}
    assert {float(r["fraction"]) for r in rows} == {0.5, 1.0}
    for name in ("summary.md", "report.html", "label_efficiency_accuracy.png", "label_efficiency_auc.png"):
        assert (out / name).is_file(), name
    # zero-shot ignores the training labels: both fractions give the same test numbers
    zs = [r for r in rows if r["method"] == "zero-shot"]
    assert zs[0]["test_accuracy"] == zs[1]["test_accuracy"]
    done = out / "linear-probe" / "frac0.5" / "seed0" / "metrics.json"
    before = done.stat().st_mtime_ns
    assert main(["sweep", "--config", str(config)]) == 0  # resumes: nothing retrained
    assert done.stat().st_mtime_ns == before


def test_user_errors_are_one_line(files, tmp_path, capsys):
    f = files
    base = [
        "train",
        "--task",
        "fewshot",
        "--data",
        str(f["data"]),
        "--clip",
        str(f["clip"]),
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--method", "nope"]) == 2
    assert "unknown few-shot method 'nope'" in capsys.readouterr().err
    assert main([*base, "--method", "medfocus"]) == 2
    assert "--masker-checkpoint" in capsys.readouterr().err
