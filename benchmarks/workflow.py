"""Wall time of each task's real workflow on this machine, split into encoding, masks, training and evaluation,
beside the naive path that re-runs the official encoder (or mask generator) for every epoch of every run.

    python benchmarks/workflow.py --size medium        # ~25 min on 2 cores: benchmarks/results/workflow.json
    python benchmarks/workflow.py --size quick         # a few minutes: the script works
    python benchmarks/workflow.py --size full          # the issue's sizes: 500-image classify sweep, ... (hours)

The encoders are the real architectures at real input size with random weights (no checkpoint can be downloaded
here; speed does not depend on the weights). Measured: our path end to end through the engine's sweep (encoding
into the store, then every run), and the official encoder's / generator's time per image, side by side in this
process. The naive path is that time multiplied by the images each epoch of each run would encode (modelled from
the measured per-image time, not run: at real size it takes days on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def official_sam_seconds(image_size: int, images: list[np.ndarray], rounds: int = 1) -> float:
    """Median seconds per image of segment_anything's image encoder (fp32), as SamPredictor runs it."""
    from segment_anything import sam_model_registry
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = sam_model_registry["vit_b"](checkpoint=None).eval()
    if image_size != 1024:
        return float("nan")
    transform = ResizeLongestSide(1024)
    times = []
    with torch.inference_mode():
        for _ in range(rounds):
            for image in images:
                rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
                start = time.perf_counter()
                x = torch.as_tensor(transform.apply_image(rgb)).permute(2, 0, 1)[None].float()
                sam.image_encoder(sam.preprocess(x))
                times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_classify(root: Path, *, n: int, epochs: int, seeds: int, image_size: int) -> dict:
    from samadapt.engine.sweep import run_sweep
    from samadapt.store import embed_dataset
    from samadapt.tasks.classify.config import ClassifyConfig
    from samadapt.tasks.classify.prepare import read_classification_data
    from samadapt.tasks.classify.synthetic import make_lesion_dataset
    from samadapt.tasks.classify.task import ClassifyTask

    n_train, n_val, n_test = int(n * 0.7), int(n * 0.15), n - int(n * 0.7) - int(n * 0.15)
    data = make_lesion_dataset(root / "lesions.npz", n_train=n_train, n_val=n_val, n_test=n_test, size=128)
    cfg = ClassifyConfig(data=str(data), encoder_image_size=image_size, backbone_image_size=128, epochs=epochs,
                         patience=epochs, store=str(root / "store"), progress=False)  # fmt: skip
    dataset, _ = read_classification_data(cfg)
    start = time.perf_counter()
    embed_dataset(dataset, cfg.load_encoder("cpu"), cfg.store_dir(), progress=False)
    encoding = time.perf_counter() - start
    axes = {
        "method": ["slca", "baseline", "linear-probe"],
        "label_fraction": [0.1, 0.5, 1.0],
        "seed": list(range(seeds)),
    }
    start = time.perf_counter()
    run_sweep(ClassifyTask(), cfg, axes, out=root / "sweep")
    runs = time.perf_counter() - start
    stages = _stages(root / "sweep")
    images = [dataset.image(i) for i in range(2)]
    official = official_sam_seconds(image_size, images)
    # naive: slca re-encodes every image every epoch of each of its 3 x seeds runs, the probe once per run
    naive_encoding = official * n * (epochs + 1) * 3 * seeds
    return {"task": "classify", "images": n, "runs": 9 * seeds, "epochs": epochs, "encoding_s": encoding,
            "runs_s": runs, "total_s": encoding + runs, "stage_seconds": stages,
            "official_encoder_s_per_image": official,
            "naive_total_s_modelled": naive_encoding + runs}  # fmt: skip


def _stages(sweep: Path) -> dict:
    """Seconds per stage summed over a sweep's runs (metrics.json["stage_seconds"])."""
    total: dict[str, float] = {}
    for path in sorted((sweep / "runs").glob("*/metrics.json")):
        for stage, seconds in json.loads(path.read_text()).get("stage_seconds", {}).items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 2)
    return total


def run_segment(root: Path, *, patients: int, epochs: int, aug_views: int, image_size: int) -> dict:
    """A segmentation sweep through the CLI: 3 heads x 2 volume budgets, SAM ViT-B at real size."""
    from samadapt.cli.main import main
    from samadapt.tasks.segment.synthetic import write_acdc_like

    data = write_acdc_like(root / "acdc", patients=patients)
    start = time.perf_counter()
    code = main(["sweep", "--task", "segment", "--data", str(data), "--methods", "autosam,cnn,linear",
                 "--train-volumes", ",".join(map(str, sorted({1, max(1, patients // 3)}))), "--seeds", "0", "--epochs", str(epochs),
                 "--aug-views", str(aug_views), "--encoder-image-size", str(image_size), "--store",
                 str(root / "store"), "--out", str(root / "sweep"), "--no-progress"])  # fmt: skip
    total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the segmentation sweep failed with exit code {code}")
    stages = _stages(root / "sweep")
    runs = len(list((root / "sweep" / "runs").glob("*/metrics.json")))
    encoded = sum(1 for _ in (root / "store").rglob("*.npy"))
    images = [np.zeros((224, 224), np.uint8)] * 2
    official = official_sam_seconds(image_size, images)
    # naive: every training slice view re-encoded by the official encoder every epoch of every run
    train_slices = json.loads(next((root / "sweep" / "runs").glob("*/metrics.json")).read_text()).get(
        "train_slices", 0
    )
    naive = official * train_slices * (aug_views + 1) * epochs * runs
    return {"task": "segment", "patients": patients, "runs": runs, "epochs": epochs, "aug_views": aug_views,
            "total_s": round(total, 2), "stage_seconds": stages, "store_shards": encoded,
            "official_encoder_s_per_image": official, "naive_encoding_s_modelled": round(naive, 1)}  # fmt: skip


def mask_seconds(
    image: np.ndarray,
    *,
    checkpoint: Path,
    points: int,
    image_size: int,
    pred_iou_thresh: float,
    implementation: str,
) -> float:
    """Seconds of one image's automatic masks: our generator ("fast") or sam2's SAM2AutomaticMaskGenerator
    ("official"), the same weights and settings as the sweep's."""
    from samadapt.encoders.masks import MaskerSettings, load_masker

    settings = MaskerSettings(points_per_side=points, pred_iou_thresh=pred_iou_thresh)
    masker = load_masker(
        "sam2_hiera_t", checkpoint, settings=settings, image_size=image_size, implementation=implementation
    )
    start = time.perf_counter()
    masker.generate(image)
    return time.perf_counter() - start


def run_fewshot(root: Path, *, n: int, points: int, epochs: int, image_size: int) -> dict:
    """A few-shot sweep through the CLI: MedFocusCLIP (SAM 2 masks as overlays, CLIP ViT-B/16 fine-tuned) beside
    linear-probe and Tip-Adapter, SAM 2.1 hiera-t masks at 1024. pred_iou_thresh 0: random weights pass no
    0.8 IoU bar, trained ones pass most, so every point's masks are computed (the realistic cost, not the empty one).
    """
    from samadapt.cli.main import main
    from samadapt.data import read_dataset
    from samadapt.encoders.masks import build_sam2_model
    from samadapt.tasks.fewshot.synthetic import write_toy_npz

    counts = (int(n * 0.6), int(n * 0.2), n - int(n * 0.6) - int(n * 0.2))
    data = write_toy_npz(root / "toy.npz", counts=counts, size=256)
    torch.manual_seed(0)  # random weights of the real architecture, in the official file format
    model, _, _ = build_sam2_model("sam2_hiera_t", version="2.1")
    masker_checkpoint = root / "sam2.1_hiera_t_random.pt"
    torch.save({"model": model.state_dict()}, masker_checkpoint)
    del model
    start = time.perf_counter()
    code = main(["sweep", "--task", "fewshot", "--data", str(data), "--methods", "medfocus,linear-probe,tip-adapter", "--budgets", "0.5,1.0",
                 "--seeds", "0", "--epochs", str(epochs), "--points-per-side", str(points), "--pred-iou-thresh", "0",
                 "--masker-image-size", str(image_size), "--masker-checkpoint", str(masker_checkpoint), "--out", str(root / "sweep"), "--no-progress"])  # fmt: skip
    total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the few-shot sweep failed with exit code {code}")
    stages = _stages(root / "sweep")
    runs = len(list((root / "sweep" / "runs").glob("*/metrics.json")))
    masked = sum(counts)  # medfocus's overlays: every image of every split, once (the mask cache)
    image = read_dataset(str(data)).image(0)
    per_image = {impl: mask_seconds(image, checkpoint=masker_checkpoint, points=points, image_size=image_size,
                                    pred_iou_thresh=0.0, implementation=impl) for impl in ("fast", "official")}  # fmt: skip
    return {"task": "fewshot", "images": n, "runs": runs, "epochs": epochs, "points_per_side": points,
            "total_s": round(total, 2), "stage_seconds": stages, "masked_images": masked,
            "fast_masks_s_per_image": round(per_image["fast"], 2),
            "official_masks_s_per_image": round(per_image["official"], 2),
            "masks_s_estimated": round(per_image["fast"] * masked, 1),
            "official_masks_s_modelled": round(per_image["official"] * masked, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes, not hours)")
    parser.add_argument("--tasks", default="classify,segment,fewshot")
    parser.add_argument(
        "--size",
        choices=("quick", "medium", "full"),
        default=None,
        help="quick: minutes; medium: ~15 min on 2 cores; full: the issue's sizes (hours)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "workflow.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    size = args.size or ("quick" if args.quick else "full")
    sizes = {
        "quick": {"classify": (24, 2, 1), "segment": (3, 2, 0), "fewshot": (5, 8, 1)},
        "medium": {"classify": (60, 10, 1), "segment": (4, 5, 1), "fewshot": (10, 32, 1)},
        "full": {"classify": (500, 30, 2), "segment": (10, 120, 2), "fewshot": (200, 32, 5)},
    }[size]
    from samadapt.encoders.precision import cpu_model

    load = os.getloadavg()[0]
    results = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "load_start": load,
               "size": size, "tasks": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "classify" in args.tasks:
            n, epochs, seeds = sizes["classify"]
            results["tasks"].append(
                run_classify(root / "c", n=n, epochs=epochs, seeds=seeds, image_size=1024)
            )
            print(json.dumps(results["tasks"][-1], indent=1), flush=True)
        if "segment" in args.tasks:
            patients, epochs, views = sizes["segment"]
            results["tasks"].append(
                run_segment(root / "s", patients=patients, epochs=epochs, aug_views=views, image_size=1024)
            )
            print(json.dumps(results["tasks"][-1], indent=1), flush=True)
        if "fewshot" in args.tasks:
            n, points, epochs = sizes["fewshot"]
            results["tasks"].append(
                run_fewshot(root / "f", n=n, points=points, epochs=epochs, image_size=1024)
            )
            print(json.dumps(results["tasks"][-1], indent=1), flush=True)
    results["load_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
