"""The encoders users bring next work wherever an encoder is used: SAM 3 (72 x 72-style S/14 grid) under the
segmentation heads, LiteMedSAM (S/4 grid) and MedSAM2 under SLCA classification, all through the embedding store."""

from __future__ import annotations

import json

import pytest

from samadapt.cli.main import main


@pytest.mark.parametrize(
    ("encoder", "size", "head"), [("sam3", 112, "autosam"), ("litemedsam_vit_t", 64, "linear")]
)
def test_segmentation_heads_take_the_new_encoders(tmp_path, encoder, size, head) -> None:
    from samadapt.tasks.segment.synthetic import write_acdc_like

    data = write_acdc_like(tmp_path / "acdc", patients=4, shape=(32, 28, 3))
    run = tmp_path / "run"
    assert main(["train", "--task", "segment", "--data", str(data), "--method", head, "--encoder", encoder,
                 "--encoder-arch", "tiny", "--encoder-image-size", str(size), "--epochs", "1", "--aug-views", "0",
                 "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == encoder and metrics["encoder_image_size"] == size
    assert metrics["test"]["num_volumes"] >= 1


@pytest.mark.parametrize(("encoder", "size"), [("litemedsam_vit_t", 64), ("medsam2", 128)])
def test_slca_takes_the_new_encoders(tmp_path, encoder, size) -> None:
    from samadapt.tasks.classify.synthetic import make_lesion_dataset

    data = make_lesion_dataset(tmp_path / "d.npz", n_train=12, n_val=6, n_test=6, size=32)
    run = tmp_path / "run"
    assert main(["train", "--task", "classify", "--data", str(data), "--method", "slca", "--encoder", encoder,
                 "--encoder-arch", "tiny", "--encoder-image-size", str(size), "--backbone-image-size", "32",
                 "--slca-window", "2", "--epochs", "1", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    import yaml

    recorded = yaml.safe_load((run / "config.yaml").read_text())["recorded"]
    assert recorded["encoder_fields"]["encoder"] == encoder and recorded["embedding_shape"][0] == 256
