"""The bad-input corpus through the real CLI: one clear line naming the file, exit 2, no traceback, no output.

Unusual but valid inputs (16-bit, RGBA, palette, 2x2, an empty class folder) must go through, the last with a
warning. Hostile checkpoints must be refused without running anything they carry.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corpus import (
    IMAGE_CASES,
    IMAGE_FILE_CASES,
    VOLUME_CASES,
    Case,
    Payload,
    checkpoint_cases,
    labelled_folder_with,
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

EMBED = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--encoder-image-size", "64", "--no-progress"]
SEGMENT = ["train", "--task", "segment", "--method", "linear", "--encoder", "sam_vit_b", "--encoder-arch", "tiny",
           "--encoder-image-size", "64", "--epochs", "1", "--batch-size", "4", "--no-progress"]  # fmt: skip

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


_PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def assert_one_line_error(
    rc: int, err: str, culprit: Path, message: str, *, allow_progress: bool = False
) -> None:
    # A progress bar redraws with \r; what the terminal finally shows on each line is the text after the last \r.
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    lines = [line for line in lines if line and not (allow_progress and _PROGRESS_BAR.search(line))]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("samadapt: error: "), err
    assert culprit.name in lines[0], f"the message must name {culprit.name}: {lines[0]}"
    assert re.search(message, lines[0]), f"expected /{message}/ in: {lines[0]}"
    assert "Traceback" not in err


@pytest.mark.parametrize("case", _marks(IMAGE_CASES, IMAGE_XFAIL))
def test_bad_image_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys, case: Case) -> None:
    data, culprit = case.make(tmp_path)
    cache = tmp_path / "cache"
    rc, _, err = run_cli(capsys, [*EMBED, "--data", str(data), "--store", str(cache)])
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
    rc, out, err = run_cli(capsys, [*EMBED, "--data", str(tmp_path / "images"), "--store", str(cache)])
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
        rc, out, err = run_cli(capsys, [*EMBED, "--data", str(root), "--store", str(tmp_path / "cache")])
    assert rc == 0, err
    assert "6 images" in out and "computed 6" in out


def test_debug_shows_the_traceback_instead(tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    with pytest.raises(DataError, match="notes.png"):
        main([*EMBED, "--data", str(bad), "--store", str(tmp_path / "cache"), "--debug"])


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
    argv = [*EMBED, "--data", str(data), "--store", str(cache), "--checkpoint", str(checkpoint)]
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
        "--store",
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
        capsys, [*EMBED, "--data", str(tmp_path / "nowhere.png"), "--store", str(tmp_path / "c")]
    )
    assert_one_line_error(rc, err, tmp_path / "nowhere.png", "no such file")


# ---- the same corpus through `train` (classify, fewshot) and `predict` (classify, fewshot, segment) -----------

CLASSIFY = ["train", "--task", "classify", "--method", "linear-probe", "--encoder", "sam_vit_b", "--encoder-arch",
            "tiny", "--encoder-image-size", "64", "--epochs", "1", "--no-progress"]  # fmt: skip
AUTOSAM = [a if a != "linear" else "autosam" for a in SEGMENT]


@pytest.fixture(scope="module")
def tiny_fewshot(tmp_path_factory) -> dict[str, Path]:
    from samadapt.encoders.clip import write_tiny_clip
    from samadapt.encoders.masks import write_tiny_sam2

    root = tmp_path_factory.mktemp("fewshot_models")
    clip_config, clip_checkpoint = write_tiny_clip(root)
    return {
        "clip": clip_config,
        "clip_checkpoint": clip_checkpoint,
        "masker": write_tiny_sam2(root / "sam2.pt"),
    }


def fewshot_train(models: dict[str, Path], *, method: str = "linear-probe", **checkpoints: Path) -> list[str]:
    clip = checkpoints.get("clip", models["clip_checkpoint"])
    masker = checkpoints.get("masker", models["masker"])
    return ["train", "--task", "fewshot", "--method", method, "--clip", str(models["clip"]), "--clip-checkpoint",
            str(clip), "--masker", "sam2_hiera_t", "--masker-checkpoint", str(masker), "--masker-arch", "tiny",
            "--masker-image-size", "128", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--epochs", "1", "--no-progress"]  # fmt: skip


def _train_argv(task: str, tmp_path: Path, models: dict[str, Path]) -> list[str]:
    if task == "classify":
        return [*CLASSIFY, "--store", str(tmp_path / "store")]
    return [*fewshot_train(models), "--mask-cache", str(tmp_path / "masks")]


# Dataset-level cases go in as they are; one-file cases inside a labelled class folder (training needs labels).
TRAIN_CASES = [*IMAGE_FILE_CASES, *(c for c in IMAGE_CASES if c.name.startswith(("npz_", "csv_", "only_")))]


@pytest.mark.parametrize("task", ["classify", "fewshot"])
@pytest.mark.parametrize("case", _marks(TRAIN_CASES, IMAGE_XFAIL))
def test_bad_image_inputs_through_train(tmp_path, capsys, tiny_fewshot, task: str, case: Case) -> None:
    data, culprit = labelled_folder_with(case, tmp_path) if case in IMAGE_FILE_CASES else case.make(tmp_path)
    run = tmp_path / "run"
    argv = [*_train_argv(task, tmp_path, tiny_fewshot), "--data", str(data), "--out", str(run)]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, culprit, case.message)
    assert not run.exists(), "a refused dataset must not leave a run folder behind"


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_fewshot) -> dict[str, Path]:
    """One finished run per task, for `predict` to be handed bad inputs."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "breastmnist.npz"
    np.savez(data, **medmnist_arrays(n=6))
    runs = {task: root / task for task in ("classify", "fewshot", "segment")}
    assert (
        main(
            [
                *_train_argv("classify", root, tiny_fewshot),
                "--data",
                str(data),
                "--out",
                str(runs["classify"]),
            ]
        )
        == 0
    )
    assert (
        main(
            [*_train_argv("fewshot", root, tiny_fewshot), "--data", str(data), "--out", str(runs["fewshot"])]
        )
        == 0
    )
    volumes = write_volume_dataset(root / "volumes")
    argv = [*SEGMENT, "--data", str(volumes), "--store", str(root / "store"), "--out", str(runs["segment"])]
    assert main(argv) == 0
    return runs


PREDICT_CASES = [*IMAGE_FILE_CASES, *(c for c in IMAGE_CASES if c.name.startswith(("folder_", "only_")))]


@pytest.mark.parametrize("task", ["classify", "fewshot"])
@pytest.mark.parametrize("case", PREDICT_CASES, ids=lambda c: c.name)
def test_bad_images_through_predict(tmp_path, capsys, trained_runs, task: str, case: Case) -> None:
    images, culprit = case.make(tmp_path / "in")
    out = tmp_path / "pred"
    argv = [
        "predict",
        "--run",
        str(trained_runs[task]),
        "--images",
        str(images),
        "--out",
        str(out),
        "--no-progress",
    ]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, culprit, case.message)
    assert not (out / "predictions.csv").exists()


BROKEN_RUN_CONFIGS = {
    "not_yaml": "task: [unclosed\n",
    "a_list": "- 1\n- 2\n",
    "wrong_task": "task: somethingelse\n",
    "empty": "",
}


@pytest.mark.parametrize("task", ["classify", "fewshot", "segment"])
@pytest.mark.parametrize("broken", list(BROKEN_RUN_CONFIGS))
def test_predict_with_a_broken_run_config_is_one_line(
    tmp_path, capsys, trained_runs, task: str, broken: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_runs[task], run)
    (run / "config.yaml").write_text(BROKEN_RUN_CONFIGS[broken])
    if task == "segment":
        volume = next(trained_runs["segment"].parent.joinpath("volumes").rglob("*.nii.gz"))
        argv = ["predict", "--run", str(run), "--input", str(volume), "--out", str(tmp_path / "m.nii.gz")]
    else:
        image = tmp_path / "img.png"
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
        argv = [
            "predict",
            "--run",
            str(run),
            "--images",
            str(image),
            "--out",
            str(tmp_path / "p"),
            "--no-progress",
        ]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, run / "config.yaml", r"YAML|mapping|task is|unknown task|no `task:` key")


@pytest.mark.parametrize(
    "case",
    [c for c in VOLUME_CASES if c.name in ("nifti_4d", "nifti_nan", "truncated_nifti")],
    ids=lambda c: c.name,
)
def test_bad_volumes_through_segment_predict(tmp_path, capsys, trained_runs, case: Case) -> None:
    _, culprit = case.make(tmp_path)
    out = tmp_path / "mask.nii.gz"
    rc, _, err = run_cli(capsys, ["predict", "--run", str(trained_runs["segment"]), "--input", str(culprit),
                                  "--out", str(out)])  # fmt: skip
    assert_one_line_error(rc, err, culprit, case.message)
    assert not out.exists()


# ---- hostile checkpoints through `train` ----------------------------------------------------------------------

CHECKPOINT_NAMES = [c.name for c in checkpoint_cases(Path("MARKER"))]


@pytest.mark.parametrize("task", ["classify", "segment"])
@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_hostile_encoder_checkpoints_through_train(tmp_path, capsys, task: str, name: str) -> None:
    marker = tmp_path / "pwned"
    checkpoint, culprit = next(c for c in checkpoint_cases(marker) if c.name == name).make(tmp_path / "ckpt")
    message = next(c for c in checkpoint_cases(marker) if c.name == name).message
    run = tmp_path / "run"
    if task == "classify":
        data = tmp_path / "ok.npz"
        np.savez(data, **medmnist_arrays())
        argv = [*CLASSIFY, "--data", str(data)]
    else:  # the AutoSAM head also takes its decoder from the checkpoint
        argv = [*AUTOSAM, "--data", str(write_volume_dataset(tmp_path / "volumes"))]
    argv += ["--checkpoint", str(checkpoint), "--store", str(tmp_path / "store"), "--out", str(run)]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, culprit, message)
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    assert not run.exists()


def _poisoned(source: Path, target: Path, value: float) -> Path:
    """`source`'s tensors with one weight set to NaN or Inf."""
    from samadapt.encoders.checkpoint import load_state_dict_safely

    state = load_state_dict_safely(source)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    torch.save(state, target)
    return target


@pytest.mark.parametrize("which", ["clip", "masker"])
@pytest.mark.parametrize(
    "name", ["pickle_payload_torch_zip", "pickle_payload_raw_pickle", "nan_weights", "inf_weights"]
)
def test_hostile_fewshot_checkpoints_through_train(
    tmp_path, capsys, tiny_fewshot, which: str, name: str
) -> None:
    marker = tmp_path / "pwned"
    if name.startswith("pickle"):
        case = next(c for c in checkpoint_cases(marker) if c.name == name)
        checkpoint, _ = case.make(tmp_path / "ckpt")
        message = case.message
    else:
        value = float("nan") if name == "nan_weights" else float("inf")
        checkpoint = _poisoned(tiny_fewshot[f"{which}_checkpoint" if which == "clip" else which],
                               tmp_path / f"{which}_{name}.pt", value)  # fmt: skip
        message = "NaN or Inf"
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    run = tmp_path / "run"
    argv = [*fewshot_train(tiny_fewshot, method="medfocus", **{which: checkpoint}), "--data", str(data),
            "--mask-cache", str(tmp_path / "masks"), "--out", str(run)]  # fmt: skip
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, checkpoint, message)
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    assert not run.exists()


@pytest.mark.parametrize("kind", ["nan_safetensors", "inf_pth", "pickle_payload"])
def test_hostile_backbone_weights_are_refused(tmp_path, capsys, kind: str) -> None:
    import timm
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    state = {k: v.clone() for k, v in timm.create_model("resnet18", num_classes=2).state_dict().items()}
    if kind == "pickle_payload":
        state["payload"] = Payload(marker)  # type: ignore[assignment]
        weights, message = tmp_path / "resnet18_evil.pth", "refused|pickle"
        torch.save(state, weights)
    else:
        state["conv1.weight"].view(-1)[0] = float("nan") if kind.startswith("nan") else float("inf")
        weights, message = tmp_path / f"resnet18_{kind}", "NaN or Inf"
        if kind.endswith("safetensors"):
            save_file(state, str(weights.with_suffix(".safetensors")))
            weights = weights.with_suffix(".safetensors")
        else:
            weights = weights.with_suffix(".pth")
            torch.save({"state_dict": state}, weights)
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    argv = ["train", "--task", "classify", "--method", "baseline", "--backbone", "resnet18", "--backbone-image-size", "32",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--backbone-weights", str(weights),
            "--data", str(data), "--out", str(tmp_path / "run")]  # fmt: skip
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, weights, message)
    assert not marker.exists(), "the weights file's pickle payload ran"
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_nan_autosam_decoder_weights_are_refused(tmp_path, capsys) -> None:
    from corpus import tiny_sam_state
    from samadapt.tasks.segment.heads import build_head

    state = tiny_sam_state()
    for key, value in build_head("autosam", num_classes=2).state_dict().items():
        if key.startswith(("transformer.", "output_upscaling.", "output_hypernetworks_mlps.")):
            state[f"mask_decoder.{key}"] = value.clone()
    poisoned = next(
        k for k in state if k.startswith("mask_decoder.transformer") and state[k].is_floating_point()
    )
    state[poisoned].view(-1)[0] = float("nan")
    checkpoint = tmp_path / "sam_nan_decoder.pth"
    torch.save(state, checkpoint)
    run = tmp_path / "run"
    argv = [*AUTOSAM, "--data", str(write_volume_dataset(tmp_path / "volumes")), "--checkpoint", str(checkpoint),
            "--store", str(tmp_path / "store"), "--out", str(run)]  # fmt: skip
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, checkpoint, "NaN or Inf")
    assert not run.exists()


def test_diverged_training_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch) -> None:
    """A NaN/Inf loss (training.loop.fit raises FloatingPointError) reaches the user as one line, exit 2."""
    import samadapt.engine.lifecycle as lifecycle

    def diverge(task, cfg, **kwargs):
        raise FloatingPointError("non-finite training loss at epoch 3: nan")

    monkeypatch.setattr(lifecycle, "execute_run", diverge)
    train = ["train", "--task", "classify", "--out", str(tmp_path / "run")]
    rc, _, err = run_cli(capsys, train)
    assert rc == 2 and err.strip().splitlines() == [
        "samadapt: error: training diverged: non-finite training loss at epoch 3: nan; look for NaN/Inf in the "
        "data or weights, or lower --lr (--debug shows where)"
    ]
    with pytest.raises(FloatingPointError):
        main([*train, "--debug"])


def test_multi_line_library_messages_print_as_one_line(tmp_path, capsys, monkeypatch) -> None:
    """pydicom and torch put newlines and terminal colours in their messages; the CLI prints one clean line."""
    import samadapt.engine.lifecycle as lifecycle

    def fail(task, cfg, **kwargs):
        raise DataError("x.dcm: cannot decode:\n  pillow: cannot identify \x1b[1mimage\x1b[0m\n")

    monkeypatch.setattr(lifecycle, "execute_run", fail)
    rc, _, err = run_cli(capsys, ["train", "--task", "classify", "--out", str(tmp_path / "run")])
    assert rc == 2 and err == "samadapt: error: x.dcm: cannot decode: pillow: cannot identify image\n"


# ---- a damaged embedding store (disk error, a copy cut short, hand edits) --------------------------------------


def _embedded_store(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    store = tmp_path / "store"
    assert main([*EMBED, "--data", str(data), "--store", str(store)]) == 0
    return data, store


def _store_values(store: Path) -> dict[str, np.ndarray]:
    with open_store(store, create=False) as opened:
        return {key: opened[key] for key in opened}


def test_overwritten_shard_is_a_one_line_error_and_deleting_it_heals(tmp_path, capsys) -> None:
    """A shard of full size but garbage inside passes embed's stat check; reading it names the file."""
    data, store = _embedded_store(tmp_path)
    shard = sorted(store.rglob("*.npy"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    capsys.readouterr()
    run = tmp_path / "run"
    argv = [*CLASSIFY, "--data", str(data), "--store", str(store), "--out", str(run)]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, shard, "damaged.*delete this file and rerun `samadapt embed`")
    assert not (run / "metrics.json").exists()
    shard.unlink()  # the recovery the message names
    with pytest.warns(UserWarning, match="1 shard file.*missing or truncated"):
        rc, _, err = run_cli(capsys, argv)
    assert rc == 0, err
    assert (run / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_embed_recomputes_entries_whose_shard_is_gone(tmp_path, capsys, damage: str) -> None:
    """`samadapt embed` does not say "nothing to compute" over missing shards: a rerun heals the store."""
    data, store = _embedded_store(tmp_path)
    before = _store_values(store)
    shards = sorted(store.rglob("*.npy"))
    with open_store(store, create=False) as opened:
        located = opened.locate(sorted(before))
    victim = shards[len(shards) // 2]
    lost = {k for k, loc in located.items() if store / loc.shard == victim}
    if damage == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:200])
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"1 shard file\(s\) missing or truncated"):
        rc, out, err = run_cli(capsys, [*EMBED, "--data", str(data), "--store", str(store)])
    assert rc == 0, err
    assert f"computed {len(lost)}, reused {len(before) - len(lost)}" in out
    after = _store_values(store)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    rc, out, _ = run_cli(capsys, [*EMBED, "--data", str(data), "--store", str(store)])
    assert rc == 0 and "computed 0" in out and "nothing to compute" in out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory"])
def test_damaged_store_manifest_is_a_one_line_error(tmp_path, capsys, damage: str) -> None:
    data, store = _embedded_store(tmp_path)
    manifest = store / "manifest.sqlite"
    if damage == "garbage":
        manifest.write_bytes(b"not a database" * 100)
        message = "not a database.*delete the store folder"
    elif damage == "truncated":
        manifest.write_bytes(manifest.read_bytes()[:1500])
        message = "damaged|malformed|not a database"
    else:
        manifest.unlink()
        manifest.mkdir()
        message = "cannot use|unable to open"
    capsys.readouterr()
    rc, _, err = run_cli(capsys, [*EMBED, "--data", str(data), "--store", str(store)])
    assert_one_line_error(rc, err, manifest, message)
    argv = [*CLASSIFY, "--data", str(data), "--store", str(store), "--out", str(tmp_path / "run")]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, manifest, message)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- flag values the parsers let through ------------------------------------------------------------------------

# (flags appended to the command, culprit flag the message must name, xfail reason or None)
FLAG_CASES: list[tuple[str, list[str], str, str | None]] = [
    ("embed", ["--layers", "x"], "--layers", None),
    ("fewshot", ["--data-fraction", "abc"], "--data-fraction", None),
    ("fewshot", ["--data-fraction", "0.1,x"], "--data-fraction", None),
    ("fewshot", ["--data-fraction", "0"], "--data-fraction", None),
    ("fewshot", ["--data-fraction", "nan"], "--data-fraction", None),
    ("fewshot", ["--seed", "x"], "--seed", None),
    ("fewshot", ["--seed", "-1"], "--seed", None),
    ("fewshot", ["--method", "medfocus", "--points-per-side", "0"], "--points-per-side", None),
    ("fewshot", ["--method", "medfocus-attn", "--attn-layers", "0,x"], "--attn-layers", None),
    ("fewshot", ["--method", "medfocus-attn", "--attn-layers", "99"], "--attn-layers", None),
    ("fewshot", ["--batch-size", "0"], "--batch-size", None),
    ("fewshot", ["--lr", "nan"], "--lr", None),
    ("fewshot", ["--lr", "0"], "--lr", None),
    ("fewshot", ["--coop-lr", "inf"], "--coop-lr", None),
    ("fewshot", ["--epochs", "0"], "--epochs", None),
    ("fewshot", ["--method", "linear-probe,nope"], "nope", None),
    ("segment", ["--lr", "nan"], "--lr", None),
    ("segment", ["--lr", "inf"], "--lr", None),
    ("segment", ["--lr", "0"], "--lr", None),
    ("segment", ["--batch-size", "0"], "--batch-size", None),
    ("segment", ["--epochs", "0"], "--epochs", None),
    ("segment", ["--method", "unet", "--unet-channels", "8"], "--unet-channels", None),
    ("fewshot", ["--data-fraction", "2"], "--data-fraction", None),
    ("classify", ["--batch-size", "0"], "--batch-size", None),
    ("classify", ["--epochs", "0"], "--epochs", None),
    ("classify", ["--lr", "nan"], "--lr", None),
    ("classify", ["--lr", "-1"], "--lr", None),
    ("segment", ["--encoder-image-size", "30"], "--encoder-image-size", None),
    ("segment", ["--unet-image-size", "0"], "--unet-image-size", None),
    ("classify", ["--backbone-image-size", "x"], "--backbone-image-size", None),
    ("classify", ["--label-fraction", "1.5"], "--label-fraction", None),
]


@pytest.mark.parametrize(
    ("task", "flags", "flag"),
    [
        pytest.param(
            t, f, n, id=f"{t}{'_'.join(f)}", marks=[pytest.mark.xfail(strict=True, reason=r)] if r else []
        )
        for t, f, n, r in FLAG_CASES
    ],
)
def test_bad_flag_values_are_one_line_errors(tmp_path, capsys, tiny_fewshot, task, flags, flag) -> None:
    data = tmp_path / "ok.npz"
    np.savez(data, **medmnist_arrays())
    if task == "embed":
        argv = [*EMBED, "--data", str(data), "--store", str(tmp_path / "cache")]
    elif task == "segment":
        argv = [*SEGMENT, "--data", str(write_volume_dataset(tmp_path / "volumes")), "--store", str(tmp_path / "s"),
                "--out", str(tmp_path / "run")]  # fmt: skip
    else:
        argv = [
            *_train_argv(task, tmp_path, tiny_fewshot),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
        ]
    rc, _, err = run_cli(capsys, [*argv, *flags])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("samadapt: error: "), err
    assert flag.lstrip("-") in lines[0].replace("_", "-"), lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_subprocess_warnings_are_one_line_each(tmp_path) -> None:
    """The console script prints a skip or fallback as `samadapt: warning: ...`, not Python's file:line + source."""
    root = tmp_path / "classes"
    for label in ("benign", "malignant"):
        for seed in range(3):
            path = root / label / f"{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(sample_rgb(seed=seed + (3 if label == "malignant" else 0))))
    (root / "unused").mkdir()
    command = [sys.executable, "-c", "import sys; from samadapt.cli.main import main; sys.exit(main())",
               *EMBED, "--data", str(root), "--store", str(tmp_path / "cache")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert f"samadapt: warning: {root / 'unused'}: class folder holds no images" in lines
    assert all(line.startswith("samadapt: warning: ") for line in lines), done.stderr
