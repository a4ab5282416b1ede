"""SAM 2 automatic mask speed: the official `SAM2AutomaticMaskGenerator` against samadapt's fast generator.

Both get the same weights (seeded random weights of the real sam2.1 hiera-t architecture, saved in the official
``{"model": ...}`` format and loaded back through `load_masker`) and the same real image (scikit-image's
astronaut, resized to 1024 on its longest side). Both run in this one process, their rounds interleaved (fast,
official, fast, ...), so a busy machine slows them alike; times are medians over rounds, and each official round
is also paired with the fast rounds on either side of it (`paired_ratios`): the official generator's time moves by
tens of percent between runs on one machine (it streams ~13 GB of upsampled masks per image).

Settings:
- "official": the official defaults (32 x 32 points, pred_iou_thresh 0.8, stability_score_thresh 0.95). With
  random weights nearly nothing survives them; this is the speed bar.
- "every_point_masked": the official settings but pred_iou_thresh 0, so that every point's masks go through the
  fast path's mask stage (with trained weights most points pass the 0.8 IoU bar; random weights pass none):
  the bound on the fast path's cost when nearly everything survives the IoU filter.
- "permissive": thresholds 0 (16 x 16 points by default, to bound the official run's time), so that the
  agreement check has masks to compare.
- "permissive_no_nms": as "permissive" with box NMS off (box_nms_thresh 1.0), so that every decoded mask is
  kept and compared: random weights leave few masks after NMS, this leaves all of them.
- "official_calibrated": the official settings on calibrated weights (`confident_decoder`): the same random
  weights with the IoU head and the hypernetworks' last layers rescaled and the upscaling taps averaged, so that
  masks pass the official thresholds as a trained checkpoint's do (two thirds of the candidates above IoU 0.8,
  stability scores around the 0.95 bar, smooth masks): the speed and the agreement at the official settings with
  masks to compare, and the operating point a trained checkpoint runs at (nearly every point gets masks).

Agreement (fp32): every official mask matched by one of ours at IoU >= 0.9, and the counts within 5 %.

    python benchmarks/mask_speed.py                      # writes benchmarks/results/mask_speed.json
    python benchmarks/mask_speed.py --points 8 --permissive-points 8 --out /tmp/m.json    # a quick check
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from samadapt.encoders.mask_agreement import agreement, agrees  # noqa: E402
from samadapt.encoders.masks import MaskerSettings, build_sam2_model, confident_decoder, load_masker  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _image(side: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut())
    scale = side / max(image.size)
    return np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR))


def _interleaved(fast: Any, official: Any, *, fast_rounds: int, official_rounds: int) -> dict[str, Any]:
    """Fast and official rounds alternating (fast, official, fast, ...), so both see the same state of the
    machine; the official generator's time moves by tens of percent between runs. Each official round is paired
    with the fast rounds on either side of it."""
    times: dict[str, list[float]] = {"fast": [], "official": []}
    outputs: dict[str, Any] = {}
    order = []
    for i in range(max(fast_rounds, official_rounds + 1)):
        if i < fast_rounds:
            order.append("fast")
        if i < official_rounds:
            order.append("official")
    for name in order:
        start = time.perf_counter()
        outputs[name] = (fast if name == "fast" else official)()
        times[name].append(time.perf_counter() - start)
    pairs = []
    for i, t in enumerate(times["official"]):
        around = times["fast"][i : i + 2]
        if around:
            pairs.append(t / statistics.mean(around))
    return {
        "fast_s": statistics.median(times["fast"]),
        "official_s": statistics.median(times["official"]),
        "fast_round_s": times["fast"],
        "official_round_s": times["official"],
        "paired_ratios": pairs,
        "fast_output": outputs["fast"],
        "official_output": outputs["official"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=32, help="points per side at the official thresholds")
    parser.add_argument("--permissive-points", type=int, default=16, help="points per side, thresholds 0")
    parser.add_argument("--side", type=int, default=1024, help="longest image side")
    parser.add_argument("--official-rounds", type=int, default=1)
    parser.add_argument("--fast-rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/mask_speed.json")
    parser.add_argument("--only", nargs="*", default=None, help="settings to run (default: all)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _, _ = build_sam2_model("sam2_hiera_t", version="2.1")
    tmp = Path(tempfile.mkdtemp()) / "sam2.1_hiera_t_random.pt"
    torch.save({"model": model.state_dict()}, tmp)
    calibrated = tmp.with_name("sam2.1_hiera_t_calibrated.pt")
    torch.save({"model": confident_decoder(model.state_dict())}, calibrated)
    del model
    image = _image(args.side)
    result: dict[str, Any] = {
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "model": "sam2.1 hiera-t (official architecture, seeded random weights, official file format)",
        "image": f"skimage astronaut resized to {image.shape[1]}x{image.shape[0]}",
        "precision": args.precision,
        "settings": {},
    }
    runs = {
        "official": MaskerSettings(points_per_side=args.points),
        "every_point_masked": MaskerSettings(points_per_side=args.points, pred_iou_thresh=0.0),
        "permissive": MaskerSettings(
            points_per_side=args.permissive_points, pred_iou_thresh=0.0, stability_score_thresh=0.0
        ),
        "permissive_no_nms": MaskerSettings(
            points_per_side=args.permissive_points,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
        ),
        "official_calibrated": MaskerSettings(points_per_side=args.points),
    }
    for name, settings in runs.items():
        if args.only and name not in args.only:
            continue
        common = dict(settings=settings)
        weights = calibrated if name.endswith("_calibrated") else tmp
        ours = load_masker("sam2_hiera_t", weights, **common, precision=args.precision)
        reference = load_masker("sam2_hiera_t", weights, **common, implementation="official")
        timed = _interleaved(
            lambda m=ours: m.generate(image),
            lambda m=reference: m.generate(image),
            fast_rounds=args.fast_rounds,
            official_rounds=args.official_rounds,
        )
        t_fast, t_official = timed["fast_s"], timed["official_s"]
        stats = agreement(timed["official_output"].masks, timed["fast_output"].masks)
        result["settings"][name] = {
            "masker_settings": settings.__dict__,
            "weights": "calibrated (samadapt.encoders.masks.confident_decoder)"
            if weights == calibrated
            else "random",
            "official_s": round(t_official, 2),
            "fast_s": round(t_fast, 2),
            "ratio_official_over_fast": round(t_official / t_fast, 2),
            "official_rounds": args.official_rounds,
            "fast_rounds": args.fast_rounds,
            # the official generator's time moves by tens of percent between runs on one machine
            "official_round_s": [round(t, 2) for t in timed["official_round_s"]],
            "fast_round_s": [round(t, 2) for t in timed["fast_round_s"]],
            "round_order": "fast, official, fast, ... (interleaved)",
            "paired_ratios": [round(r, 2) for r in timed["paired_ratios"]],
            "median_paired_ratio": round(statistics.median(timed["paired_ratios"]), 2),
            "fast_stage_counts": ours.fast.last_counts,
            "agreement": stats,
            "agrees": agrees(stats),
            "load_average_after": list(os.getloadavg()),
        }
        print(name, json.dumps(result["settings"][name]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
