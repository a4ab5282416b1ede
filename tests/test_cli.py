"""The CLI entry: info, module execution, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from samadapt.cli.main import main


def test_info_json_lists_every_encoder_with_its_preprocessing(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"].startswith("2.14.1")
    assert data["torch_threads"] >= 1
    assert {"sam_vit_b", "medsam_vit_b", "sam2_hiera_t", "sam2_hiera_b+", "mobilesam_vit_t"} <= set(
        data["encoders"]
    )
    assert data["encoders"]["medsam_vit_b"]["preprocessing"] == "medsam"
    assert data["encoders"]["sam2_hiera_l"]["preprocessing"] == "sam2"
    assert "avx512_bf16" in data["bf16"]


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bf16 on cpu" in out and "sam_vit_h" in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "samadapt", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("samadapt ")


def test_task_command_without_task_is_a_one_line_error(capsys):
    assert main(["train", "--data", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "samadapt: error: samadapt train: say which task with --task"


def _tiny_npz(path):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (2, 1))
    np.savez(path, **arrays)
    return path


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "ok.npz")  # valid data, so the checkpoint is what fails
    code = main(
        ["embed", "--encoder", "sam_vit_b", "--checkpoint", str(tmp_path / "nope.pth"), "--data", str(data),
         "--store", str(tmp_path / "cache")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "nope.pth" in err and "file not found" in err


def test_embed_shows_a_progress_bar_and_takes_every_documented_flag(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "ok.npz")
    argv = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--data", str(data), "--store",
            str(tmp_path / "cache"), "--precision", "bf16", "--encoder-image-size", "64", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "6/6" in captured.err  # tqdm's bar, on stderr
    assert "computed 6" in captured.out and "bf16, 64px" in captured.out
    argv[argv.index("--store") + 1] = str(tmp_path / "cache2")  # compute again, this time without a bar
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "computed 6" in captured.out and "6/6" not in captured.err


@pytest.mark.e2e
def test_demo_quick_runs_all_three_tasks(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "tiny random-weight sam_vit_b" in out
    for report in ("classify/report.html", "segment/summary.md", "fewshot/report.html"):
        assert (tmp_path / "demo" / report).is_file(), report
    assert "slca" in (tmp_path / "demo" / "classify" / "summary.md").read_text()


@pytest.mark.parametrize("layers", ["foo", "neck", "2,fpn0"])
def test_embed_layer_names_for_a_sam_vit_are_a_one_line_error(tmp_path, capsys, layers):
    data = _tiny_npz(tmp_path / "ok.npz")
    argv = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--data", str(data), "--store",
            str(tmp_path / "cache"), "--encoder-image-size", "64", "--layers", layers, "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samadapt: error: --layers: sam_vit_b layers are transformer block indices")
    assert len(err.splitlines()) == 1


def test_a_flag_on_the_command_line_beats_the_config_file_even_at_its_default(tmp_path, monkeypatch):
    import samadapt.engine.lifecycle as lifecycle
    from samadapt.tasks.classify.config import ClassifyConfig

    seen = {}

    def fake_execute_run(
        task, cfg, **kwargs
    ):  # stop before any data is read: the merged configuration matters
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(lifecycle, "execute_run", fake_execute_run)
    (tmp_path / "c.yaml").write_text("task: classify\nepochs: 7\nlr: 0.5\nseed: 3\n")
    default_epochs = ClassifyConfig().epochs
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--epochs", str(default_epochs), "--data", "x"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    cfg = seen["cfg"]
    assert cfg.epochs == default_epochs and cfg.lr == 0.5 and cfg.seed == 3
    assert cfg.out == str(tmp_path / "run") and cfg.data == "x"


def test_deprecated_embed_flags_still_work_and_name_the_new_flag(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "ok.npz")
    argv = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--data", str(data), "--cache",
            str(tmp_path / "cache"), "--image-size", "64", "--no-progress"]  # fmt: skip
    with pytest.warns(FutureWarning) as caught:
        assert main(argv) == 0
    messages = [str(w.message) for w in caught]
    assert any("--cache" in m and "--store" in m for m in messages), messages
    assert any("--image-size" in m and "--encoder-image-size" in m for m in messages), messages
    assert "computed 6" in capsys.readouterr().out and (tmp_path / "cache").is_dir()


def test_embed_data_format_reads_patient_subfolders_as_unlabelled_images(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for patient in ("p001", "p002"):
        (tmp_path / "data" / patient).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
                tmp_path / "data" / patient / f"{i}.png"
            )
    argv = ["embed", "--encoder", "sam_vit_b", "--arch", "tiny", "--encoder-image-size", "64", "--data",
            str(tmp_path / "data"), "--store", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert main([*argv, "--data-format", "images"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert main([*argv, "--data-format", "medmnist"]) == 2  # forcing a wrong layout is a one-line error
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_deprecated_config_file_keys_still_work_and_name_the_new_key(tmp_path, monkeypatch):
    """`image-size:` in a classify file and `heads:` in a segment sweep file: taken, with a warning naming the
    new key (the run and the sweep themselves are stubbed out: the settings they receive are what matters)."""
    import samadapt.engine.lifecycle as lifecycle
    import samadapt.engine.sweep as sweep

    seen = {}
    monkeypatch.setattr(lifecycle, "execute_run", lambda task, cfg, **kw: seen.update(cfg=cfg) or {})

    def fake_sweep(task, base, axes, **kwargs):
        seen.update(base=base, axes=axes)
        return tmp_path / "report.html"

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    (tmp_path / "c.yaml").write_text("task: classify\ndata: x\nimage-size: 96\n")
    with pytest.warns(FutureWarning, match="'image_size' is deprecated; use 'backbone_image_size'"):
        assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert seen["cfg"].backbone_image_size == 96
    (tmp_path / "s.yaml").write_text(
        "task: segment\ndata: x\nheads: [linear, unet]\ntrain-volumes: [1, all]\n"
    )
    with pytest.warns(FutureWarning, match="'heads' is deprecated; use 'methods'"):
        assert (
            main(
                ["sweep", "--config", str(tmp_path / "s.yaml"), "--seeds", "2", "--out", str(tmp_path / "s")]
            )
            == 0
        )
    assert seen["axes"]["method"] == ["linear", "unet"] and seen["axes"]["seed"] == [0, 1]
    assert seen["axes"]["train_volumes"] == [1, "all"] and seen["base"].out == str(tmp_path / "s")
