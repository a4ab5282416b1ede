"""`samadapt info`: what this installation can do on this machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def cpu_bf16_support() -> dict[str, bool | str]:
    """Native bf16 matrix instructions make the bf16 path ~3-4x faster than fp32 on CPU."""
    import torch

    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
    }


def _auto_decisions(cuda: bool) -> dict:
    """What `--precision auto` resolves to on the CPU (and the GPU), with the reason."""
    from samadapt.encoders.precision import decision_summary

    out = {"cpu": decision_summary("cpu")}
    if cuda:
        out["cuda"] = decision_summary("cuda")
    return out


def collect() -> dict:
    import torch

    from samadapt import __version__
    from samadapt.encoders.preprocessing import PREPROCESSING_DESCRIPTIONS
    from samadapt.encoders.registry import ENCODERS
    from samadapt.utils.threads import usable_cpus

    cuda = torch.cuda.is_available()
    return {
        "samadapt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "usable_cpus": usable_cpus(),
        "bf16": cpu_bf16_support(),
        "precision_auto": _auto_decisions(cuda),
        "cuda": {
            "available": cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        },
        "encoders": {
            name: {
                "family": spec.family,
                "preprocessing": spec.preprocessing,
                "preprocessing_description": PREPROCESSING_DESCRIPTIONS[spec.preprocessing],
                "default_image_size": spec.default_image_size,
                "official_files": list(spec.official_files),
                "description": spec.description,
            }
            for name, spec in ENCODERS.items()
        },
    }


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    bf16 = data["bf16"]
    print(f"samadapt {data['samadapt']}  (python {data['python']}, torch {data['torch']})")
    print(f"platform     {data['platform']}")
    print(
        f"cpu          {data['cpu_count']} cores ({data['usable_cpus']} usable: affinity and cgroup quota), "
        f"torch threads {data['torch_threads']}, {bf16['cpu_capability']}"
    )
    native = bf16["avx512_bf16"] or bf16["amx_bf16"]
    print(
        f"bf16 on cpu  {'native (avx512_bf16/amx)' if native else 'emulated (slow): prefer --precision fp32'}"
    )
    auto = data["precision_auto"]
    print(f"precision    cpu: auto -> {auto['cpu']['precision']} ({auto['cpu']['reason']})")
    cuda = data["cuda"]
    print(f"cuda         {', '.join(cuda['devices']) if cuda['available'] else 'not available'}")
    if "cuda" in auto:
        print(f"precision    cuda: auto -> {auto['cuda']['precision']} ({auto['cuda']['reason']})")
    print(f"             (cached in {auto['cpu']['cache']}; SAMADAPT_PRECISION=fp32|bf16 overrides auto)")
    print("encoders:")
    for name, enc in data["encoders"].items():
        files = ", ".join(enc["official_files"])
        print(f"  {name:<14} {enc['description']}")
        print(f"  {'':<14} preprocessing {enc['preprocessing']}: {enc['preprocessing_description']}")
        print(f"  {'':<14} official files: {files}")
    return 0
