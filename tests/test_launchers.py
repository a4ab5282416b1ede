"""Launchers: a toy picklable run function gives the same results in-process, in a spawn pool and as submitit
jobs (local and debug executors); a failing item is reported while the others complete."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from samadapt.engine.launchers import (
    LocalLauncher,
    RunsFailedError,
    SlurmLauncher,
    make_launcher,
    raise_for_failures,
)
from samadapt.errors import ConfigError


def toy_run(item: dict) -> dict:
    """One 'run': writes its run folder's file and returns a small dict (top level, hence picklable)."""
    if item.get("fail"):
        raise ValueError(f"run {item['name']} diverged")
    out = Path(item["folder"]) / item["name"]
    out.mkdir(parents=True, exist_ok=True)
    value = item["x"] ** 2
    (out / "metrics.json").write_text(json.dumps({"value": value}))
    # pool workers import torch to set its threads; other runs need not pay for the import
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    return {"name": item["name"], "value": value, "threads": threads, "pid": os.getpid()}


def _items(folder: Path, *, fail: str | None = None) -> list[dict]:
    return [{"name": f"run{i}", "x": i, "folder": str(folder), "fail": f"run{i}" == fail} for i in range(4)]


def _summary(results) -> list[tuple]:
    return [(r.index, r.ok, r.value and {k: r.value[k] for k in ("name", "value")}) for r in results]


EXPECTED = [(i, True, {"name": f"run{i}", "value": i * i}) for i in range(4)]


@pytest.fixture()
def importable_tests(monkeypatch):
    # submitit's local jobs are fresh interpreters: they must import this module to unpickle toy_run
    here = str(Path(__file__).parent)
    paths = [here, *[p for p in sys.path if p.endswith("src")], os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


def _files(folder: Path) -> dict[str, int]:
    return {p.parent.name: json.loads(p.read_text())["value"] for p in sorted(folder.glob("*/metrics.json"))}


LAUNCHER_SETTINGS = {
    "local-1": {"kind": "local", "jobs": 1},
    "local-2": {"kind": "local", "jobs": 2},
    "submitit-local": {"kind": "slurm", "executor": "local"},
    "submitit-debug": {"kind": "slurm", "executor": "debug"},
}


@pytest.mark.parametrize("setting", list(LAUNCHER_SETTINGS))
def test_same_results_and_a_failure_reported(tmp_path, importable_tests, setting):
    options = dict(LAUNCHER_SETTINGS[setting])
    kind = options.pop("kind")
    # Slurm resources are passed as a sweep would; off Slurm submitit ignores the slurm_* ones
    launcher = make_launcher(
        kind,
        folder=tmp_path / "submitit",
        slurm_partition="gpu",
        slurm_time_min=5,
        cpus_per_run=1,
        mem_gb=1,
        array_parallelism=2,
        **options,
    )
    results = launcher.map(toy_run, _items(tmp_path / "runs", fail="run2"))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.ok for r in results] == [True, True, False, True]
    assert _summary([r for r in results if r.ok]) == [e for e in EXPECTED if e[0] != 2]
    failed = results[2]
    assert failed.error == "ValueError: run run2 diverged", failed.error
    assert "toy_run" in failed.traceback and failed.item["name"] == "run2" and failed.value is None
    assert _files(tmp_path / "runs") == {"run0": 0, "run1": 1, "run3": 9}
    pids = {r.value["pid"] for r in results if r.ok}
    with pytest.raises(
        RunsFailedError, match="1 of 4 runs failed: item 2: ValueError: run run2 diverged"
    ) as info:
        raise_for_failures(results)
    assert len(info.value.results) == 4
    if setting in ("local-1", "submitit-debug"):  # in this process
        assert pids == {os.getpid()}
    elif setting == "local-2":  # spawn workers, torch threads split between them
        assert isinstance(launcher, LocalLauncher) and os.getpid() not in pids
        assert {r.value["threads"] for r in results if r.ok} == {launcher.threads_per_worker}
        assert launcher.threads_per_worker == max(1, (os.cpu_count() or 1) // 2)
    else:  # submitit's local executor: one subprocess per job, logs in the folder
        assert isinstance(launcher, SlurmLauncher) and all(r.job_id for r in results)
        assert os.getpid() not in pids and any((tmp_path / "submitit").rglob("*_log.err"))


def test_bad_launcher_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown launcher"):
        make_launcher("kubernetes", folder=tmp_path)
    with pytest.raises(ConfigError, match="jobs must be"):
        make_launcher("local", jobs=0, folder=tmp_path)
    with pytest.raises(ConfigError, match="submitit executor"):
        make_launcher("slurm", folder=tmp_path, executor="aws")
    assert make_launcher("local", folder=tmp_path).map(toy_run, []) == []
    assert raise_for_failures([]) == []
