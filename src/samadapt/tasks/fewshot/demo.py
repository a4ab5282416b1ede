"""Few-shot part of `make demo`: MedFocusCLIP and its baselines on a toy dataset with tiny random-weight models.

No CLIP or SAM 2 weights can be downloaded here, so the demo writes a tiny random-weight CLIP (open_clip format)
and a tiny random-weight SAM 2 (official format) and runs the real pipeline on them: it shows the commands and
outputs, not what real weights achieve.
"""

from __future__ import annotations

from pathlib import Path

from samadapt.encoders.clip import write_tiny_clip
from samadapt.encoders.masks import write_tiny_sam2
from samadapt.engine.sweep import run_sweep
from samadapt.tasks.fewshot.config import FewShotConfig
from samadapt.tasks.fewshot.synthetic import write_toy_npz
from samadapt.tasks.fewshot.task import FewShotTask


def run_demo(out_dir: Path, *, quick: bool = False) -> Path:
    """Sweep medfocus, medfocus-attn, zero-shot, linear-probe and tip-adapter over two data fractions."""
    out_dir = Path(out_dir)
    weights = out_dir / "weights"
    clip_config, clip_checkpoint = write_tiny_clip(weights)
    cfg = FewShotConfig(
        data=str(write_toy_npz(out_dir / "toy.npz", counts=(24, 12, 24))),
        clip=str(clip_config),
        clip_checkpoint=str(clip_checkpoint),
        masker="sam2_hiera_t",
        masker_checkpoint=str(write_tiny_sam2(weights / "tiny_sam2.pt")),
        masker_arch="tiny",
        masker_image_size=128,
        # Random SAM 2 weights score every mask low: keep them all so the overlays have something to show.
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        mask_cache=str(out_dir / "masks"),
        class_names=["band", "square"],
        # Fine-tuning real CLIP wants lr 1e-5; a tiny random CLIP learns from scratch and needs a from-scratch lr.
        epochs=3 if quick else 10, lr=1e-3, progress=False,
    )  # fmt: skip
    methods = ["medfocus", "medfocus-attn", "zero-shot", "linear-probe", "tip-adapter"]
    return run_sweep(
        FewShotTask(), cfg, {"method": methods, "data_fraction": [0.25, 1.0], "seed": [0]}, out=out_dir
    )
