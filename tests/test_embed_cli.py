"""`samadapt embed` with the real encoders: cache hits and misses, kill -9 and resume, one-line errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt.cli.main import main
from samadapt.encoders.registry import TINY_ARCHS
from samadapt.encoders.sam_vit import SamViTEncoder
from samadapt.store import open_store

TINY = ["--encoder", "sam_vit_b", "--arch", "tiny", "--no-progress"]


def write_npz(path: Path, n_train: int, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-style .npz with random grey images (train/val/test, (N, 1) labels)."""
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": 2, "test": 2}
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(path, **arrays)
    return path


@contextmanager
def one_thread():
    """Same thread count as the subprocesses (OMP_NUM_THREADS=1), so fp32 results match bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def store_contents(root: Path) -> dict[str, np.ndarray]:
    with open_store(root, create=False) as store:
        return {key: store[key] for key in store}


def embed(capsys, *flags: str) -> str:
    assert main(["embed", *TINY, *flags]) == 0
    return capsys.readouterr().out


def _save_official_tiny_checkpoint(path: Path, seed: int) -> Path:
    """A random-weight tiny encoder saved like the official SAM files (flat, `image_encoder.` prefix)."""
    torch.manual_seed(seed)
    module = SamViTEncoder(**TINY_ARCHS["sam"], img_size=1024)
    torch.save({f"image_encoder.{k}": v for k, v in module.state_dict().items()}, path)
    return path


def test_cache_hits_and_misses_with_the_real_encoder(tmp_path, capsys):
    data = str(write_npz(tmp_path / "tiny.npz", n_train=2))  # 6 images
    ckpt_a = _save_official_tiny_checkpoint(tmp_path / "a.pth", seed=1)
    ckpt_b = _save_official_tiny_checkpoint(tmp_path / "b.pth", seed=2)
    cache = str(tmp_path / "cache")
    # fp32 explicitly: the default (auto) is bf16 on CPUs with native bf16, and bf16 is a separate miss below
    common = ["--data", data, "--store", cache, "--encoder-image-size", "64", "--precision", "fp32"]

    out = embed(capsys, *common, "--checkpoint", str(ckpt_a), "--layers", "1,3")
    assert (
        "computed 6, reused 0" in out and str(Path(cache).resolve()) in out and "s per computed image" in out
    )
    assert "reused 6" in embed(
        capsys, *common, "--checkpoint", str(ckpt_a)
    )  # neck is reused, layers not needed
    assert "computed 6" in embed(capsys, *common, "--checkpoint", str(ckpt_b))  # another checkpoint: miss
    assert "computed 6" in embed(capsys, *common, "--checkpoint", str(ckpt_a), "--precision", "bf16")
    assert "computed 6" in embed(
        capsys, "--data", data, "--store", cache, "--encoder-image-size", "128", "--checkpoint", str(ckpt_a)
    )
    assert "computed 6" in embed(capsys, *common)  # random weights
    assert "reused 6" in embed(capsys, *common, "--checkpoint", str(ckpt_b), "--batch-size", "3")

    # What the store holds is what the encoder computes (to float16 rounding), found by the reader's ids.
    from samadapt.data.readers import read_dataset
    from samadapt.encoders import load_encoder

    dataset = read_dataset(data)
    with open_store(cache, create=False) as store:
        assert len(store) == 6 * 3 + 6 * 4  # checkpoint a: neck + 2 layers; 4 more settings: neck only
        for checkpoint in (ckpt_a, ckpt_b):
            encoder = load_encoder("sam_vit_b", checkpoint=checkpoint, image_size=64, arch="tiny")
            view = store.view(encoder)
            for i in (0, 5):
                expected = encoder.embed([dataset.image(i)])[0].numpy()
                np.testing.assert_allclose(view[dataset.ids[i]], expected, rtol=2**-11, atol=1e-5)  # float16
        layer = store.get_by_id(
            dataset.ids[2], load_encoder("sam_vit_b", ckpt_a, image_size=64, arch="tiny"), "3"
        )
        assert layer.shape == (64, 4, 4)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    data = str(write_npz(tmp_path / "tiny.npz", n_train=1))
    assert main(["embed", *TINY, "--data", data, "--store", str(tmp_path / "c"), "--layers", "1,,3"]) == 2
    assert main(["embed", *TINY, "--data", data, "--store", str(tmp_path / "c"), "--batch-size", "0"]) == 2
    (tmp_path / "file").write_text("not a store")
    assert main(["embed", *TINY, "--data", data, "--store", str(tmp_path / "file")]) == 2
    assert main(["embed", *TINY, "--data", data]) == 2  # no store named
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("samadapt: error:") for line in errors] == [True] * 4
    assert "--layers" in errors[0] and "--batch-size" in errors[1] and "found a file" in errors[2]
    assert "--store DIR is required" in errors[3]


def _entries(manifest: Path) -> int:
    if not manifest.exists():
        return 0
    try:
        with closing(sqlite3.connect(manifest, timeout=10)) as conn:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


@pytest.mark.e2e
def test_kill_9_during_embed_then_rerun_equals_uninterrupted_run(tmp_path, capsys):
    data = str(write_npz(tmp_path / "data.npz", n_train=36))  # 40 images
    flags = ["--data", data, "--encoder-image-size", "256", "--batch-size", "2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "samadapt", "embed", *TINY, *flags, "--store", str(killed)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _entries(killed / "manifest.sqlite") == 0:  # kill -9 right after the first batch is committed
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = _entries(killed / "manifest.sqlite")
    assert 0 < done < 40, "the kill must land during the run"

    with one_thread():
        out = embed(capsys, *flags, "--store", str(killed))
        assert f"computed {40 - done}, reused {done}" in out
        embed(capsys, *flags, "--store", str(tmp_path / "clean"))
    resumed, clean = store_contents(killed), store_contents(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and len(clean) == 40
    for key, value in clean.items():
        np.testing.assert_array_equal(resumed[key], value)


@pytest.mark.parametrize("text, expected", [("3,6", [3, 6]), ("", None), ("fpn0, 2", ["fpn0", 2])])
def test_parse_layers(text, expected):
    from samadapt.cli.embed import parse_layers

    assert parse_layers(text) == expected
