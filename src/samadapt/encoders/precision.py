"""`--precision auto`: bf16 where this machine runs it natively and faster than fp32, else fp32.

On CUDA the answer is the device's: bf16 when it has native bf16 arithmetic (Ampere or newer). On a CPU it depends
on the instruction set and on how oneDNN uses it, so it is measured: a bf16 and an fp32 matrix product of a ViT-B
linear-layer shape (1024 tokens x 768 -> 768), timed a few times each (about 0.1-0.3 s in all), once per machine;
the result is cached in `~/.cache/samadapt/precision.json` keyed by CPU model, ISA flags, torch version and thread
count. A CPU without native bf16 instructions (no `avx512_bf16`, no `amx_bf16` in /proc/cpuinfo: e.g. AVX2 only)
never gets bf16, whatever the timing says: torch then converts bf16 to fp32 and back around every operation, which
measured 0.2x fp32 speed on an AVX2 EPYC. A native-bf16 CPU gets bf16 only when the measured product is at least
`MIN_SPEEDUP` times faster (AVX-512 BF16 without AMX can be slower end to end than fp32).

`SAMADAPT_PRECISION=fp32|bf16` overrides the decision (for clusters whose nodes differ, or to skip the timing).
What is recorded (run configs, the embedding store key) is always the resolved precision, never "auto".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from samadapt.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
ENV_VAR = "SAMADAPT_PRECISION"
# bf16 must beat fp32 by this factor in the timed product to be chosen (the rest of the encoder gains less).
MIN_SPEEDUP = 1.2
# One SAM ViT-B linear layer on 1024 tokens: realistic for the encoder, 1.2 GFLOP, well inside the cache budget.
BENCH_SHAPE = (1024, 768, 768)  # tokens, in features, out features
BENCH_SECONDS = 0.1  # per dtype, after one warm-up call
CACHE_NAME = "precision.json"
# x86 AMX tiles and AVX-512 BF16 dot products; Arm's BF16 extension (Graviton 3, Neoverse V1+) is named "bf16".
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Decision:
    """What `--precision auto` resolved to and why (printed by `samadapt embed` and `samadapt info`)."""

    precision: str  # "fp32" or "bf16"
    reason: str  # one line for humans
    source: str  # "explicit", "env", "cuda", "isa", "benchmark", "cache"
    bf16_speedup: float | None = None  # measured bf16 / fp32 throughput of the product, when known

    def describe(self, requested: str = "auto") -> str:
        return f"precision {requested} -> {self.precision} ({self.reason})"


def resolve_precision(requested: str, device: str | torch.device | None = "cpu") -> str:
    """ "fp32" or "bf16" for `requested` in ("auto", "fp32", "bf16") on `device`; see the module docstring."""
    return decide_precision(requested, device).precision


def decide_precision(requested: str, device: str | torch.device | None = "cpu") -> Decision:
    """`resolve_precision` with the reason; ConfigError for an unknown request or `SAMADAPT_PRECISION` value."""
    if requested in PRECISIONS:
        return Decision(requested, "as requested", "explicit")
    if requested != "auto":
        raise ConfigError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in PRECISIONS:
            raise ConfigError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(PRECISIONS)}")
        return Decision(forced, f"{ENV_VAR}={forced}", "env")
    dev = _device(device)
    if dev.type == "cuda":
        return _cuda_decision(dev)
    if dev.type != "cpu":
        return Decision("fp32", f"{dev.type}: bf16 is not measured there", "device")
    return cpu_decision()


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cuda_decision(device: torch.device) -> Decision:
    if not torch.cuda.is_available():
        return Decision("fp32", "no CUDA device is visible", "cuda")
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Decision("bf16", f"{name} has native bf16", "cuda")
    return Decision("fp32", f"{name} has no native bf16", "cuda")


# ---- CPU ------------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The ISA flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa_summary(flags: set[str]) -> str:
    """The widest vector ISA the flags name, e.g. "AMX-BF16", "AVX-512 BF16", "AVX-512", "AVX2"."""
    for flag, name in (
        ("amx_bf16", "AMX-BF16"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("avx512f", "AVX-512"),
        ("avx2", "AVX2"),
        ("asimd", "NEON"),
    ):
        if flag in flags:
            return name
    return torch.backends.cpu.get_cpu_capability()


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "samadapt" / CACHE_NAME


def machine_key(flags: set[str] | None = None, threads: int | None = None) -> str:
    """What the measurement depends on: CPU model and flags, torch version (its oneDNN), thread count."""
    flags = cpu_flags() if flags is None else flags
    threads = torch.get_num_threads() if threads is None else threads
    flag_digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{cpu_model()}|flags {flag_digest}|torch {torch.__version__}|threads {threads}"


def measure_bf16_speedup(
    shape: tuple[int, int, int] = BENCH_SHAPE, seconds: float = BENCH_SECONDS
) -> dict[str, float]:
    """Time `F.linear` in fp32 and in bf16 on this CPU: {"fp32_gflops", "bf16_gflops", "bf16_speedup"}."""
    tokens, fan_in, fan_out = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=generator)
    w = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
    flops = 2.0 * tokens * fan_in * fan_out
    result: dict[str, float] = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            xd, wd = x.to(dtype), w.to(dtype)
            torch.nn.functional.linear(xd, wd)  # warm-up: oneDNN primitive creation, page faults
            calls, start = 0, time.perf_counter()
            while True:
                torch.nn.functional.linear(xd, wd)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds or calls >= 50:
                    break
            result[f"{name}_gflops"] = flops * calls / elapsed / 1e9
    result["bf16_speedup"] = result["bf16_gflops"] / result["fp32_gflops"]
    return result


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again and rewrite it
    return data if isinstance(data, dict) else {}


def cached_measurement(*, refresh: bool = False) -> tuple[dict[str, float], bool]:
    """(the measurement for this machine, whether it came from the cache); measures and caches on a miss."""
    path, key = cache_path(), machine_key()
    cache = _read_cache(path)
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("bf16_speedup"), (int, float)):
        return entry, True
    entry = {**measure_bf16_speedup(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cache[key] = entry
    try:
        from samadapt.utils.atomic import atomic_write_json

        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home: the decision still stands, it is just measured again next time
    return entry, False


def cpu_decision(*, refresh: bool = False) -> Decision:
    """bf16 on this CPU only with native bf16 instructions AND a measured speedup of at least MIN_SPEEDUP."""
    flags = cpu_flags()
    isa = cpu_isa_summary(flags)
    # No flags at all (no /proc/cpuinfo, e.g. macOS): nothing to pre-check, the timing alone decides.
    native = any(flag in flags for flag in NATIVE_BF16_FLAGS) or not flags
    measured, cached = cached_measurement(refresh=refresh)
    speedup = float(measured["bf16_speedup"])
    source = "cache" if cached else "benchmark"
    timing = f"bf16 matmul {speedup:.1f}x fp32"
    if not native:
        return Decision("fp32", f"this CPU has no native bf16: {isa} only; {timing}", "isa", speedup)
    if speedup < MIN_SPEEDUP:
        return Decision("fp32", f"{isa}, but {timing} (bf16 needs {MIN_SPEEDUP:.1f}x)", source, speedup)
    return Decision("bf16", f"{isa}; {timing}", source, speedup)


def decision_summary(device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """`decide_precision("auto", device)` as a JSON-able dict (for `samadapt info --json`)."""
    decision = decide_precision("auto", device)
    return {**asdict(decision), "cache": str(cache_path()), "machine_key": machine_key()}
