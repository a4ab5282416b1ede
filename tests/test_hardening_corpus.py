"""The bad-input corpus through the real CLI: one clear line naming the file, exit 2, no traceback, no output.

Unusual but valid inputs (16-bit, RGBA, palette, 2x2, an empty class folder) must go through, the last with a
warning. Hostile checkpoints must be refused without running anything they carry.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import (
    IMAGE_CASES,
    VOLUME_CASES,
    Case,
    checkpoint_cases,
    medmnist_arrays,
    png_bytes,
    sample_rgb,
    unusual_but_valid_images,
    write_volume_dataset,
)
from samadapt.cli.main import main
from samadapt.errors import DataError
from samadapt.store import open_store

pytestmark = pytest.mark.filterwarnings("ignore::samadapt.encoders.RandomWeightsWarning")

EMBED = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--image-size", "64", "--no-progress"]
SEGMENT = ["train", "--task", "segment", "--head", "linear", "--encoder", "sam_vit_b", "--encoder-arch", "tiny",
           "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--no-progress"]  # fmt: skip

# Known gaps, each with the fix the lead should apply (then flip the mark). strict: a fix makes them XPASS-fail.
IMAGE_XFAIL: dict[str, str] = {}
VOLUME_XFAIL: dict[str, str] = {}


def _marks(cases: list[Case], xfail: dict[str, str]) -> list:
    return [
        pytest.param(
            c,
            id=c.name,
            marks=[pytest.mark.xfail(strict=True, reason=xfail[c.name])] if c.name in xfail else [],
        )
        for c in cases
    ]


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, culprit: Path, message: str) -> None:
    # A progress bar redraws with \r; what the terminal finally shows on each line is the text after the last \r.
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    lines = [line for line in lines if line]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("samadapt: error: "), err
    assert culprit.name in lines[0], f"the message must name {culprit.name}: {lines[0]}"
    assert re.search(message, lines[0]), f"expected /{message}/ in: {lines[0]}"
    assert "Traceback" not in err


@pytest.mark.parametrize("case", _marks(IMAGE_CASES, IMAGE_XFAIL))
def test_bad_image_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys, case: Case) -> None:
    data, culprit = case.make(tmp_path)
    cache = tmp_path / "cache"
    rc, _, err = run_cli(capsys, [*EMBED, "--data", str(data), "--cache", str(cache)])
    assert_one_line_error(rc, err, culprit, case.message)
    assert not cache.exists(), "a refused dataset must not leave a store behind"


@pytest.mark.parametrize("case", _marks(VOLUME_CASES, VOLUME_XFAIL))
def test_bad_volumes_fail_with_one_line_and_write_no_run(tmp_path, capsys, case: Case) -> None:
    data, culprit = case.make(tmp_path)
    run = tmp_path / "run"
    rc, _, err = run_cli(
        capsys, [*SEGMENT, "--data", str(data), "--store", str(tmp_path / "store"), "--out", str(run)]
    )
    assert_one_line_error(rc, err, culprit if case.name != "labels_out_of_range" else data, case.message)
    assert not run.exists(), "a refused dataset must not leave a run folder behind"


def test_structure_absent_from_every_volume_is_reported_not_a_crash(tmp_path, capsys) -> None:
    data = write_volume_dataset(tmp_path / "volumes", label_names=("disc", "lesion"))
    run = tmp_path / "run"
    rc, _, err = run_cli(
        capsys, [*SEGMENT, "--data", str(data), "--store", str(tmp_path / "store"), "--out", str(run)]
    )
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    # No ground-truth lesion anywhere: HD95 is undefined (None) when nothing is predicted either, and the
    # documented penalty (the volume diagonal, in mm) when the model predicts a lesion that is not there.
    lesion_hd95 = metrics["test"]["hd95"]["lesion"]
    assert lesion_hd95 is None or lesion_hd95 > 0
    assert metrics["test"]["dice"]["disc"] is not None


def test_unusual_but_valid_images_are_converted_and_embedded(tmp_path, capsys) -> None:
    files = unusual_but_valid_images(tmp_path / "images")
    cache = tmp_path / "cache"
    rc, out, err = run_cli(capsys, [*EMBED, "--data", str(tmp_path / "images"), "--cache", str(cache)])
    assert rc == 0, err
    assert f"computed {len(files)}, reused 0" in out
    with open_store(cache, create=False) as store:
        values = [store[key] for key in store]
    assert len(values) == len(files) and all(np.isfinite(v).all() for v in values)


def test_empty_class_folder_is_kept_with_a_warning(tmp_path, capsys) -> None:
    root = tmp_path / "classes"
    for label, seeds in (("benign", (0, 1, 2)), ("malignant", (3, 4, 5))):
        for seed in seeds:
            path = root / label / f"{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(sample_rgb(seed=seed)))
    (root / "unused").mkdir()
    with pytest.warns(UserWarning, match=r"unused: class folder holds no images"):
        rc, out, err = run_cli(capsys, [*EMBED, "--data", str(root), "--cache", str(tmp_path / "cache")])
    assert rc == 0, err
    assert "6 images" in out and "computed 6" in out


def test_debug_shows_the_traceback_instead(tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    with pytest.raises(DataError, match="notes.png"):
        main([*EMBED, "--data", str(bad), "--cache", str(tmp_path / "cache"), "--debug"])


def test_classify_train_reports_a_bad_image_in_one_line(tmp_path, capsys) -> None:
    for label in ("a", "b"):
        for seed in range(3):
            path = tmp_path / "data" / label / f"{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(sample_rgb(seed=seed)))
    bad = tmp_path / "data" / "b" / "3.png"
    bad.write_bytes(png_bytes(sample_rgb(seed=9))[:60])
    argv = ["train", "--task", "classify", "--data", str(tmp_path / "data"), "--method", "linear-probe",
            "--encoder-arch", "tiny", "--encoder-image-size", "64", "--epochs", "1", "--no-progress",
            "--out", str(tmp_path / "run")]  # fmt: skip
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, bad, "truncated|corrupt")


# ---- hostile checkpoints ---------------------------------------------------------------------------------------


def test_pickle_payloads_in_the_corpus_are_live(tmp_path) -> None:
    """Control: loaded the unsafe way, the payloads do run (so the refusal tests below mean something)."""
    for case in checkpoint_cases(tmp_path / "ran")[:2]:
        marker = tmp_path / "ran"
        path, _ = case.make(tmp_path / case.name)
        data = path.read_bytes()
        if data.startswith(b"PK"):
            torch.load(path, weights_only=False)
        else:
            pickle.loads(data)  # noqa: S301 - our own payload, loaded on purpose
        assert marker.read_text() == "pwned"
        marker.unlink()


@pytest.mark.parametrize("case", checkpoint_cases(Path("MARKER")), ids=lambda c: c.name)
def test_hostile_checkpoints_are_refused_and_nothing_runs(tmp_path, capsys, case: Case) -> None:
    marker = tmp_path / "pwned"
    case = next(c for c in checkpoint_cases(marker) if c.name == case.name)
    checkpoint, culprit = case.make(tmp_path / "ckpt")
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    cache = tmp_path / "cache"
    argv = [*EMBED, "--data", str(data), "--cache", str(cache), "--checkpoint", str(checkpoint)]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, culprit, case.message)
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    assert not cache.exists()


# ---- the real process: exit code and stderr --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated_png", "pickle_payload_torch_zip"])
def test_subprocess_exit_code_and_no_traceback(tmp_path, kind: str) -> None:
    marker = tmp_path / "pwned"
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    if kind == "truncated_png":
        data, culprit = next(c for c in IMAGE_CASES if c.name == kind).make(tmp_path)
        extra: list[str] = []
    else:
        checkpoint, culprit = next(c for c in checkpoint_cases(marker) if c.name == kind).make(tmp_path)
        extra = ["--checkpoint", str(checkpoint)]
    command = [
        sys.executable,
        "-m",
        "samadapt",
        *EMBED,
        "--data",
        str(data),
        "--cache",
        str(tmp_path / "c"),
        *extra,
    ]
    with warnings.catch_warnings():
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and culprit.name in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("samadapt: error: ")
    assert not marker.exists()


def test_missing_image_file_is_a_data_error_not_a_crash(tmp_path, capsys) -> None:
    rc, _, err = run_cli(
        capsys, [*EMBED, "--data", str(tmp_path / "nowhere.png"), "--cache", str(tmp_path / "c")]
    )
    assert_one_line_error(rc, err, tmp_path / "nowhere.png", "no such file")
