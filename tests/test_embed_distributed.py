"""`torchrun -m samadapt embed` on CPU (gloo, 2 processes) gives the same store as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt.cli.main import main
from samadapt.store import open_store

TINY = ["--encoder", "sam_vit_b", "--arch", "tiny", "--encoder-image-size", "64", "--no-progress"]


def _write_npz(path: Path, images: np.ndarray) -> Path:
    n = len(images)
    labels = np.zeros((n, 1), dtype=np.int64)
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:1], test_labels=labels[:1])
    return path


def _contents(root: Path) -> dict[str, np.ndarray]:
    with open_store(root, create=False) as store:
        return {key: store[key] for key in store}


@pytest.mark.e2e
def test_torchrun_two_ranks_equals_single_process(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    full = _write_npz(tmp_path / "full.npz", images)  # 13 images (the test split repeats image 0)
    part = _write_npz(tmp_path / "part.npz", images[:5])  # 6 images, all in full.npz
    single, ranked = tmp_path / "single", tmp_path / "ranked"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1; same threads, same bits
    try:
        assert main(["embed", *TINY, "--data", str(full), "--store", str(single), "--layers", "1"]) == 0
        assert main(["embed", *TINY, "--data", str(part), "--store", str(ranked), "--layers", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [
        "-m",
        "samadapt",
        "embed",
        *TINY,
        "--data",
        str(full),
        "--store",
        str(ranked),
        "--layers",
        "1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("samadapt embed:")]
    assert sum("precision auto ->" in line for line in lines) == 1  # the decision, said once by rank 0
    summary = [line for line in lines if "precision auto ->" not in line]
    assert len(summary) == 2  # printed by rank 0 only
    assert (
        "2 processes" in summary[0] and "computed 7, reused 6" in summary[0]
    )  # the 5 already stored are skipped

    expected, found = _contents(single), _contents(ranked)
    assert found.keys() == expected.keys() and len(found) == 2 * 12
    for key, value in expected.items():
        np.testing.assert_array_equal(found[key], value)
    assert not list((ranked / "journal").glob("*.jsonl"))  # rank 0 ingested every rank's journal
    with open_store(ranked) as store:  # ids of both datasets resolve (scoped by their source file)
        fields = next(iter(store.configs().values()))
        np.testing.assert_array_equal(
            store.get_by_id("full.npz#test/0", fields, source=full),
            store.get_by_id("part.npz#train/0", fields),
        )
