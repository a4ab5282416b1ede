"""Issue 15's launchers and tracking on a real sweep: a 2 methods x 2 budgets x 2 seeds classify sweep in this
process, through a process pool (`--launcher local --jobs 2`) and through submitit's local executor gives the
same results.csv rows; a re-submitted sweep runs only what is missing; MLflow reads back metrics.json."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from samadapt.cli.main import main
from samadapt.tasks.classify.synthetic import make_lesion_dataset

TIMING = ("seconds",)


def _rows(out):
    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def _same_rows(found, expected, *, rel=0.0):
    """Equal rows; with `rel`, metric values may differ by float rounding (other thread counts in other processes)."""
    assert [(r["method"], r["budget"], r["seed"], r["n_train"], r["run"]) for r in found] == [
        (r["method"], r["budget"], r["seed"], r["n_train"], r["run"]) for r in expected
    ]
    for a, b in zip(found, expected):
        assert a.keys() == b.keys()
        for key in a:
            if a[key] != b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=rel, abs=rel), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return make_lesion_dataset(root / "d.npz", n_train=24, n_val=8, n_test=8, size=32)


def _argv(data, out, store, *extra):
    return ["sweep", "--task", "classify", "--data", str(data), "--methods", "linear-probe,baseline",
            "--budgets", "0.5,1", "--seeds", "2", "--encoder-arch", "tiny", "--encoder-image-size", "64",
            "--backbone-image-size", "32", "--epochs", "1", "--store", str(store), "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


def test_pool_and_submitit_give_the_in_process_rows(data, tmp_path) -> None:
    store = tmp_path / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's workers run one thread each on this 2-core machine: same arithmetic
    try:
        assert main(_argv(data, tmp_path / "here", store)) == 0
    finally:
        torch.set_num_threads(threads)
    reference = _rows(tmp_path / "here")
    assert len(reference) == 8
    assert main(_argv(data, tmp_path / "pool", store, "--launcher", "local", "--jobs", "2")) == 0
    _same_rows(_rows(tmp_path / "pool"), reference)  # one thread per worker: the same arithmetic, bit for bit
    out = tmp_path / "submitit"
    assert main(_argv(data, out, store, "--launcher", "slurm", "--slurm-executor", "local")) == 0
    # submitit's local jobs run with the machine's thread count: sums may round differently in the last digits
    _same_rows(_rows(out), reference, rel=1e-4)
    assert any((out / "slurm").rglob("*_log.out")), "submitit kept every job's log"

    # a re-submitted sweep redoes exactly the missing run (one deleted, one left half-written)
    shutil.rmtree(out / "runs" / "baseline_b1_s1")
    (out / "runs" / "baseline_b0.5_s0" / "metrics.json").unlink()
    before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert main(_argv(data, out, store, "--launcher", "local", "--jobs", "2")) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert {k for k in after if before.get(k) != after[k]} == {"baseline_b1_s1", "baseline_b0.5_s0"}
    _same_rows(_rows(out), reference, rel=1e-4)


def test_mlflow_tracking_reads_back_the_metrics(data, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    argv = ["train", "--task", "classify", "--data", str(data), "--method", "linear-probe", "--encoder-arch", "tiny",
            "--encoder-image-size", "64", "--track", "mlflow", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("samadapt-classify")
    (logged,) = client.search_runs([experiment.experiment_id])
    for key, value in metrics["test"].items():
        assert logged.data.metrics[f"test.{key}"] == pytest.approx(value)
    assert logged.data.params["method"] == "linear-probe" and logged.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.html", "metrics.json", "config.yaml"} <= artifacts


def test_tensorboard_tracking_of_a_sweep(data, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "classify", "--data", str(data), "--methods", "baseline", "--budgets", "1",
            "--seeds", "1", "--encoder-arch", "tiny", "--encoder-image-size", "64", "--backbone-image-size", "32",
            "--epochs", "2", "--track", "tensorboard", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    metrics = json.loads((out / "runs" / "baseline_b1_s0" / "metrics.json").read_text())
    assert [e.step for e in acc.Scalars("train_loss")] == [0, 1]
    assert acc.Scalars("test.accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"])
