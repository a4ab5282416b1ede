"""SAM 2 encoders feed the same prompt-free heads (their image_embed is 256 channels at S/16 too)."""

from __future__ import annotations

import math

from samadapt.engine.lifecycle import execute_run
from samadapt.tasks.segment.config import SegmentConfig
from samadapt.tasks.segment.synthetic import write_acdc_like
from samadapt.tasks.segment.task import SegmentTask


def test_autosam_head_trains_on_a_sam2_encoder(tmp_path):
    data = write_acdc_like(tmp_path / "data", patients=6, seed=0)
    cfg = SegmentConfig(
        data=str(data), method="autosam", out=str(tmp_path / "run"), encoder="sam2_hiera_t", encoder_arch="tiny",
        encoder_image_size=128, epochs=3, store=str(tmp_path / "store"), progress=False,
    )  # fmt: skip
    metrics = execute_run(SegmentTask(), cfg)
    test = metrics["test"]
    # An empty or all-background prediction scores 0 on every structure.
    assert test["dice_mean"] > 0.1
    assert math.isfinite(test["hd95_mean"])
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()
