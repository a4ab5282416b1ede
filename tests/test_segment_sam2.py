"""SAM 2 encoders feed the same prompt-free heads (their image_embed is 256 channels at S/16 too)."""

from __future__ import annotations

import math

from samadapt.tasks.segment.synthetic import write_acdc_like
from samadapt.tasks.segment.train import run_segmentation


def test_autosam_head_trains_on_a_sam2_encoder(tmp_path):
    data = write_acdc_like(tmp_path / "data", patients=6, seed=0)
    metrics = run_segmentation(
        data=data, head="autosam", out=tmp_path / "run", encoder="sam2_hiera_t", encoder_arch="tiny",
        image_size=128, epochs=3, store=tmp_path / "store", progress=False,
    )  # fmt: skip
    test = metrics["test"]
    # An empty or all-background prediction scores 0 on every structure.
    assert test["dice_mean"] > 0.1
    assert math.isfinite(test["hd95_mean"])
    assert (tmp_path / "run" / "metrics.json").is_file()
