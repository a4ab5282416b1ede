"""`samadapt train|sweep|predict --task classify` end to end on small generated data (tiny random-weight SAM)."""

from __future__ import annotations

import json
import os
import re
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
        *TINY, "--backbone-image-size", "48", "--epochs", "10", "--batch-size", "20", "--lr", "2e-3", "--slca-window", "2",
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


def test_predict_writes_csv_and_overlays(slca_run, tmp_path, real_images, capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(real_images["retina"][::8, ::8]).save(folder / "fundus.png")
    Image.fromarray(real_images["cell"]).save(folder / "cell.png")
    capsys.readouterr()
    rc = main(["predict", "--run", str(slca_run), "--images", str(folder), "--out", str(tmp_path / "pred")])
    assert rc == 0
    assert "2/2" in capsys.readouterr().err  # embedding new images shows a progress bar
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
        f"task: classify\ndata: {lesions}\nmethod: {method}\nbackbone: resnet18\nbackbone-image-size: 32\nepochs: 2\n"
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
        "sweep", "--config", str(config), "--seeds", "1", "--backbone", "resnet18", *TINY, "--backbone-image-size", "32",
        "--epochs", "1", "--slca-window", "2", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    rows = read_csv_rows(out / "results.csv")
    assert sorted((r["method"], float(r["budget"])) for r in rows) == sorted(
        (m, f) for m in ("slca", "baseline", "linear-probe") for f in (0.2, 1.0)
    )
    assert list(rows[0])[:6] == ["method", "budget", "seed", "n_train", "run", "seconds"]
    assert {"accuracy", "auc", "balanced_accuracy", "f1_macro"} <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "| method | budget | n | accuracy |" in summary and "±" in summary
    with Image.open(out / "label_efficiency.png") as im:
        assert im.format == "PNG"
    assert (out / "report.html").is_file()
    # resume: finished runs are kept, a lost one and a half-written one are redone
    kept = (out / "runs" / "slca_b1_s0" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "runs" / "baseline_b0.2_s0")
    (out / "runs" / ".linear-probe_b1_s0.partial").mkdir()
    (out / "runs" / "linear-probe_b1_s0" / "metrics.json").unlink()
    assert main(args) == 0
    assert (out / "runs" / "slca_b1_s0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (out / "runs" / "baseline_b0.2_s0" / "metrics.json").is_file()
    assert (out / "runs" / "linear-probe_b1_s0" / "metrics.json").is_file()
    assert not (out / "runs" / ".linear-probe_b1_s0.partial").exists()
    assert len(read_csv_rows(out / "results.csv")) == 6


def test_deprecated_image_size_flag_still_works_and_names_the_new_flag(tmp_path, monkeypatch):
    import samadapt.engine.lifecycle as lifecycle

    seen = {}
    monkeypatch.setattr(lifecycle, "execute_run", lambda task, cfg, **kw: seen.setdefault("cfg", cfg) and {})
    argv = ["train", "--task", "classify", "--data", "x", "--image-size", "96", "--out", str(tmp_path / "r")]
    with pytest.warns(FutureWarning, match="--image-size is deprecated; use --backbone-image-size"):
        assert main(argv) == 0
    assert seen["cfg"].backbone_image_size == 96 and seen["cfg"].encoder_image_size is None


def test_bad_flags_raise_one_line_errors(lesions, tmp_path, capsys):
    assert (
        main(
            ["train", "--task", "classify", "--data", str(lesions), "--method", "svm", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "command line: --method = 'svm': Input should be 'slca'" in capsys.readouterr().err
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
        "--backbone", "resnet18", *TINY, "--backbone-image-size", "32", "--epochs", "2", "--batch-size", "12",
        "--slca-window", "2", "--label-fraction", "0.5", "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 2 and metrics["n_train"] == 50


# ---- a damaged run folder through `predict`: one line naming the file, no predictions.csv ----------------------


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    from corpus import medmnist_arrays

    root = tmp_path_factory.mktemp("probe")
    np.savez(root / "ok.npz", **medmnist_arrays(n=6))
    rc = main(["train", "--task", "classify", "--data", str(root / "ok.npz"), "--method", "linear-probe", *TINY,
               "--epochs", "1", "--store", str(root / "store"), "--out", str(root / "run")])  # fmt: skip
    assert rc == 0
    return root / "run"


def _predict_error(run: Path, tmp_path: Path, capsys) -> str:
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(image)
    capsys.readouterr()
    rc = main(["predict", "--run", str(run), "--images", str(image), "--out", str(tmp_path / "pred"),
               "--store", str(tmp_path / "store"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "RANDOM weights" not in line]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("samadapt: error: "), err
    assert "Traceback" not in err
    assert not (tmp_path / "pred" / "predictions.csv").exists()
    return lines[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda text: text.replace("class_names:", "names:"),
            r"config\.yaml: recorded\.class_names must list",
        ),
        (lambda text: text.replace("method: linear-probe\n", ""), r"config\.yaml: missing key\(s\) 'method'"),
        (
            lambda text: text.replace("epochs: 1\n", "epochs: many\n"),
            r"config\.yaml: key 'epochs' = 'many': .*integer",
        ),
        (
            lambda text: text.replace("lr: 0.0003\n", "lr: .nan\n"),
            r"config\.yaml: key 'lr' = nan: must be a finite",
        ),
        (lambda text: text + "surprise: 1\n", r"config\.yaml: unknown classify setting"),
        (lambda text: "task: classify\n- a list\n", r"config\.yaml: not valid YAML"),
    ],
    ids=["no_class_names", "no_method", "epochs_text", "lr_nan", "unknown_key", "not_yaml"],
)
def test_predict_refuses_a_damaged_run_config(probe_run, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    shutil.copytree(probe_run, run)
    config = run / "config.yaml"
    config.write_text(edit(config.read_text()))
    line = _predict_error(run, tmp_path, capsys)
    assert str(config) in line or "config.yaml" in line, line
    assert re.search(message, line), line


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        ("coef", lambda t: t[:, :-3], "linear-probe weights do not fit the run"),
        ("mean", lambda t: t[None], "linear-probe weights do not fit the run"),
        ("intercept", lambda t: t.repeat(3), "linear-probe weights do not fit the run"),
        ("coef", None, "not linear-probe weights .missing coef"),
        ("scale", lambda t: t * float("nan"), "NaN or Inf"),
    ],
    ids=["coef_features", "mean_2d", "intercept_3", "no_coef", "nan_scale"],
)
def test_predict_refuses_linear_probe_weights_of_another_shape(
    probe_run, tmp_path, capsys, tensor, value, message
):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(probe_run, run)
    weights = load_weights(run / "model.safetensors")
    if value is None:
        weights.pop(tensor)
    else:
        weights[tensor] = value(weights[tensor]).contiguous()
    save_file(weights, str(run / "model.safetensors"))
    line = _predict_error(run, tmp_path, capsys)
    assert "model.safetensors" in line and re.search(message, line), line


def test_predict_with_an_intact_probe_run_still_works(probe_run, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(image)
    rc = main(["predict", "--run", str(probe_run), "--images", str(image), "--out", str(tmp_path / "pred"),
               "--store", str(tmp_path / "store")])  # fmt: skip
    assert rc == 0 and len(read_csv_rows(tmp_path / "pred" / "predictions.csv")) == 1
