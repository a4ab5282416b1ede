"""`make demo` for classification: generated lesion data, slca vs baseline vs linear-probe at two label fractions.

Without a checkpoint the SAM encoder is the registry's tiny configuration with random weights (fixed seed):
the numbers show the pipeline end to end and how SLCA uses spatial attention, not what real SAM features give.
"""

from __future__ import annotations

import logging
from pathlib import Path

from samadapt.engine.sweep import run_sweep
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.synthetic import make_lesion_dataset
from samadapt.tasks.classify.task import ClassifyTask

log = logging.getLogger(__name__)

DEMO_SIZES = {  # (n_train, n_val, n_test, epochs, seeds)
    "quick": (120, 40, 60, 6, 1),
    "full": (240, 60, 120, 12, 2),
}


def demo_config(
    data: Path, out: Path, *, quick: bool, encoder: str, checkpoint: str | Path | None
) -> ClassifyConfig:
    _, _, _, epochs, _ = DEMO_SIZES["quick" if quick else "full"]
    return ClassifyConfig(
        data=str(data),
        backbone="resnet18",
        encoder=encoder,
        checkpoint=str(checkpoint) if checkpoint else None,
        encoder_arch=None if checkpoint else "tiny",
        encoder_image_size=128 if not checkpoint else 256,
        backbone_image_size=64,
        epochs=epochs,
        batch_size=16,
        lr=1e-3,
        patience=5,
        slca_window=2,
        store=str(out / "embeddings"),
        out=str(out),
        progress=False,
    )


def run_demo(
    out_dir: Path, *, quick: bool = False, encoder: str = "sam_vit_b", checkpoint: str | Path | None = None
) -> Path:
    """Generate the data, run the sweep (resumable) and return the path of its report.html."""
    out_dir = Path(out_dir)
    n_train, n_val, n_test, _, seeds = DEMO_SIZES["quick" if quick else "full"]
    data = out_dir / "lesions.npz"
    if not data.is_file():
        make_lesion_dataset(
            data, n_train=n_train, n_val=n_val, n_test=n_test, size=64, lesion_contrast=0.25, seed=0
        )
    cfg = demo_config(data, out_dir, quick=quick, encoder=encoder, checkpoint=checkpoint)
    weights = str(checkpoint) if checkpoint else f"tiny random-weight {encoder} (seed 0; no checkpoint given)"
    axes = {
        "method": ["slca", "baseline", "linear-probe"],
        "label_fraction": [0.2, 1.0],
        "seed": list(range(seeds)),
    }
    return run_sweep(
        ClassifyTask(), cfg, axes, out=out_dir,
        notes=[f"Generated lesion dataset ({n_train}/{n_val}/{n_test} images, 64 px). Encoder weights: {weights}."],
    )  # fmt: skip
