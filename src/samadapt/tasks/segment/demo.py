"""Segmentation part of `make demo`: AutoSAM and linear heads vs. a U-Net on generated ACDC-like volumes."""

from __future__ import annotations

from pathlib import Path

from samadapt.tasks.segment.sweep import run_sweep
from samadapt.tasks.segment.synthetic import write_acdc_like


def run_demo(
    out_dir: Path, *, quick: bool = False, encoder: str = "sam_vit_b", checkpoint: Path | None = None
) -> Path:
    """Sweep heads x training patients on synthetic cardiac-like volumes; returns the results table path."""
    out_dir = Path(out_dir)
    data = write_acdc_like(out_dir / "acdc_like", patients=6 if quick else 10, seed=0)
    run_sweep(
        out=out_dir,
        heads=["autosam", "linear", "unet"],
        train_volumes=["all"] if quick else ["1", "all"],
        seeds=[0],
        data=data,
        encoder=encoder,
        checkpoint=checkpoint,
        encoder_arch=None if checkpoint else "tiny",
        image_size=128 if checkpoint is None else 256,
        epochs=3 if quick else 10,
        unet_channels=(16, 32, 64, 128),
        progress=False,
    )
    return out_dir / "results.md"
