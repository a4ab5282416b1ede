"""Embedding speed of samadapt's SAM 2.1 Hiera-T encoder path against the official `SAM2ImagePredictor.set_image`.

Both sides get the same weights: an official `sam2.1_hiera_t` model built with the official builder and packaged
config, every parameter perturbed (as in tests/test_identity_sam2.py), saved as the official `{"model": ...}` .pt
and loaded back by `samadapt.load_encoder`. Both start from the same uint8 RGB image (scikit-image's retina,
immunohistochemistry, and cell / microaneurysms as RGB) and include their preprocessing (resize to 1024,
normalise): what is timed is `predictor.set_image(image)` against `encoder.embed([image])`.

Contenders: official fp32; official under CPU bf16 autocast (the official code has no bf16 switch on CPU; autocast
is how a user would get one); samadapt fp32 (image embedding only, what the store keeps by default); samadapt fp32
with the two high-resolution maps set_image also computes (`layers=["high_res0", "high_res1"]`); samadapt bf16
(bf16 weights and input). Round-robin in one process, median over rounds; errors against official fp32's
`_features["image_embed"]`.

    python benchmarks/hiera_speed.py --quick     # one timed round; writes benchmarks/results/hiera_speed.json
"""

from __future__ import annotations

import argparse
import os
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
sys.path.insert(0, str(REPO / "benchmarks"))

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
IMAGES = ("retina", "immunohistochemistry", "cell", "microaneurysms")
CONTENDERS = (
    "official_fp32",
    "official_bf16_autocast",
    "samadapt_fp32",
    "samadapt_fp32_with_high_res",
    "samadapt_bf16",
)


def make_checkpoint(path: Path, seed: int) -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(CONFIG, ckpt_path=None, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": model.state_dict()}, path)
    return model.eval()


def rgb_images() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in IMAGES:
        image = getattr(data, name)()
        out[name] = np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image)
    return out


def build(name: str, model: torch.nn.Module, ckpt: Path) -> Callable[[np.ndarray], torch.Tensor]:
    """A function from a uint8 RGB image to the float32 image embedding [1, 256, 64, 64]."""
    if name.startswith("official"):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(model)
        autocast = name.endswith("bf16_autocast")

        def official(image: np.ndarray) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                predictor.set_image(image)
            return predictor._features["image_embed"].float()

        return official

    from samadapt.encoders import load_encoder

    precision = "bf16" if name.endswith("bf16") else "fp32"
    encoder = load_encoder("sam2_hiera_t", checkpoint=ckpt, precision=precision)
    layers = ["high_res0", "high_res1"] if name.endswith("with_high_res") else None

    def ours(image: np.ndarray) -> torch.Tensor:
        out = encoder.embed([image], layers=layers)
        return out if layers is None else out["neck"]

    return ours


def main() -> None:
    from embed_speed import cpu_description

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (one image each, cycling)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one timed round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", choices=CONTENDERS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hiera_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rounds = 1 if args.quick else args.repeats
    names = list(args.only or CONTENDERS)
    if "official_fp32" not in names:
        names.insert(0, "official_fp32")
    images = rgb_images()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam2.1_hiera_t_random.pt"
        model = make_checkpoint(ckpt, seed=0)
        fns = {name: build(name, model, ckpt) for name in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        outputs: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for r in range(args.warmup + rounds):
            image_name = IMAGES[r % len(IMAGES)]
            for name in names:
                t0 = time.perf_counter()
                out = fns[name](images[image_name])
                elapsed = time.perf_counter() - t0
                if r >= args.warmup:
                    times[name].append(elapsed)
                    outputs[name].setdefault(image_name, out.detach().cpu().clone())
                warm = " (warm-up)" if r < args.warmup else ""
                print(f"  round {r}{warm} {name:30s} {image_name:22s} {elapsed:7.2f} s", flush=True)
    ref = statistics.median(times["official_fp32"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        diffs = [
            (
                (outputs[name][k] - outputs["official_fp32"][k]).abs().max()
                / outputs["official_fp32"][k].abs().max()
            )
            for k in outputs[name]
        ]
        rows.append(
            {
                "contender": name,
                "seconds_per_image_median": med,
                "seconds_all": times[name],
                "speedup_vs_official_fp32": ref / med,
                "max_abs_err_over_ref_max": float(max(diffs)),
            }
        )
        print(f"{name:30s} {med:7.2f} s  {ref / med:5.2f}x  err/max {float(max(diffs)):.2e}")
    result = {
        "what": "SAM 2.1 Hiera-T: official SAM2ImagePredictor.set_image vs samadapt encoder.embed, uint8 image "
        "in, 1024 input, batch 1, seconds per image (preprocessing included on both sides)",
        "timing": f"median of {rounds} round-robin rounds after {args.warmup} warm-up round(s), one process",
        "cpu": cpu_description(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_before_after": [load_before, os.getloadavg()],
        "rows": rows,
    }
    from samadapt.utils.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
