"""A new task is one module: a `RunConfig` subclass and a `Task` subclass. This minimal task (a nearest-centroid
classifier on generated 2-D points) runs through the real engine: `samadapt train`, `sweep` and `predict`, the
shared run lifecycle, resume-safe run folders and the sweep's tables, exactly as classify, segment and fewshot do."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch

from samadapt.cli.main import main
from samadapt.engine import registry
from samadapt.engine.config import RunConfig, setting
from samadapt.engine.task import Evaluation, Fitted, RunContext, Task


class ToyConfig(RunConfig):
    task = "toy"
    method: Literal["centroid", "prior"] = setting("centroid", "centroid | prior", sweep_flag="--methods")
    fraction: float = setting(1.0, "fraction of the training points", sweep_flag="--budgets")
    shift: float = setting(2.0, "distance between the two classes")


def _points(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, 2)) + shift * y[:, None], y


class ToyTask(Task):
    name = "toy"
    Config = ToyConfig
    methods = ("centroid", "prior")
    budget_field = "fraction"
    headline_metrics = ("accuracy",)
    prepare_fields = ("data", "shift")
    prepared_count = 0

    def prepare(self, cfg, *, progress):
        ToyTask.prepared_count += 1
        return {"train": _points(40, cfg.shift, 0), "test": _points(20, cfg.shift, 1)}

    def fit(self, cfg, prepared, run: RunContext) -> Fitted:
        x, y = prepared["train"]
        n = max(2, int(len(y) * cfg.fraction))
        x, y = x[:n], y[:n]
        if cfg.method == "centroid":
            centres = torch.tensor(np.stack([x[y == c].mean(0) for c in (0, 1)]))
        else:
            centres = torch.zeros(2, 2, dtype=torch.float64)
        return Fitted(weights={"centres": centres}, info={"n_train": n})

    def _predict(self, centres: torch.Tensor, x: np.ndarray) -> np.ndarray:
        return torch.cdist(torch.tensor(x, dtype=torch.float64), centres.double()).argmin(1).numpy()

    def evaluate(self, cfg, prepared, fitted) -> Evaluation:
        x, y = prepared["test"]
        pred = self._predict(fitted.weights["centres"], x)
        rows = [{"id": i, "true": int(t), "predicted": int(p)} for i, (t, p) in enumerate(zip(y, pred))]
        return Evaluation(
            metrics={"val": {}, "test": {"accuracy": float((pred == y).mean())}}, predictions=rows
        )

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--points", required=True, help="CSV of x,y rows")

    def predict(self, cfg, recorded, *, run: Path, args, progress) -> Path:
        from samadapt.training.weights import load_weights

        x = np.loadtxt(args.points, delimiter=",", ndmin=2)
        pred = self._predict(load_weights(run / "model.safetensors")["centres"], x)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        np.savetxt(out / "predictions.csv", pred, fmt="%d")
        return out / "predictions.csv"


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(registry.TASKS, "toy", f"{__name__}:ToyTask")
    ToyTask.prepared_count = 0
    return ToyTask


def test_a_new_task_trains_and_predicts_through_the_engine(toy_task, tmp_path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "toy", "--method", "centroid", "--shift", "4", "--out", str(run)]) == 0
    for name in ("config.yaml", "metrics.json", "predictions.csv", "model.safetensors", "report.html"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9 and metrics["method"] == "centroid" and metrics["budget"] == 1.0
    # the wall time of each stage, for the workflow benchmark and for users who ask where the time went
    stages = metrics["stage_seconds"]
    assert set(stages) == {"prepare", "fit", "evaluate"} and all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= metrics["seconds"] + 0.01  # both rounded
    assert not (tmp_path / ".run.partial").exists(), "the temporary folder is renamed into place"
    points = tmp_path / "points.csv"
    points.write_text("0,0\n4,4\n")
    assert main(["predict", "--run", str(run), "--points", str(points), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "predictions.csv").read_text().split() == ["0", "1"]


def test_a_new_task_sweeps_with_the_shared_tables(toy_task, tmp_path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "toy", "--methods", "centroid,prior", "--budgets", "0.5,1", "--seeds", "2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert toy_task.prepared_count == 1, "runs that share the data prepare it once"
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:7] == ["method", "budget", "seed", "n_train", "run", "seconds", "accuracy"]
    assert len(rows) == 8 and {r["run"] for r in rows} >= {"runs/centroid_b0.5_s0", "runs/prior_b1_s1"}
    summary = (out / "summary.md").read_text()
    assert "| centroid | 0.5 | 2 |" in summary and "±" in summary
    assert (out / "report.html").is_file() and (out / "label_efficiency_accuracy.png").is_file()
    # a restarted sweep skips finished runs: nothing is prepared or trained again
    assert main(argv) == 0
    assert toy_task.prepared_count == 1


def test_one_seed_rows_have_no_std(toy_task, tmp_path) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", "--task", "toy", "--methods", "centroid", "--budgets", "1", "--seeds", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    line = next(r for r in (out / "summary.md").read_text().splitlines() if r.startswith("| centroid"))
    assert "±" not in line and "| 1 |" in line


def test_bad_values_name_the_flag_or_the_file(toy_task, tmp_path, capsys) -> None:
    assert main(["train", "--task", "toy", "--method", "nearest", "--out", str(tmp_path / "r")]) == 2
    assert "--method" in capsys.readouterr().err
    config = tmp_path / "toy.yaml"
    config.write_text("task: toy\nshift: far\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "shift" in err
    config.write_text("task: toy\nshfit: 2\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "unknown toy setting 'shfit'" in capsys.readouterr().err


def test_layers_defaults_file_then_command_line(toy_task, tmp_path) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text("task: toy\nshift: 3.0\nfraction: 0.5\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--fraction", "1.0", "--out", str(run)]) == 0
    from samadapt.engine.config import load_run_config

    cfg, _ = load_run_config(run, ToyConfig)
    assert cfg.shift == 3.0 and cfg.fraction == 1.0, "the file beats the default, the flag beats the file"


def test_fingerprint_leaves_out_where_a_run_executes() -> None:
    cfg: Any = ToyConfig(out="a", device="cpu", shift=1.0)
    assert (
        "out" not in cfg.fingerprint()
        and "device" not in cfg.fingerprint()
        and cfg.fingerprint()["shift"] == 1.0
    )


def test_token_sequence_backbones_are_refused_by_name() -> None:
    from samadapt.errors import ConfigError
    from samadapt.tasks.classify.backbone import build_backbone

    with pytest.raises(ConfigError, match="token sequences"):
        build_backbone("vit_tiny_patch16_224", num_classes=2, image_size=64)


def test_slca_forward_keeps_no_state_on_the_model() -> None:
    """Two SLCA forwards with different SAM inputs, one nested inside the other's hook, each see their own."""
    from samadapt.tasks.classify.backbone import build_backbone, resolve_stages, stage_infos
    from samadapt.tasks.classify.model import SlcaClassifier

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", num_classes=2, image_size=32)
    model = SlcaClassifier(
        backbone=backbone, stages=resolve_stages("all", stage_infos(backbone)), sam_channels=8
    )
    model.eval()
    x, s1, s2 = torch.randn(1, 3, 32, 32), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        alone1, alone2 = model(x, s1), model(x, s2)
        inner: list[torch.Tensor] = []

        def nested(*_: Any) -> None:
            if not inner:
                inner.append(
                    torch.empty(0)
                )  # mark before the nested call: its own layer2 hook must not recurse
                inner[0] = model(x, s2)

        handle = backbone.layer2.register_forward_hook(nested)
        outer = model(x, s1)
        handle.remove()
    torch.testing.assert_close(outer, alone1)
    torch.testing.assert_close(inner[0], alone2)
    assert not hasattr(model, "_attention")


def test_files_that_are_not_images_are_named_not_dropped(tmp_path) -> None:
    from PIL import Image

    from samadapt.data.folders import list_images

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not images: notes.txt"):
        assert list_images(tmp_path) == [tmp_path / "a.png"]


def test_train_spellings_in_a_sweep_are_one_value_axes(toy_task, tmp_path) -> None:
    """`--seed 3` in a sweep is seed 3 (not seeds 0..2); `--seeds 3` is seeds 0..2; `seed: 1` in the file is seed 1."""
    out = tmp_path / "a"
    assert main(["sweep", "--task", "toy", "--methods", "centroid", "--budgets", "1", "--seed", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    assert [p.name for p in (out / "runs").iterdir()] == ["centroid_b1_s3"]
    config = tmp_path / "toy.yaml"
    config.write_text("task: toy\nmethods: [centroid]\nfraction: 1.0\nseed: 1\n")
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "b")]) == 0
    assert [p.name for p in (tmp_path / "b" / "runs").iterdir()] == ["centroid_b1_s1"]
