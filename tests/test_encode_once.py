"""The frozen encoder runs once per image: sweeps over methods, fractions and seeds, and every training epoch,
read the embedding store; a second sweep over the same store runs the encoder on nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corpus import write_volume_dataset
from samadapt.cli.main import main
from samadapt.encoders.encoder import Encoder
from samadapt.tasks.classify.synthetic import make_lesion_dataset

TINY = ["--encoder", "sam_vit_b", "--encoder-arch", "tiny", "--no-progress"]


@pytest.fixture
def encoded_images(monkeypatch) -> list[int]:
    """Counts the images every encoder forward of this process sees, whatever calls it."""
    seen: list[int] = []
    original = Encoder.embed_tensor

    def counting(self, batch, **kwargs):
        seen.append(int(batch.shape[0]))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(Encoder, "embed_tensor", counting)
    return seen


def test_classify_sweep_encodes_each_image_once(tmp_path: Path, encoded_images: list[int]) -> None:
    data = make_lesion_dataset(
        tmp_path / "lesions.npz", n_train=40, n_val=12, n_test=16, size=32, lesion_contrast=0.6
    )
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"task: classify\ndata: {data}\nmethods: [slca, linear-probe]\nlabel-fractions: [0.5, 1.0]\n"
    )
    argv = ["sweep", "--config", str(config), "--seeds", "2", "--backbone", "resnet18", *TINY,
            "--encoder-image-size", "64", "--backbone-image-size", "32", "--epochs", "2", "--slca-window", "2",
            "--store", str(tmp_path / "store"), "--out", str(tmp_path / "sweep")]  # fmt: skip
    assert main(argv) == 0
    images = np.load(data)
    n_images = sum(len(images[f"{split}_images"]) for split in ("train", "val", "test"))
    assert sum(encoded_images) == n_images, "2 methods x 2 fractions x 2 seeds x 2 epochs, one encoder pass"
    encoded_images.clear()
    argv[argv.index("--out") + 1] = str(tmp_path / "sweep2")
    assert main(argv) == 0
    assert sum(encoded_images) == 0, "a second sweep reuses the store"


def test_segmentation_epochs_never_run_the_encoder(tmp_path: Path, encoded_images: list[int]) -> None:
    volumes = write_volume_dataset(tmp_path / "volumes", cases=4, shape=(24, 24, 2))
    argv = ["train", "--task", "segment", "--data", str(volumes), "--method", "linear", *TINY, "--encoder-image-size", "64",
            "--batch-size", "4", "--aug-views", "1", "--store", str(tmp_path / "store")]  # fmt: skip
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "one")]) == 0
    once = sum(encoded_images)
    assert once > 0
    encoded_images.clear()
    assert main([*argv, "--epochs", "4", "--seed", "0", "--out", str(tmp_path / "four")]) == 0
    assert sum(encoded_images) == 0, "more epochs of the same slices and views: nothing new to encode"
