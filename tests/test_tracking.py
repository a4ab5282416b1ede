"""Trackers: log params / per-epoch metrics / final metrics / a PNG and an HTML artifact, read them back with
MLflow's own client and TensorBoard's own event reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from samadapt.errors import ConfigError
from samadapt.tracking import flatten_params, make_tracker

PARAMS = {"task": "segment", "head": {"name": "autosam", "lr": 1e-4}, "sizes": [256, 512], "weights": None}
FLAT = {
    "task": "segment",
    "head.name": "autosam",
    "head.lr": "0.0001",
    "sizes": "[256, 512]",
    "weights": "None",
}
EPOCHS = [{"loss": 0.9, "dice": 0.1}, {"loss": 0.5, "dice": float("nan")}, {"loss": 0.25, "dice": 0.6}]
FINAL = {"test_dice": 0.625, "test_hd95": None, "test_iou": float("nan")}


@pytest.fixture()
def artifacts(tmp_path):
    png = tmp_path / "overlay.png"
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[2:5, 3:9] = (255, 64, 0)
    Image.fromarray(pixels).save(png)
    html = tmp_path / "report.html"
    html.write_text("<html><body><h1>run</h1></body></html>")
    return png, html, pixels


def _log_run(tracker, png, html) -> None:
    tracker.log_params(PARAMS)
    for epoch, metrics in enumerate(EPOCHS):
        tracker.log_metrics(metrics, step=epoch)
    tracker.log_metrics(FINAL, step=None)
    tracker.log_artifact(png)
    tracker.log_artifact(html)


def test_flatten_params():
    assert flatten_params(PARAMS) == FLAT


def test_mlflow_file_store_round_trip(tmp_path, artifacts):
    from mlflow.tracking import MlflowClient

    png, html, _ = artifacts
    out = tmp_path / "out"
    with make_tracker("mlflow", out=out, run_name="run-1", experiment="samadapt-test") as tracker:
        _log_run(tracker, png, html)
    assert (out / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert client.get_experiment(run.info.experiment_id).name == "samadapt-test"
    assert run.data.params == FLAT
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
        (0, 0.9),
        (1, 0.5),
        (2, 0.25),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "dice")] == [
        (0, 0.1),
        (2, 0.6),
    ]
    assert run.data.metrics["test_dice"] == 0.625
    assert "test_hd95" not in run.data.metrics and "test_iou" not in run.data.metrics
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id)) == ["overlay.png", "report.html"]
    local = client.download_artifacts(tracker.run_id, "report.html", str(tmp_path / "dl"))
    assert open(local).read() == html.read_text()


def test_mlflow_nested_sweep_runs_and_failure(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "sweep"
    parent = make_tracker("mlflow", out=out, run_name="sweep", experiment="sweeps")
    parent.log_params({"grid": {"lr": [1e-3, 1e-4]}})
    children = []
    for i, lr in enumerate((1e-3, 1e-4)):
        with parent.child(f"lr={lr}") as child:
            child.log_params({"lr": lr})
            child.log_metrics({"val_dice": 0.5 + i / 10}, step=0)
        children.append(child.run_id)
    # a run started elsewhere (a worker process) joins the same parent by id
    other = make_tracker("mlflow", out=out, run_name="late", experiment="sweeps", parent_run_id=parent.run_id)
    with pytest.raises(RuntimeError), other:
        raise RuntimeError("training diverged")
    parent.close()
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    for run_id, dice in zip(children, (0.5, 0.6)):
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.metrics == {"val_dice": dice} and run.info.status == "FINISHED"
    assert client.get_run(other.run_id).info.status == "FAILED"
    assert client.get_run(other.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    found = client.search_runs([client.get_run(parent.run_id).info.experiment_id])
    assert {r.info.run_name for r in found} == {"sweep", "lr=0.001", "lr=0.0001", "late"}


def _accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _f32(value: float) -> float:
    return float(np.float32(value))


def _text(acc, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()  # add_text's tag


def test_tensorboard_round_trip(tmp_path, artifacts):
    png, html, pixels = artifacts
    out = tmp_path / "out"
    with make_tracker("tensorboard", out=out, run_name="run-1", experiment="x") as tracker:
        _log_run(tracker, png, html)
        child = tracker.child("fold-0")
        child.log_metrics({"loss": 1.5}, step=3)
        child.close("FAILED")
    acc = _accumulator(out / "tensorboard" / "run-1")
    # TensorBoard stores scalars as float32: equal to the logged values rounded to float32
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, _f32(0.9)), (1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("dice")] == [(0, _f32(0.1)), (2, _f32(0.6))]
    assert [e.value for e in acc.Scalars("test_dice")] == [0.625]
    assert "test_hd95" not in acc.Tags()["scalars"] and "test_iou" not in acc.Tags()["scalars"]
    table = _text(acc, "params")
    assert all(f"| {k} | {v} |" in table for k, v in FLAT.items())
    image = acc.Images("artifacts/overlay.png")[0]
    assert (image.width, image.height) == (12, 8)
    decoded = np.asarray(Image.open(__import__("io").BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, pixels)
    assert str(html.resolve()) in _text(acc, "artifacts/report.html")
    assert _text(acc, "status") == "FINISHED"
    sub = _accumulator(out / "tensorboard" / "run-1" / "fold-0")
    assert [(e.step, e.value) for e in sub.Scalars("loss")] == [(3, 1.5)]
    assert _text(sub, "status") == "FAILED"


def test_none_tracker_and_errors(tmp_path):
    with make_tracker(None, out=tmp_path, run_name="r", experiment="e") as tracker:
        tracker.log_params(PARAMS)
        tracker.log_metrics({"loss": math.nan})
        assert tracker.child("c").run_id is None
    assert tracker.closed and not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="unknown tracker"):
        make_tracker("wandb", out=tmp_path, run_name="r", experiment="e")
    with pytest.raises(ConfigError, match="no such file"):
        make_tracker("none", out=tmp_path, run_name="r", experiment="e").log_artifact(
            tmp_path / "missing.png"
        )
    with pytest.raises(ConfigError, match="status"):
        make_tracker("none", out=tmp_path, run_name="r", experiment="e").close("DONE")
