"""`--precision auto`: ISA pre-check, measured bf16/fp32 speed (cached per machine), env override, CUDA, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samadapt.cli.main import main
from samadapt.encoders import precision as P
from samadapt.errors import ConfigError
from samadapt.store import open_store

TINY = ["--encoder", "sam_vit_b", "--arch", "tiny", "--no-progress", "--image-size", "64"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test gets an empty decision cache and no SAMADAPT_PRECISION from the caller's shell."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(P.ENV_VAR, raising=False)


class FakeTiming:
    """Stands in for the matmul timing: returns a fixed bf16/fp32 ratio and counts the measurements."""

    def __init__(self, speedup: float) -> None:
        self.speedup = speedup
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> dict[str, float]:
        self.calls += 1
        return {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * self.speedup, "bf16_speedup": self.speedup}


def _machine(monkeypatch, flags: set[str], speedup: float) -> FakeTiming:
    timing = FakeTiming(speedup)
    monkeypatch.setattr(P, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(P, "measure_bf16_speedup", timing)
    return timing


AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
ZEN4 = AVX2 | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16"}


def test_explicit_precisions_pass_through_and_unknown_ones_are_config_errors(monkeypatch):
    timing = _machine(monkeypatch, AVX2, 0.2)
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: honoured, even if slow
    assert timing.calls == 0  # nothing measured for an explicit choice
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        P.resolve_precision("fp16", "cpu")


def test_cpu_without_native_bf16_gets_fp32_whatever_the_timing(monkeypatch):
    _machine(monkeypatch, AVX2, 3.0)  # even a (noisy) fast bf16 timing cannot override the ISA
    decision = P.decide_precision("auto", "cpu")
    assert decision.precision == "fp32" and decision.source == "isa"
    assert "no native bf16: AVX2 only" in decision.reason and "bf16 matmul 3.0x fp32" in decision.reason
    assert decision.describe() == f"precision auto -> fp32 ({decision.reason})"


@pytest.mark.parametrize(
    ("flags", "speedup", "expected"),
    [
        (SAPPHIRE_RAPIDS, 4.0, "bf16"),  # AMX tiles
        (ZEN4, 2.0, "bf16"),  # AVX-512 BF16, faster
        (ZEN4, 1.1, "fp32"),  # native but not faster enough (AMX switched off for oneDNN measured so)
        (set(), 2.5, "bf16"),  # no /proc/cpuinfo (macOS): the timing alone decides
        (set(), 0.5, "fp32"),
    ],
)
def test_native_bf16_cpu_is_decided_by_the_measurement(monkeypatch, flags, speedup, expected):
    _machine(monkeypatch, flags, speedup)
    decision = P.decide_precision("auto", "cpu")
    assert decision.precision == expected and decision.bf16_speedup == speedup


def test_measurement_is_cached_per_machine_key(monkeypatch):
    timing = _machine(monkeypatch, SAPPHIRE_RAPIDS, 4.0)
    first = P.decide_precision("auto", "cpu")
    second = P.decide_precision("auto", "cpu")
    assert timing.calls == 1 and (first.source, second.source) == ("benchmark", "cache")
    assert first.precision == second.precision == "bf16"
    cache = json.loads(P.cache_path().read_text())
    (key,) = cache
    assert "torch " + torch.__version__ in key and f"threads {torch.get_num_threads()}" in key
    assert cache[key]["bf16_speedup"] == 4.0

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # another thread count is another machine key
    try:
        P.decide_precision("auto", "cpu")
    finally:
        torch.set_num_threads(threads)
    assert timing.calls == 2 and len(json.loads(P.cache_path().read_text())) == 2

    P.cache_path().write_text("{not json")  # a damaged cache is measured again and rewritten
    assert P.decide_precision("auto", "cpu").source == "benchmark" and timing.calls == 3
    assert len(json.loads(P.cache_path().read_text())) == 1


def test_env_override(monkeypatch):
    timing = _machine(monkeypatch, AVX2, 0.2)
    monkeypatch.setenv(P.ENV_VAR, "bf16")
    decision = P.decide_precision("auto", "cpu")
    assert (decision.precision, decision.source) == ("bf16", "env") and timing.calls == 0
    assert P.resolve_precision("fp32", "cpu") == "fp32"  # an explicit flag beats the environment
    monkeypatch.setenv(P.ENV_VAR, "FP32")
    assert P.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv(P.ENV_VAR, "half")
    with pytest.raises(ConfigError, match="SAMADAPT_PRECISION='half'"):
        P.resolve_precision("auto", "cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_cuda_uses_the_device_answer(monkeypatch, native, expected):
    timing = _machine(monkeypatch, AVX2, 0.2)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    decision = P.decide_precision("auto", "cuda")
    assert decision.precision == expected and decision.source == "cuda" and "Fake GPU" in decision.reason
    assert asked == [False] and timing.calls == 0  # emulated bf16 does not count; the CPU is not timed


def test_real_measurement_is_quick_and_sane():
    result = P.measure_bf16_speedup(shape=(256, 256, 256), seconds=0.02)
    assert result["fp32_gflops"] > 0 and result["bf16_gflops"] > 0
    assert result["bf16_speedup"] == pytest.approx(result["bf16_gflops"] / result["fp32_gflops"])


def _native_bf16_here() -> bool:
    return any(flag in P.cpu_flags() for flag in P.NATIVE_BF16_FLAGS)


@pytest.mark.skipif(_native_bf16_here(), reason="this CPU has native bf16; the AVX2 case is covered mocked")
def test_auto_on_this_cpu_without_native_bf16_is_fp32():
    decision = P.decide_precision("auto", "cpu")  # the real /proc/cpuinfo and a real timing
    assert decision.precision == "fp32" and "no native bf16" in decision.reason


def test_embed_defaults_to_auto_and_records_the_resolved_precision(tmp_path, capsys):
    data = tmp_path / "tiny.npz"  # MedMNIST layout: 2 train, 2 val, 2 test grey images
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")
    }
    np.savez(data, **arrays, **{f"{s}_labels": np.zeros((2, 1), np.int64) for s in ("train", "val", "test")})
    cache = tmp_path / "cache"
    assert main(["embed", *TINY, "--data", str(data), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    resolved = P.resolve_precision("auto", "cpu")
    assert f"precision auto -> {resolved} (" in out and f"({resolved}, 64px" in out
    if not _native_bf16_here():
        assert "precision auto -> fp32 (this CPU has no native bf16" in out
    with open_store(cache, create=False) as store:
        (fields,) = store.configs().values()
    assert fields["precision"] == resolved != "auto"
    # the same request spelled out is the same entry: auto never makes keys of its own
    assert main(["embed", *TINY, "--data", str(data), "--cache", str(cache), "--precision", resolved]) == 0
    assert "computed 0, reused 6" in capsys.readouterr().out


def test_info_shows_the_auto_decision(monkeypatch, capsys):
    _machine(monkeypatch, AVX2, 0.3)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto -> fp32 (this CPU has no native bf16: AVX2 only; bf16 matmul 0.3x fp32)" in out
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precision_auto"]["cpu"]["precision"] == "fp32"
    assert np.isclose(data["precision_auto"]["cpu"]["bf16_speedup"], 0.3)
