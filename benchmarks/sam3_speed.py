"""Speed of samadapt's SAM 3 image encoder against the official `sam3` code, side by side in one process.

Runs in the sam3 venv (``.venv-sam3``; the official package needs numpy<2.4):

    PYTHONPATH=src .venv-sam3/bin/python benchmarks/sam3_speed.py            # writes benchmarks/results/sam3_speed.json
    PYTHONPATH=src .venv-sam3/bin/python benchmarks/sam3_speed.py --tiny     # smoke run with the tiny arch

Both get the same weights: the official vision backbone as ``build_sam3_image_model`` builds it
(``sam3.model_builder._create_vision_backbone(enable_inst_interactivity=False)``, from the same builder functions
but without its CUDA-only position-encoding cache), random values added to every
parameter, saved in the sam3.pt container (``{"model": {"detector.backbone.vision_backbone....": ...}}``) and loaded
back by ``samadapt.load_encoder("sam3", ...)``. What is timed is the image-encoder forward on one preprocessed
[1, 3, 1008, 1008] image (``SAM3VLBackbone.forward_image``, what ``Sam3Processor.set_image`` runs; preprocessing is
the same for both and excluded).

Contenders: official fp32; official under CPU bf16 autocast (the official code has no other bf16 path on CPU);
samadapt fp32; samadapt bf16 (bf16 weights and input, as ``load_encoder(..., precision="bf16")`` does on CPU).
Round-robin (one forward per contender per round) so that a busy machine slows all alike; the median over rounds is
reported, with errors against official fp32 (max abs difference over the reference's max abs value).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# official_fp32 first (the reference); official bf16 autocast last: on CPUs without native bf16 it is the slowest.
CONTENDERS: dict[str, tuple[str, str]] = {
    "official_fp32": ("official", "fp32"),
    "samadapt_fp32": ("samadapt", "fp32"),
    "samadapt_bf16": ("samadapt", "bf16"),
    "official_bf16_autocast": ("official", "bf16"),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor()
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(isa)})"


def official_backbone(tiny: bool) -> torch.nn.Module:
    from sam3.model.vl_combiner import SAM3VLBackbone

    if tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from samadapt.encoders.registry import TINY_ARCHS
        from test_sam3_identity import official_backbone as tiny_backbone

        backbone = tiny_backbone(dict(TINY_ARCHS["sam3"]), 112)
        backbone.vision_backbone.sam2_convs = None
        return backbone
    from sam3.model_builder import _create_position_encoding, _create_vit_backbone, _create_vit_neck

    # _create_vision_backbone(enable_inst_interactivity=False) without the position-encoding cache (it needs CUDA)
    neck = _create_vit_neck(
        _create_position_encoding(), _create_vit_backbone(), enable_inst_interactivity=False
    )
    return SAM3VLBackbone(visual=neck, text=None, scalp=1)


def build(
    name: str, official: torch.nn.Module, ckpt: Path, size: int, tiny: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from a preprocessed float32 batch to the float32 image embedding [B, 256, S/14, S/14]."""
    impl, precision = CONTENDERS[name]
    if impl == "official":
        autocast = precision == "bf16"

        @torch.inference_mode()
        def run_official(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return official.forward_image(x)["vision_features"].float()

        return run_official
    from samadapt.encoders import load_encoder

    encoder = load_encoder("sam3", ckpt, precision=precision, image_size=size, arch="tiny" if tiny else None)

    def run_ours(x: torch.Tensor) -> torch.Tensor:
        return encoder.embed_tensor(x)[0]

    return run_ours


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny arch at 112 px (a smoke run; no JSON)")
    parser.add_argument(
        "--only", nargs="+", choices=list(CONTENDERS), default=None, help="run only these contenders"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument(
        "--per-block",
        action="store_true",
        help="time one windowed and one global block (real width, 72 x 72 grid) interleaved --rounds times",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results = REPO / "benchmarks" / "results"
    if args.per_block:
        per_block(args.rounds, args.out or results / "sam3_speed_blocks.json")
        return
    args.out = args.out or results / "sam3_speed.json"
    from samadapt.encoders.preprocessing import preprocess_sam3

    size = 112 if args.tiny else 1008
    load_before = os.getloadavg()
    torch.manual_seed(0)
    official = official_backbone(args.tiny).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (40, 50, 3)), np.ones((21, 21, 1))).astype(
        np.uint8
    )  # 840 x 1050 RGB
    x = preprocess_sam3(image, size)[0][None]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam3.pt"
        state = {"detector.backbone." + k: v for k, v in official.state_dict().items()}
        torch.save({"model": state}, ckpt)
        del state
        fns = {}
        for name in [n for n in CONTENDERS if not args.only or n in args.only]:
            print(f"building {name}", flush=True)
            fns[name] = build(name, official, ckpt, size, args.tiny)
    times: dict[str, list[float]] = {n: [] for n in fns}
    outputs: dict[str, torch.Tensor] = {}
    meta = {
        "what": f"SAM 3 image-encoder forward on one preprocessed {size} px image (batch 1), seconds per image",
        "timing": f"median of {args.rounds} round-robin round(s) after {args.warmup} warm-up round(s), one process",
        "arch": "tiny" if args.tiny else "sam3 (official _create_vit_backbone + _create_vit_neck)",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": load_before,
    }
    for r in range(args.warmup + args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn(x)
            elapsed = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(elapsed)
            outputs[name] = out
            print(
                f"  round {r}{' (warm-up)' if r < args.warmup else ''} {name:24s} {elapsed:8.2f} s",
                flush=True,
            )
            if (
                r >= args.warmup and not args.tiny
            ):  # written after every forward: a long run keeps what it has
                write(args.out, meta, times, outputs)
    for row in summary(times, outputs):
        print(
            f"{row['contender']:24s} {row['seconds_per_image_median']:8.2f} s  x{row['speedup_vs_official_fp32']:5.2f}"
            f"  err {row['error_vs_official_fp32_max_abs_over_ref_max']:.2e}"
        )


def per_block(rounds: int, out: Path) -> None:
    """Official vs our block forward in fp32 on the same weights: a cheap, repeatable ratio on a busy
    machine (a full forward is 32 such blocks: 28 windowed, 4 global)."""
    from sam3.model.vitdet import ViT

    from samadapt.encoders.registry import SAM3_VIT
    from samadapt.encoders.sam3_vit import Sam3ViTEncoder

    torch.manual_seed(0)
    arch = {**SAM3_VIT, "depth": 8, "global_attn_indexes": (7,)}
    official = ViT(
        img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=1024, depth=8, num_heads=16, mlp_ratio=4.625,
        norm_layer="LayerNorm", qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=(7,),
        rel_pos_blocks=(), use_rope=True, use_interp_rope=True, window_size=24, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, bias_patch_embed=False,
    ).eval()  # fmt: skip
    ours = Sam3ViTEncoder(**arch, img_size=1008).eval()
    ours.trunk.load_state_dict({k: v for k, v in official.state_dict().items() if "freqs_cis" not in k})
    x = torch.randn(1, 72, 72, 1024)
    contenders = {}
    for kind, index in (("windowed", 0), ("global", 7)):
        contenders[f"official_fp32_{kind}"] = (official.blocks[index], torch.float32)
        contenders[f"samadapt_fp32_{kind}"] = (ours.trunk.blocks[index], torch.float32)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0: warm-up (oneDNN weight packing)
            for name, (block, dtype) in contenders.items():
                t0 = time.perf_counter()
                y = block(x.to(dtype))
                elapsed = time.perf_counter() - t0
                outputs[name] = y.float()
                if r:
                    times[name].append(elapsed)
                print(f"  round {r} {name:26s} {elapsed:7.3f} s", flush=True)
    rows = []
    for kind in ("windowed", "global"):
        ref, base = outputs[f"official_fp32_{kind}"], statistics.median(times[f"official_fp32_{kind}"])
        for impl in ("official", "samadapt"):
            name = f"{impl}_fp32_{kind}"
            median = statistics.median(times[name])
            err = float((outputs[name] - ref).abs().max() / ref.abs().max())
            rows.append({"contender": name, "seconds_median": median, "seconds_all": times[name],
                         "speedup_vs_official_fp32": base / median, "error_vs_official_fp32": err})  # fmt: skip
            print(f"{name:26s} {median:7.3f} s  x{base / median:5.2f}  err {err:.1e}")
    result = {
        "what": "one SAM 3 block forward (1 x 72 x 72 x 1024 tokens, real width), seconds",
        "timing": f"median of {rounds} interleaved rounds after 1 warm-up round, one process",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def summary(times: dict[str, list[float]], outputs: dict[str, torch.Tensor]) -> list[dict[str, object]]:
    ref = outputs["official_fp32"]
    base = statistics.median(times["official_fp32"])
    rows = []
    for name, (impl, precision) in CONTENDERS.items():
        if not times.get(name):
            continue
        median = statistics.median(times[name])
        rows.append(
            {
                "contender": name,
                "implementation": impl,
                "precision": precision,
                "seconds_per_image_median": median,
                "seconds_all": times[name],
                "speedup_vs_official_fp32": base / median,
                "error_vs_official_fp32_max_abs_over_ref_max": float(
                    (outputs[name] - ref).abs().max() / ref.abs().max()
                ),
            }
        )
    return rows


def write(
    path: Path, meta: dict[str, object], times: dict[str, list[float]], outputs: dict[str, torch.Tensor]
) -> None:
    result = {
        **meta,
        "load_average_now": os.getloadavg(),
        "embedding_shape": list(outputs["official_fp32"].shape),
    }
    result["rows"] = summary(times, outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
