"""Issue 12's acceptance through the real CLI: segmentation sweeps test every seed on the same patients, heads
encode at 1024 unless asked otherwise, the U-Net trains at its own size, presets and protocol cards, and the
CLIP-Adapter baseline trains and predicts."""

from __future__ import annotations

import json

import pytest
import yaml

from samadapt.cli.main import main
from samadapt.tasks.segment.config import SegmentConfig
from samadapt.tasks.segment.synthetic import write_acdc_like


def test_segment_defaults_are_the_reference_sizes() -> None:
    cfg = SegmentConfig(method="autosam")
    assert cfg.encoder_size == 1024 and cfg.input_size == 1024
    assert SegmentConfig(method="unet").input_size == 224
    assert cfg.mask_tokens_per_class == 2 and cfg.augment == "reference"


@pytest.fixture(scope="module")
def unet_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_protocol")
    data = write_acdc_like(root / "acdc", patients=6, shape=(32, 28, 3))
    out = root / "sweep"
    argv = ["sweep", "--task", "segment", "--data", str(data), "--methods", "unet", "--train-volumes", "2",
            "--seeds", "0,1", "--unet-image-size", "48", "--unet-channels", "8,16", "--epochs", "1",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_two_seeds_of_a_segmentation_sweep_share_their_test_patients(unet_sweep) -> None:
    s0 = json.loads((unet_sweep / "runs" / "unet_b2_s0" / "splits.json").read_text())
    s1 = json.loads((unet_sweep / "runs" / "unet_b2_s1" / "splits.json").read_text())
    assert s0["test"] == s1["test"] and s0["val"] == s1["val"]
    assert set(s0["train_used"]) <= set(s0["train"]) and len(s0["train_used"]) == 2


def test_the_unet_trains_at_its_own_size(unet_sweep) -> None:
    run = unet_sweep / "runs" / "unet_b2_s0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["unet_image_size"] == 48 and metrics["unet_image_size"] == 48
    assert metrics["encoder_image_size"] is None  # the U-Net sees pixels, no encoder


def test_a_smaller_encoder_size_is_on_the_protocol_card() -> None:
    from samadapt.tasks.segment.task import SegmentTask

    card = SegmentTask().protocol(SegmentConfig(method="autosam", encoder_image_size=256))
    assert any(row["setting"] == "encoder_image_size" and row["this run"] == "256" for row in card)
    assert not any(r["setting"] == "encoder_image_size" for r in SegmentTask().protocol(SegmentConfig()))


def test_presets_set_the_reference_protocol_and_flags_beat_them(tmp_path) -> None:
    import argparse

    from samadapt.engine.cli import config_layers
    from samadapt.engine.config import build_config
    from samadapt.tasks.segment.task import SegmentTask

    task = SegmentTask()
    args = argparse.Namespace(preset="fast", epochs="7")
    cfg = build_config(SegmentConfig, config_layers(task, args))
    assert cfg.encoder_image_size == 256 and cfg.epochs == 7  # preset value, then the flag over the preset
    with pytest.raises(Exception, match="unknown segment preset 'paper'"):
        build_config(SegmentConfig, config_layers(task, argparse.Namespace(preset="paper")))


def test_clip_adapter_trains_and_predicts(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from samadapt.encoders.clip import write_tiny_clip
    from samadapt.tasks.fewshot.synthetic import write_toy_npz

    clip_config, clip_ckpt = write_tiny_clip(tmp_path / "clip")
    data = write_toy_npz(tmp_path / "toy.npz")
    run = tmp_path / "run"
    argv = ["train", "--task", "fewshot", "--data", str(data), "--method", "clip-adapter", "--clip", str(clip_config),
            "--clip-checkpoint", str(clip_ckpt), "--clip-adapter-epochs", "2", "--aug-views", "2",
            "--data-fraction", "0.5", "--class-names", "band,square", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "clip-adapter" and metrics["n_val"] <= 2 * 3  # few-shot validation budget
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(images / "a.png")
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "pred"),
                 "--no-progress"]) == 0  # fmt: skip
    rows = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("id,predicted,prob_band,prob_square") and len(rows) == 2
