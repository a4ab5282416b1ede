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
    assert metrics["seed"] == 3 and metrics["data_fraction"] == 0.5 and metrics["budget"] == 0.5
    test_rows = [r for r in _read_csv(run / "predictions.csv") if r["split"] == "test"]
    assert metrics["n_test"] == len(test_rows) > 0
    assert metrics["test"]["accuracy"] == pytest.approx(
        np.mean([r["true"] == r["predicted"] for r in test_rows])
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["overlay_alpha"] == 0.6 and saved["method"] == "medfocus" and saved["seed"] == 3
    assert saved["recorded"]["class_names"] == ["band", "square"]
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
             "out": str(out), "progress": False}
        )
    )  # fmt: skip
    assert main(["sweep", "--config", str(config)]) == 0
    rows = _read_csv(out / "results.csv")
    assert len(rows) == 6 and {r["method"] for r in rows} == {"zero-shot", "linear-probe", "tip-adapter"}
    assert {float(r["budget"]) for r in rows} == {0.5, 1.0}
    assert list(rows[0])[:6] == ["method", "budget", "seed", "n_train", "run", "seconds"]
    for name in ("summary.md", "report.html", "label_efficiency_accuracy.png", "label_efficiency_auc.png"):
        assert (out / name).is_file(), name
    # zero-shot ignores the training labels: both fractions give the same test numbers
    zs = [r for r in rows if r["method"] == "zero-shot"]
    assert zs[0]["accuracy"] == zs[1]["accuracy"] and zs[0]["auc"] == zs[1]["auc"]
    probe = {float(r["budget"]): int(r["n_train"]) for r in rows if r["method"] == "linear-probe"}
    assert probe[0.5] < probe[1.0]
    assert {r["run"] for r in rows} >= {"runs/linear-probe_b0.5_s0", "runs/zero-shot_b1_s0"}
    done = out / "runs" / "linear-probe_b0.5_s0" / "metrics.json"
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
    assert "command line: --method = 'nope': Input should be" in capsys.readouterr().err
    assert main([*base, "--method", "medfocus"]) == 2
    assert "--masker-checkpoint" in capsys.readouterr().err


def _train_argv(f, out, *extra):
    return ["train", "--task", "fewshot", "--data", str(f["data"]), "--clip", str(f["clip"]), "--clip-checkpoint",
            str(f["clip_ckpt"]), *_masker_flags(f), "--out", str(out), "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def medfocus_run(files, tmp_path_factory):
    run = tmp_path_factory.mktemp("medfocus_run") / "run"
    argv = _train_argv(files, run, "--method", "medfocus", "--epochs", "1", "--data-fraction", "0.5")
    assert main(argv) == 0
    return run


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("samadapt: error: "), lines
    return lines[0]


def _drop(config: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config[key]
    del config[last]


@pytest.mark.parametrize(
    "key",
    ["method", "recorded.class_names", "epochs", "clip", "recorded.clip_identity", "recorded.clip_identity.quick_gelu",
     "recorded.masker_identity", "recorded.masker_identity.image_size", "points_per_side", "masker", "surprise+",
     "task"],
)  # fmt: skip
def test_predict_with_a_broken_run_config_is_one_line_naming_it(files, medfocus_run, tmp_path, capsys, key):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        shutil.copy(medfocus_run / name, run / name)
    config = yaml.safe_load((run / "config.yaml").read_text())
    if key.endswith("+"):  # a key this version does not know
        config[key[:-1]] = 1
    else:
        _drop(config, key)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.load(f"{files['data']}")["test_images"][0]).save(images / "a.png")
    capsys.readouterr()
    argv = [
        "predict",
        "--run",
        str(run),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "pred"),
        "--no-progress",
    ]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert str(run / "config.yaml") in line, line
    assert key.rstrip("+").rsplit(".", 1)[-1] in line, line  # names the key that is wrong
    assert not (tmp_path / "pred" / "predictions.csv").exists()


class _Killed(Exception):
    pass


def test_train_resume_continues_and_refuses_other_settings(files, tmp_path, capsys, monkeypatch, caplog):
    import samadapt.engine.lifecycle as run_module
    import samadapt.tasks.fewshot.methods as methods_module

    # --coop-epochs as given (until the CLI exposes --coop-schedule fixed; by default CoOp's table by shots)
    monkeypatch.setattr(methods_module, "coop_epochs", lambda shots, options: options.coop_epochs)
    run, clean = tmp_path / "run", tmp_path / "clean"
    argv = ["--method", "coop", "--coop-epochs", "4", "--coop-n-ctx", "2", "--batch-size", "8"]
    assert main(_train_argv(files, clean, *argv)) == 0
    real = run_module.write_run

    def die(*args, **kwargs):
        raise _Killed  # training finished, killed before the outputs: the resume state is all that is left

    monkeypatch.setattr(run_module, "write_run", die)
    with pytest.raises(_Killed):
        main(_train_argv(files, run, *argv))
    assert (tmp_path / ".run.partial" / ".resume" / "state.json").is_file() and not run.exists()
    monkeypatch.setattr(run_module, "write_run", real)
    capsys.readouterr()
    assert main(_train_argv(files, run, *argv, "--coop-lr", "0.01", "--resume")) == 2
    line = _one_line(capsys)
    assert "state.json" in line and "coop_lr" in line, line
    with caplog.at_level("INFO"):
        assert main(_train_argv(files, run, *argv, "--resume")) == 0
    assert "resuming coop after epoch 3" in caplog.text
    assert not (run / ".resume").exists() and not (tmp_path / ".run.partial").exists()
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (run, clean))
    timeless = [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in (a, b)]
    assert timeless[0] == timeless[1]


def test_training_free_methods_rerun_under_resume(files, tmp_path):
    assert main(_train_argv(files, tmp_path / "run", "--method", "tip-adapter", "--resume")) == 0
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / ".resume").exists()
