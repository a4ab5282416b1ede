"""Embedding speed of samadapt's SAM ViT-B image encoder against the official code and Hugging Face transformers.

All contenders get the same weights (a seeded random ``segment_anything`` vit_b, saved in the official flat .pth
format and loaded back by each one) and the same real images (scikit-image's retina, cell, immunohistochemistry and
microaneurysms), preprocessed once by the official ``SamPredictor`` path (``ResizeLongestSide`` + ``Sam.preprocess``).
What is timed is the image-encoder forward on that preprocessed [1, 3, 1024, 1024] tensor (the part of
``SamPredictor.set_image`` that costs; resizing is the same for everyone and excluded).

Contenders: official segment_anything fp32; transformers ``SamVisionModel`` with SDPA attention in fp32 and under bf16
autocast (weights converted with the key mapping of transformers' ``convert_sam_to_hf.py``); samadapt fp32 and bf16
(bf16 weights and input on CPU, autocast on CUDA); samadapt at image_size 512 and 256 (position tables resized).

Timing runs every contender in one process, round-robin (one image per contender per round), so a busy machine slows
all of them alike; the reported time is the median over rounds. Peak memory is measured per contender in a fresh
subprocess (``ru_maxrss`` after one forward; on CUDA ``max_memory_allocated``). Errors are against official fp32.

    python benchmarks/embed_speed.py                 # full run, writes benchmarks/results/embed_speed.json
    python benchmarks/embed_speed.py --quick         # one timed round
    python benchmarks/embed_speed.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

IMAGES = ("retina", "cell", "immunohistochemistry", "microaneurysms")
# name -> (implementation, precision, image size)
CONTENDERS: dict[str, tuple[str, str, int]] = {
    "official_fp32": ("official", "fp32", 1024),
    "transformers_sdpa_fp32": ("transformers", "fp32", 1024),
    "transformers_sdpa_bf16_autocast": ("transformers", "bf16", 1024),
    "samadapt_fp32": ("samadapt", "fp32", 1024),
    "samadapt_bf16": ("samadapt", "bf16", 1024),
    "samadapt_fp32_512": ("samadapt", "fp32", 512),
    "samadapt_bf16_512": ("samadapt", "bf16", 512),
    "samadapt_bf16_256": ("samadapt", "bf16", 256),
}
# segment_anything's parameter names -> transformers' (convert_sam_to_hf.py's KEYS_TO_MODIFY_MAPPING, encoder part)
HF_KEY_MAP = (
    ("patch_embed.proj", "patch_embed.projection"),
    ("blocks.", "layers."),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
)


def make_checkpoint(path: Path, *, seed: int) -> torch.nn.Module:
    """A seeded random official vit_b saved as the official flat state dict. SAM zero-initialises the position
    tables; they are made random here so that every contender has to use them correctly."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]().eval()
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
    torch.save(sam.state_dict(), path)
    return sam


def official_inputs(sam: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``SamPredictor.set_image`` feeds the encoder, for each image."""
    from segment_anything.utils.transforms import ResizeLongestSide
    from skimage import data

    resize = ResizeLongestSide(1024)
    out = {}
    for name in IMAGES:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        x = torch.as_tensor(resize.apply_image(img)).permute(2, 0, 1).contiguous()[None]
        with torch.no_grad():
            out[name] = sam.preprocess(x.float())
    return out


def samadapt_inputs(size: int) -> dict[str, torch.Tensor]:
    from skimage import data

    from samadapt.encoders.preprocessing import PREPROCESSORS

    return {name: PREPROCESSORS["sam"](getattr(data, name)(), size)[0][None] for name in IMAGES}


def encoder_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}


def build(name: str, ckpt: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from a preprocessed float32 batch to the float32 neck output [B, 256, S/16, S/16]."""
    impl, precision, size = CONTENDERS[name]
    state = encoder_state(ckpt)
    autocast = precision == "bf16" and (impl == "transformers" or device.type == "cuda")
    if impl == "official":
        from segment_anything import sam_model_registry

        model = sam_model_registry["vit_b"]().image_encoder
        model.load_state_dict(state, strict=True)
        run = model
    elif impl == "transformers":
        from transformers import SamVisionConfig, SamVisionModel

        model = SamVisionModel(SamVisionConfig(attn_implementation="sdpa"))  # the defaults are SAM vit_b
        mapped = {}
        for key, value in state.items():
            for old, new in HF_KEY_MAP:
                key = key.replace(old, new)
            mapped["vision_encoder." + key] = value
        model.load_state_dict(mapped, strict=True)

        def run(x: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=x).last_hidden_state

    else:
        from samadapt.encoders.registry import SAM_VIT_B
        from samadapt.encoders.sam_vit import SamViTEncoder

        model = SamViTEncoder(**SAM_VIT_B, img_size=size)
        model.load_state_dict(state, strict=True)
        if precision == "bf16" and not autocast:
            model = model.to(torch.bfloat16)

        def run(x: torch.Tensor) -> torch.Tensor:
            return model(x)[0]

    model.eval().requires_grad_(False).to(device)
    dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = run(x)
        return out.float()

    return forward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(
    names: list[str],
    ckpt: Path,
    device: torch.device,
    *,
    inputs_1024: dict[str, torch.Tensor],
    rounds: int,
    warmup: int,
    cpu_times: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, torch.Tensor]]]:
    """Wall seconds per contender (and, into `cpu_times`, process CPU seconds: less sensitive to other load)."""
    inputs = {1024: inputs_1024}
    for size in {CONTENDERS[n][2] for n in names} - {1024}:
        inputs[size] = samadapt_inputs(size)
    fns = {}
    for name in names:
        print(f"building {name}", flush=True)
        fns[name] = build(name, ckpt, device)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for r in range(warmup + rounds):
        image = IMAGES[r % len(IMAGES)]
        for name in names:
            x = inputs[CONTENDERS[name][2]][image]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fns[name](x)
            sync(device)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(cpu)
                outputs[name].setdefault(image, out.cpu())
            print(
                f"  round {r}{' (warm-up)' if r < warmup else ''} {name:32s} {image:22s} {elapsed:7.2f} s",
                flush=True,
            )
    return times, outputs


def peak_memory(name: str, ckpt: Path, device: torch.device, threads: int) -> dict[str, float]:
    """Run one forward of one contender in a fresh process and read its peak memory."""
    cmd = [sys.executable, __file__, "--memory-worker", name, "--ckpt", str(ckpt), "--device", str(device)]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(name: str, ckpt: Path, device: torch.device) -> None:
    """Resident memory sampled every millisecond (``ru_maxrss`` is useless here: Linux keeps the parent's value
    across fork+exec): the peak over the whole worker (loading included), the RSS once the model is loaded (freed
    heap returned to the OS with malloc_trim) and the peak during one forward."""
    import ctypes
    import gc
    import threading

    peak = [current_rss_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], current_rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size = CONTENDERS[name][2]
    x = samadapt_inputs(size)["retina"]  # same shape as every input of this size
    fn = build(name, ckpt, device)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    loaded = current_rss_mib()
    load_peak, peak[0] = peak[0], loaded
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn(x)
    done.set()
    sampler.join()
    forward_peak = max(peak[0], current_rss_mib())
    result = {
        "peak_rss_mib": max(load_peak, forward_peak),
        "rss_loaded_mib": loaded,
        "forward_peak_rss_mib": forward_peak,
        "forward_extra_mib": forward_peak - loaded,
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float] | None:
    common = [k for k in out if k in ref]
    if not common or out[common[0]].shape != ref[common[0]].shape:
        return None
    max_abs = max((out[k] - ref[k]).abs().max().item() for k in common)
    rel = max(((out[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in common)
    return {"max_abs": max_abs, "max_abs_over_ref_max": rel, "images": len(common)}


def cpu_description() -> str:
    """CPU model and the matrix extensions that decide bf16 speed (AMX tiles, AVX-512 BF16), from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    extensions = [name for name in ("amx_bf16", "avx512_bf16", "avx512f") if name in flags]
    if not extensions:
        extensions = ["no AVX-512"] + [name for name in ("avx2", "fma") if name in flags]
    return (
        f"{model} ({', '.join(extensions)}; torch CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (one image each, cycling)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="1 timed round, no memory subprocesses")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="a subset of contenders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embed_speed.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.ckpt, device)
        return
    rounds = 1 if args.quick else args.repeats
    names = args.only or list(CONTENDERS)
    if "official_fp32" not in names:
        names = ["official_fp32", *names]  # the reference for ratios and errors
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam_vit_b_random.pth"
        sam = make_checkpoint(ckpt, seed=args.seed)
        inputs_1024 = official_inputs(sam)
        del sam
        cpu_times: dict[str, list[float]] = {}
        times, outputs = time_all(
            names,
            ckpt,
            device,
            inputs_1024=inputs_1024,
            rounds=rounds,
            warmup=args.warmup,
            cpu_times=cpu_times,
        )
        memory = {}
        if not args.quick:
            for name in names:
                print(f"peak memory: {name}", flush=True)
                memory[name] = peak_memory(name, ckpt, device, args.threads)
    ref_time = statistics.median(times["official_fp32"])
    ref_cpu = statistics.median(cpu_times["official_fp32"])
    rows = []
    for name in names:
        impl, precision, size = CONTENDERS[name]
        med = statistics.median(times[name])
        rows.append(
            {
                "contender": name,
                "implementation": impl,
                "precision": precision,
                "image_size": size,
                "seconds_per_image_median": med,
                "seconds_all": times[name],
                "speedup_vs_official_fp32": ref_time / med,
                # process CPU seconds (all threads): a busy machine inflates them less than wall time
                "cpu_seconds_median": statistics.median(cpu_times[name]),
                "cpu_speedup_vs_official_fp32": ref_cpu / statistics.median(cpu_times[name]),
                "memory": memory.get(name),
                "error_vs_official_fp32": errors(outputs[name], outputs["official_fp32"]),
            }
        )
    header = (
        f"{'contender':34s} {'size':>5s} {'s/img':>7s} {'x off.':>7s} {'loaded MiB':>10s} {'fwd +MiB':>8s} "
        f"{'max|err|':>10s} {'err/max':>9s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        err = row["error_vs_official_fp32"]
        mem = row["memory"] or {}
        nan = float("nan")
        loaded = mem.get("rss_loaded_mib", nan)
        extra = mem.get("cuda_peak_mib", mem.get("forward_extra_mib", nan))
        print(
            f"{row['contender']:34s} {row['image_size']:5d} {row['seconds_per_image_median']:7.2f} "
            f"{row['speedup_vs_official_fp32']:7.2f} {loaded:10.0f} {extra:8.0f} "
            f"{err['max_abs'] if err else float('nan'):10.2e} {err['max_abs_over_ref_max'] if err else float('nan'):9.2e}"
        )
    result = {
        "what": "SAM vit_b image-encoder forward on one preprocessed image (batch 1), seconds per image",
        "timing": f"median of {rounds} round-robin rounds after {args.warmup} warm-up round(s), one process",
        "device": str(device),
        "cpu": cpu_description(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_before_after": [load_before, os.getloadavg()],
        "rows": rows,
    }
    from samadapt.utils.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
