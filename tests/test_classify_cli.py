"""`samadapt train|sweep|predict --task classify` end to end on small generated data (tiny random-weight SAM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samadapt.cli.main import main
from samadapt.reports import read_csv_rows
from samadapt.tasks.classify.synthetic import make_lesion_dataset
from samadapt.training import load_weights

RUN_FILES = (
    "config.yaml", "metrics.json", "predictions.csv", "model.safetensors",
    "confusion_matrix.png", "roc.png", "training_curves.png", "report.html",
)  # fmt: skip
TINY = ["--encoder", "sam_vit_b", "--encoder-arch", "tiny", "--encoder-image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lesions")
    return make_lesion_dataset(
        root / "lesions.npz", n_train=100, n_val=30, n_test=40, size=48, lesion_contrast=0.6
    )


@pytest.fixture(scope="module")
def slca_run(lesions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "slca"
    rc = main([
        "train", "--task", "classify", "--data", str(lesions), "--method", "slca", "--backbone", "resnet18",
        *TINY, "--image-size", "48", "--epochs", "10", "--batch-size", "20", "--lr", "2e-3", "--slca-window", "2",
        "--store", str(out.parent / "store"), "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    return out


def test_train_writes_every_file_and_learns(slca_run):
    for name in RUN_FILES:
        assert (slca_run / name).is_file(), name
    metrics = json.loads((slca_run / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "balanced_accuracy", "auc", "f1_macro", "loss"}
    assert metrics["n_train"] == 100 and metrics["method"] == "slca" and "val" in metrics
    assert metrics["test"]["accuracy"] >= 0.75 and metrics["test"]["auc"] >= 0.8  # chance: 0.5
    rows = read_csv_rows(slca_run / "predictions.csv")
    assert len(rows) == 70 and {r["split"] for r in rows} == {"val", "test"}
    assert abs(float(rows[0]["prob_0"]) + float(rows[0]["prob_1"]) - 1) < 1e-5
    assert any(k.startswith("slca.") for k in load_weights(slca_run / "model.safetensors"))
    assert "data:image/png;base64," in (slca_run / "report.html").read_text()


def test_predict_writes_csv_and_overlays(slca_run, tmp_path, real_images):
    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(real_images["retina"][::8, ::8]).save(folder / "fundus.png")
    Image.fromarray(real_images["cell"]).save(folder / "cell.png")
    rc = main(["predict", "--run", str(slca_run), "--images", str(folder), "--out", str(tmp_path / "pred")])
    assert rc == 0
    rows = read_csv_rows(tmp_path / "pred" / "predictions.csv")
    assert len(rows) == 2 and all(r["predicted"] in ("0", "1") for r in rows)
    for name, image in (("fundus", real_images["retina"][::8, ::8]), ("cell", real_images["cell"])):
        with Image.open(tmp_path / "pred" / "overlays" / f"{name}.png") as im:
            assert im.size == (image.shape[1], image.shape[0])


@pytest.mark.parametrize(
    ("method", "extra"), [("baseline", ""), ("slca", "slca-window: 2\nsam-feature: 1\n")]
)
def test_training_is_deterministic_and_config_file_works(lesions, tmp_path, method, extra):
    """Same seed, same weights and metrics (slca: SAM embedded afresh per run, from an intermediate block,
    flips applied to image and SAM grid)."""
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"task: classify\ndata: {lesions}\nmethod: {method}\nbackbone: resnet18\nimage-size: 32\nepochs: 2\n"
        f"batch_size: 16\nlabel_fraction: 0.3\n{extra}"
    )
    for name in ("a", "b"):
        assert main(["train", "--config", str(config), *TINY, "--out", str(tmp_path / name)]) == 0
    wa, wb = (
        load_weights(tmp_path / "a" / "model.safetensors"),
        load_weights(tmp_path / "b" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["n_train"] == 30
    assert metrics["test"] == json.loads((tmp_path / "b" / "metrics.json").read_text())["test"]
    assert any(k.startswith("slca.") for k in wa) == (method == "slca")


def test_sweep_table_plot_and_resume(lesions, tmp_path):
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"task: classify\ndata: {lesions}\nmethods: [slca, baseline, linear-probe]\nlabel-fractions: [0.2, 1.0]\n"
    )
    args = [
        "sweep", "--config", str(config), "--seeds", "1", "--backbone", "resnet18", *TINY, "--image-size", "32",
        "--epochs", "1", "--slca-window", "2", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    rows = read_csv_rows(out / "results.csv")
    assert sorted((r["method"], float(r["fraction"])) for r in rows) == sorted(
        (m, f) for m in ("slca", "baseline", "linear-probe") for f in (0.2, 1.0)
    )
    assert {"seed", "accuracy", "auc", "balanced_accuracy", "f1_macro"} <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "| method | fraction | n | accuracy |" in summary and "±" in summary
    with Image.open(out / "label_efficiency.png") as im:
        assert im.format == "PNG"
    assert (out / "report.html").is_file()
    # resume: finished runs are kept, a lost one and a half-written one are redone
    kept = (out / "runs" / "slca_f1_s0" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "runs" / "baseline_f0.2_s0")
    (out / "runs" / ".linear-probe_f1_s0.partial").mkdir()
    (out / "runs" / "linear-probe_f1_s0" / "metrics.json").unlink()
    assert main(args) == 0
    assert (out / "runs" / "slca_f1_s0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (out / "runs" / "baseline_f0.2_s0" / "metrics.json").is_file()
    assert (out / "runs" / "linear-probe_f1_s0" / "metrics.json").is_file()
    assert not (out / "runs" / ".linear-probe_f1_s0.partial").exists()
    assert len(read_csv_rows(out / "results.csv")) == 6


def test_bad_flags_raise_one_line_errors(lesions, tmp_path, capsys):
    assert (
        main(
            ["train", "--task", "classify", "--data", str(lesions), "--method", "svm", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "--method 'svm'" in capsys.readouterr().err
    assert (
        main(["train", "--task", "classify", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)])
        == 2
    )
    assert "none.npz" in capsys.readouterr().err


def test_ddp_two_cpu_processes(lesions, tmp_path):
    """torchrun with 2 processes on gloo: the loop syncs gradients and only rank 0 writes the run.

    50 labels -> 25 per rank, batch 12: a last per-rank batch of one sample is dropped (BatchNorm on the 1x1
    layer4 grid at 32 px cannot train on it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        "-m", "samadapt", "train", "--task", "classify", "--data", str(lesions), "--method", "slca",
        "--backbone", "resnet18", *TINY, "--image-size", "32", "--epochs", "2", "--batch-size", "12",
        "--slca-window", "2", "--label-fraction", "0.5", "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 2 and metrics["n_train"] == 50
