"""Segmentation part of `make demo`: AutoSAM and linear heads vs. a U-Net on generated ACDC-like volumes."""

from __future__ import annotations

from pathlib import Path

from samadapt.engine.sweep import run_sweep
from samadapt.tasks.segment.config import SegmentConfig
from samadapt.tasks.segment.synthetic import write_acdc_like
from samadapt.tasks.segment.task import SegmentTask


def run_demo(
    out_dir: Path, *, quick: bool = False, encoder: str = "sam_vit_b", checkpoint: Path | None = None
) -> Path:
    """Sweep heads x training patients on synthetic cardiac-like volumes; returns the sweep's summary.md."""
    out_dir = Path(out_dir)
    data = write_acdc_like(out_dir / "acdc_like", patients=6 if quick else 10, seed=0)
    cfg = SegmentConfig(
        data=str(data), encoder=encoder, checkpoint=str(checkpoint) if checkpoint else None,
        encoder_arch=None if checkpoint else "tiny", encoder_image_size=128 if checkpoint is None else 256,
        unet_image_size=64, epochs=3 if quick else 10, unet_channels=[16, 32, 64, 128], progress=False,
    )  # fmt: skip
    axes = {
        "method": ["autosam", "linear", "unet"],
        "train_volumes": [None] if quick else [1, None],
        "seed": [0],
    }
    run_sweep(SegmentTask(), cfg, axes, out=out_dir)
    return out_dir / "summary.md"
