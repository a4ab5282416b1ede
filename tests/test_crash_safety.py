"""kill -9 during `embed`, `train` and `sweep`: nothing half-written looks complete, and the rerun ends where an
uninterrupted run ends (same store, same metrics for the same seed on CPU).

The single-kill embed case is in test_embed_cli.py; here the store survives repeated kills.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from corpus import medmnist_arrays, write_volume_dataset
from samadapt.cli.main import main
from samadapt.errors import ConfigError
from samadapt.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::samadapt.encoders.RandomWeightsWarning")]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EMBED = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--no-progress"]
SEGMENT = ["--encoder", "sam_vit_b", "--encoder-arch", "tiny", "--encoder-image-size", "64", "--batch-size", "4",
           "--aug-views", "1", "--unet-channels", "4,8", "--no-progress"]  # fmt: skip


@contextmanager
def one_thread():
    """The subprocesses run with OMP_NUM_THREADS=1; fp32 results match bit for bit only with the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "samadapt", *argv]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(
    process: subprocess.Popen, ready: Callable[[], bool], *, delay: float = 0.0, timeout: float = 120.0
) -> None:
    """SIGKILL `process` `delay` seconds after `ready()` first holds (it must still be running then)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the process never reached the kill point"
        time.sleep(0.005)
    time.sleep(delay)
    assert process.poll() is None, "the process ended before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def store_entries(root: Path) -> int:
    try:
        with closing(sqlite3.connect(root / "manifest.sqlite", timeout=10)) as conn:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # no manifest or no schema yet
        return 0


def store_contents(root: Path) -> dict[str, np.ndarray]:
    with open_store(root, create=False) as store:
        return {key: store[key] for key in store}


# ---- embed ---------------------------------------------------------------------------------------------------


def test_store_survives_repeated_kill_9_and_the_last_rerun_equals_a_clean_run(tmp_path, capsys) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, **medmnist_arrays(n=8, seed=3))  # 24 images
    flags = ["--data", str(data), "--encoder-image-size", "256", "--batch-size", "1", "--layers", "1"]
    killed = tmp_path / "killed"
    counts = []
    for stop_after in (1, 5):  # each run is killed once the store has `stop_after` more committed entries
        target = store_entries(killed) + stop_after
        kill_when(
            start([*EMBED, *flags, "--store", str(killed)]), lambda n=target: store_entries(killed) >= n
        )
        counts.append(store_entries(killed))
        readable = store_contents(killed)  # every committed entry is readable right after a kill
        assert len(readable) == counts[-1] and all(np.isfinite(v).all() for v in readable.values())
    assert 0 < counts[0] < counts[1] < 2 * 24, counts

    with one_thread():
        assert main([*EMBED, *flags, "--store", str(killed)]) == 0
        assert f"computed {24 - counts[1] // 2}, reused {counts[1] // 2}" in capsys.readouterr().out
        assert main([*EMBED, *flags, "--store", str(tmp_path / "clean")]) == 0
    resumed, clean = store_contents(killed), store_contents(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and len(clean) == 2 * 24  # neck + layer 1 per image
    for key, value in clean.items():
        np.testing.assert_array_equal(resumed[key], value)


# ---- segmentation train and sweep -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volume_dataset(tmp_path_factory.mktemp("volumes"), cases=4, shape=(24, 24, 2))


def _sweep_config(path: Path, data: Path, out: Path) -> Path:
    config = {"task": "segment", "data": str(data), "encoder": "sam_vit_b", "encoder-arch": "tiny",
              "encoder-image-size": 64, "epochs": 2, "batch-size": 4, "aug-views": 1, "unet-channels": "4,8",
              "methods": "linear,unet", "train-volumes": "1", "seeds": 1, "progress": False, "out": str(out)}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def _run_metrics(sweep: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((sweep / "runs").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        metrics.pop("seconds")
        metrics.pop("stage_seconds")
        found[path.parent.name] = metrics
    return found


def _head_weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "model.safetensors"))


def test_kill_9_during_sweep_then_rerun_equals_an_uninterrupted_sweep(volumes, tmp_path) -> None:
    killed = tmp_path / "killed"
    config = _sweep_config(tmp_path / "killed.yaml", volumes, killed)
    kill_when(
        start(["sweep", "--config", str(config)]), lambda: any((killed / "runs").glob("*/metrics.json"))
    )
    done_before = set(_run_metrics(killed))
    assert len(done_before) == 1, "the kill must land during the sweep"

    with one_thread():
        assert main(["sweep", "--config", str(config)]) == 0
        clean = tmp_path / "clean"
        assert main(["sweep", "--config", str(_sweep_config(tmp_path / "clean.yaml", volumes, clean))]) == 0

    resumed_metrics, clean_metrics = _run_metrics(killed), _run_metrics(clean)
    assert set(resumed_metrics) == set(clean_metrics) and len(clean_metrics) == 2
    assert resumed_metrics == clean_metrics
    assert _sweep_rows(killed) == _sweep_rows(clean)  # results.csv, but for the runs' seconds
    for run in clean_metrics:
        for name, tensor in _head_weights(clean / "runs" / run).items():
            np.testing.assert_array_equal(_head_weights(killed / "runs" / run)[name], tensor)


def test_kill_9_during_train_leaves_nothing_that_looks_complete(volumes, tmp_path) -> None:
    run, store = tmp_path / "run", tmp_path / "store"
    argv = ["train", "--task", "segment", "--data", str(volumes), "--method", "linear", *SEGMENT,
            "--epochs", "400", "--store", str(store), "--out", str(run)]  # fmt: skip
    process = start(argv)
    kill_when(process, lambda: store_entries(store) > 0, delay=1.0)  # embeddings written: now it trains
    assert not run.exists(), "predict would take a half-written run for a trained one"
    assert (tmp_path / ".run.partial").is_dir() and not (tmp_path / ".run.partial" / "metrics.json").exists()


TRAIN_RESUME = {
    "segment": lambda data, out: ["train", "--task", "segment", "--data", str(data), "--method", "linear", *SEGMENT,
                                  "--epochs", "40", "--store", str(out / "store"), "--out", str(out / "run")],
    # a network method: the linear probe has no epochs (nothing to resume) and would pass trivially
    "classify": lambda data, out: ["train", "--task", "classify", "--data", str(data), "--method", "slca",
                                   "--backbone", "resnet18", "--backbone-image-size", "32", "--batch-size", "8",
                                   "--slca-window", "2", "--encoder-arch", "tiny", "--encoder-image-size", "64",
                                   "--epochs", "30", "--patience", "30", "--no-progress", "--store",
                                   str(out / "store"), "--out", str(out / "run")],
    # methods trained by epochs: fine-tuning on SAM 2 overlays, CoOp (SGD, warmup schedule), Tip-Adapter-F
    **{f"fewshot-{method}": (lambda data, out, m=method: _fewshot_train(data, out, m))
       for method in ("medfocus", "coop", "tip-adapter-f")},
}  # fmt: skip


def _fewshot_train(data: Path, out: Path, method: str) -> list[str]:
    """Tiny CLIP and SAM 2 files live beside `data` (`_fewshot_models`)."""
    models = data.parent
    return ["train", "--task", "fewshot", "--data", str(data), "--method", method, "--clip",
            str(models / "tiny_clip.json"), "--clip-checkpoint", str(models / "tiny_clip.pt"), "--masker",
            "sam2_hiera_t", "--masker-checkpoint", str(models / "sam2.pt"), "--masker-arch", "tiny",
            "--masker-image-size", "128", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--batch-size", "4", "--epochs", "30", "--coop-epochs", "30",
            "--coop-n-ctx", "2", "--tip-epochs", "400", "--patience", "400", "--no-progress", "--out",
            str(out / "run")]  # fmt: skip


def _fewshot_models(folder: Path) -> None:
    from samadapt.encoders.clip import write_tiny_clip
    from samadapt.encoders.masks import write_tiny_sam2

    write_tiny_clip(folder)
    write_tiny_sam2(folder / "sam2.pt")


@pytest.mark.parametrize("task", sorted(TRAIN_RESUME))
def test_kill_9_during_train_then_resume_equals_an_uninterrupted_run(volumes, tmp_path, task: str) -> None:
    if task == "segment":
        data = volumes
    else:
        data = tmp_path / "breastmnist.npz"
        np.savez(data, **medmnist_arrays(n=12, seed=5))
        if task.startswith("fewshot"):
            _fewshot_models(tmp_path)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = start(TRAIN_RESUME[task](data, killed))
    state = killed / ".run.partial" / ".resume" / "state.json"
    kill_when(process, state.exists, delay=0.3)  # at least one finished epoch saved, training still going
    # nothing of the run at its final place (fewshot's default mask cache, RUN/mask_cache, may be there)
    assert not any(
        (killed / "run" / name).exists() for name in ("metrics.json", "config.yaml", "model.safetensors")
    )
    epoch_at_kill = json.loads(state.read_text())["epoch"]
    resumed = subprocess.run(
        [sys.executable, "-m", "samadapt", *TRAIN_RESUME[task](data, killed), "--resume"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming .* after epoch \d+", resumed.stderr), (
        "the rerun must continue, not start over"
    )
    assert not state.parent.exists() and not (killed / "run" / ".resume").exists(), (
        "a finished run drops its resume state"
    )
    assert not (killed / ".run.partial").exists()
    done = subprocess.run(
        [sys.executable, "-m", "samadapt", *TRAIN_RESUME[task](data, clean)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    a, b = (json.loads((r / "run" / "metrics.json").read_text()) for r in (killed, clean))
    assert _timeless(a) == _timeless(b), f"killed after epoch {epoch_at_kill}"
    for name, tensor in _weights(clean / "run" / "model.safetensors").items():
        np.testing.assert_array_equal(_weights(killed / "run" / "model.safetensors")[name], tensor)


def _timeless(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


def _weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# ---- classification sweep -------------------------------------------------------------------------------------


def _classify_sweep_config(path: Path, data: Path, out: Path) -> Path:
    config = {"task": "classify", "data": str(data), "methods": "baseline", "label-fractions": "0.5,1.0",
              "seeds": 1, "backbone": "resnet18", "backbone-image-size": 32, "batch-size": 8, "epochs": 4,
              "encoder-arch": "tiny", "encoder-image-size": 64, "progress": False, "store": str(out / "store"),
              "out": str(out)}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def _sweep_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def test_kill_9_during_classify_sweep_then_rerun_equals_an_uninterrupted_sweep(tmp_path) -> None:
    data = tmp_path / "breastmnist.npz"
    np.savez(data, **medmnist_arrays(n=12, seed=5))
    killed = tmp_path / "killed"
    config = _classify_sweep_config(tmp_path / "killed.yaml", data, killed)
    kill_when(
        start(["sweep", "--config", str(config)]), lambda: any((killed / "runs").glob("*/metrics.json"))
    )
    finished = [p.parent.name for p in (killed / "runs").glob("*/metrics.json")]
    assert len(finished) == 1, "the kill must land during the sweep"

    with one_thread():
        assert main(["sweep", "--config", str(config)]) == 0
        clean = tmp_path / "clean"
        assert (
            main(["sweep", "--config", str(_classify_sweep_config(tmp_path / "clean.yaml", data, clean))])
            == 0
        )
    assert not list((killed / "runs").glob(".*.partial")), "the interrupted run's partial folder is gone"
    assert _sweep_rows(killed) == _sweep_rows(clean) and len(_sweep_rows(clean)) == 2
    for run in (clean / "runs").iterdir():
        a, b = (
            json.loads((root / "runs" / run.name / "metrics.json").read_text()) for root in (killed, clean)
        )
        assert _timeless(a) == _timeless(b), run.name


# ---- few-shot sweep ------------------------------------------------------------------------------------------


def _fewshot_sweep_config(path: Path, data: Path, clip: tuple[Path, Path], out: Path) -> Path:
    config = {"task": "fewshot", "data": str(data), "clip": str(clip[0]), "clip-checkpoint": str(clip[1]),
              "methods": "clip-finetune", "data-fraction": "0.5,1.0", "seeds": "1", "epochs": 40, "patience": 40,
              "batch-size": 4, "progress": False, "out": str(out)}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def test_kill_9_during_fewshot_sweep_then_rerun_equals_an_uninterrupted_sweep(tmp_path) -> None:
    from samadapt.encoders.clip import write_tiny_clip

    data = tmp_path / "breastmnist.npz"
    np.savez(data, **medmnist_arrays(n=12, seed=5))
    clip = write_tiny_clip(tmp_path)
    killed = tmp_path / "killed"
    config = _fewshot_sweep_config(tmp_path / "killed.yaml", data, clip, killed)
    kill_when(start(["sweep", "--config", str(config)]), lambda: any(killed.glob("runs/*/metrics.json")))
    assert len(list(killed.glob("runs/*/metrics.json"))) == 1, "the kill must land during the sweep"

    with one_thread():
        assert main(["sweep", "--config", str(config)]) == 0
        clean = tmp_path / "clean"
        assert (
            main(
                ["sweep", "--config", str(_fewshot_sweep_config(tmp_path / "clean.yaml", data, clip, clean))]
            )
            == 0
        )
    assert _sweep_rows(killed) == _sweep_rows(clean) and len(_sweep_rows(clean)) == 2
    assert sorted(p.parent.name for p in clean.glob("runs/*/metrics.json")) == [
        "clip-finetune_b0.5_s0",
        "clip-finetune_b1_s0",
    ]
    for done in clean.glob("runs/*/metrics.json"):
        a = json.loads((killed / done.relative_to(clean)).read_text())
        assert _timeless(a) == _timeless(json.loads(done.read_text())), done.parent


class _Interrupted(Exception):
    pass


def _fit_toy(run: Path, *, epochs: int, resume: bool, die_after: int | None = None, lr: float = 0.05):
    """A tiny model whose data draws from the global torch RNG and the loader's generator, with dropout, a
    scheduler and early stopping: every piece of state `fit` must carry over."""
    from samadapt.engine.lifecycle import _start
    from samadapt.training import EarlyStopping, fit, seed_everything
    from samadapt.training.resume import resume_dir

    _start(run, resume=resume)  # the run lifecycle's first step: keep the resume state only under --resume
    generator = seed_everything(3)
    x, y = torch.randn(20, 4), torch.randint(2, (20,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=6, shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    calls = []

    def loss_fn(m, idx):
        noise = 0.1 * torch.randn(len(idx), 4) + float(np.random.rand()) * 0.01  # noqa: NPY002
        return torch.nn.functional.cross_entropy(m(x[idx] + noise), y[idx])

    def validate(m):
        calls.append(1)
        if die_after is not None and len(calls) > die_after:
            raise _Interrupted
        return {
            "loss": float(torch.nn.functional.cross_entropy(m(x), y)),
            "acc": float((m(x).argmax(1) == y).float().mean()),
        }

    return fit(
        model=model, train_loader=loader, loss_fn=loss_fn, validate=validate, optimizer=optimizer, epochs=epochs,
        stopper=EarlyStopping(monitor="acc", patience=4), progress=False, resume_dir=resume_dir(run), resume=resume,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs), fingerprint={"lr": lr},
    )  # fmt: skip


def test_fit_resumes_to_the_same_history_and_weights(tmp_path, caplog) -> None:
    clean = _fit_toy(tmp_path / "clean", epochs=12, resume=False)
    with pytest.raises(_Interrupted):
        _fit_toy(tmp_path / "run", epochs=12, resume=False, die_after=5)
    assert json.loads((tmp_path / "run" / ".resume" / "state.json").read_text())["epoch"] == 4
    with pytest.raises(ConfigError, match=r"state\.json.*lr=0\.05.*lr=0\.1"):
        _fit_toy(tmp_path / "run", epochs=12, resume=True, lr=0.1)
    resumed = _fit_toy(tmp_path / "run", epochs=12, resume=True)
    assert resumed.history == clean.history and resumed.best_epoch == clean.best_epoch
    assert resumed.stopped_early == clean.stopped_early
    for key, tensor in clean.best_state.items():
        torch.testing.assert_close(resumed.best_state[key], tensor, rtol=0, atol=0)
    with caplog.at_level("WARNING"):  # without --resume an interrupted run starts over, and says so
        fresh = _fit_toy(tmp_path / "run", epochs=12, resume=False)
    assert "starting from scratch" in caplog.text and fresh.history == clean.history


# ---- retraining into a finished run folder ----------------------------------------------------------------------


def test_publishing_a_new_run_replaces_the_old_outputs_and_keeps_the_users_files(tmp_path) -> None:
    from samadapt.engine.lifecycle import RUN_OUTPUTS, partial_dir, publish

    run = tmp_path / "run"
    (run / "mask_cache").mkdir(parents=True)
    for name in (*RUN_OUTPUTS, "notes.txt", "old_extra.png"):
        (run / name).write_text("old")
    (run / ".run-files").write_text("\n".join([*RUN_OUTPUTS, "old_extra.png"]) + "\n")
    new = partial_dir(run)
    new.mkdir()
    for name in ("metrics.json", "config.yaml", "model.safetensors"):
        (new / name).write_text("new")
    publish(new, run)
    assert not new.exists() and not (tmp_path / ".run.old").exists()
    assert {n: (run / n).read_text() for n in ("metrics.json", "config.yaml", "model.safetensors")} == {
        "metrics.json": "new",
        "config.yaml": "new",
        "model.safetensors": "new",
    }
    assert not (run / "old_extra.png").exists() and not (run / "report.html").exists(), "old outputs go"
    assert (run / "notes.txt").read_text() == "old" and (run / "mask_cache").is_dir(), "the user's files stay"


def test_kill_9_while_retraining_a_finished_run_leaves_no_stale_outputs(tmp_path) -> None:
    data = tmp_path / "breastmnist.npz"
    np.savez(data, **medmnist_arrays(n=12, seed=5))
    _fewshot_models(tmp_path)
    argv = _fewshot_train(data, tmp_path, "coop")
    finished = subprocess.run(
        [sys.executable, "-m", "samadapt", *argv], env=ENV, capture_output=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file() and (run / "model.safetensors").is_file()
    before = {
        name: (run / name).read_bytes() for name in ("metrics.json", "config.yaml", "model.safetensors")
    }
    state = tmp_path / ".run.partial" / ".resume" / "state.json"
    kill_when(start([*argv, "--seed", "1"]), state.exists)  # retrain with another seed, killed mid-training
    # the finished run stays whole (config, weights and metrics of one training), the new one stays hidden
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (tmp_path / ".run.partial" / "metrics.json").exists()


@pytest.mark.parametrize("task", ["segment", "classify"])
def test_retraining_with_bad_data_keeps_the_finished_run(tmp_path, capsys, task: str) -> None:
    """Outputs of a finished run go only once the new run's data has been read: a typo in --data loses nothing."""
    from samadapt.engine.lifecycle import RUN_OUTPUTS

    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_OUTPUTS:
        (run / name).write_text("finished")
    empty = tmp_path / "empty"
    empty.mkdir()
    flags = {
        "segment": ["--method", "linear", *SEGMENT],
        "classify": ["--method", "baseline", "--no-progress"],
    }
    assert main(["train", "--task", task, "--data", str(empty), *flags[task], "--out", str(run)]) == 2
    assert "empty" in capsys.readouterr().err
    assert all((run / name).read_text() == "finished" for name in RUN_OUTPUTS)
