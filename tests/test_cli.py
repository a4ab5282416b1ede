"""The CLI entry: info, module execution, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code = main(
        ["embed", "--encoder", "sam_vit_b", "--checkpoint", str(tmp_path / "nope.pth"), "--data", str(tmp_path),
         "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_demo_quick_runs_all_three_tasks(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "tiny random-weight sam_vit_b" in out
    for report in ("classify/report.html", "segment/results.md", "fewshot/report.html"):
        assert (tmp_path / "demo" / report).is_file(), report
    assert "slca" in (tmp_path / "demo" / "classify" / "summary.md").read_text()
