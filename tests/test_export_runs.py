"""`samadapt export --run RUN --format onnx`, then onnxruntime on new images, equals `samadapt predict`, per task."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from samadapt.cli.main import main

ATOL = 1e-4  # probabilities written with 6 digits; fp32 ONNX vs torch differ by ~1e-6 of the output max


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _probs(csv_path, class_names):
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new_images")
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_classify_slca_export_equals_predict(tmp_path, images) -> None:
    from samadapt.data import read_image
    from samadapt.encoders.preprocessing import PREPROCESSORS
    from samadapt.tasks.classify.features import normalise, pooled_sam_features, resize_for_backbone
    from samadapt.tasks.classify.synthetic import make_lesion_dataset

    data = make_lesion_dataset(tmp_path / "d.npz", n_train=16, n_val=6, n_test=6, size=32)
    run = tmp_path / "run"
    assert main(["train", "--task", "classify", "--data", str(data), "--method", "slca", "--encoder-arch", "tiny",
                 "--encoder-image-size", "64", "--backbone-image-size", "32", "--slca-window", "2", "--epochs", "1",
                 "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "pred"),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (
        manifest["files"]["model.onnx"]["check"]["passed"]
        and manifest["files"]["encoder.onnx"]["check"]["passed"]
    )
    glue = manifest["glue"]
    arrays = [read_image(p) for p in sorted(images.glob("*.png"))]
    pixels = torch.stack([PREPROCESSORS["sam"](a, 64)[0] for a in arrays]).numpy()
    embedding = _session(tmp_path / "export" / "encoder.onnx").run(None, {"image": pixels})[0]
    windows = pooled_sam_features(embedding, window=2, pooling="avg", image_shapes=[a.shape[:2] for a in arrays],
                                  preprocessing="sam", input_size=64)  # fmt: skip
    backbone = normalise(
        resize_for_backbone(arrays, 32), mean=glue["images"]["mean"], std=glue["images"]["std"]
    )
    probs = _session(tmp_path / "export" / "model.onnx").run(
        None, {"images": backbone.numpy(), "sam_windows": windows.numpy()}
    )[0]
    np.testing.assert_allclose(
        probs, _probs(tmp_path / "pred" / "predictions.csv", glue["class_names"]), atol=ATOL
    )


def test_fewshot_export_equals_predict(tmp_path, images) -> None:
    from samadapt.data import read_image
    from samadapt.encoders.clip import load_clip, to_pil_rgb, write_tiny_clip
    from samadapt.tasks.fewshot.synthetic import write_toy_npz

    clip_config, clip_ckpt = write_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    assert main(["train", "--task", "fewshot", "--data", str(write_toy_npz(tmp_path / "toy.npz")), "--method",
                 "clip-finetune", "--clip", str(clip_config), "--clip-checkpoint", str(clip_ckpt), "--epochs", "1",
                 "--class-names", "band,square", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "pred"),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    transform = load_clip(str(clip_config), clip_ckpt).transform()
    batch = torch.stack([transform(to_pil_rgb(read_image(p))) for p in sorted(images.glob("*.png"))]).numpy()
    probs = _session(tmp_path / "export" / "model.onnx").run(None, {"images": batch})[0]
    np.testing.assert_allclose(
        probs, _probs(tmp_path / "pred" / "predictions.csv", ["band", "square"]), atol=ATOL
    )


def test_segment_export_equals_predict(tmp_path) -> None:
    import nibabel as nib
    from torch.nn import functional as F

    from samadapt.data.volumes import Volume, read_volume_file
    from samadapt.encoders.preprocessing import PREPROCESSORS
    from samadapt.tasks.segment.slices import volume_slices
    from samadapt.tasks.segment.synthetic import write_acdc_like

    data = write_acdc_like(tmp_path / "acdc", patients=4, shape=(32, 28, 3))
    run = tmp_path / "run"
    assert main(["train", "--task", "segment", "--data", str(data), "--method", "linear", "--encoder-arch", "tiny",
                 "--encoder-image-size", "64", "--epochs", "1", "--aug-views", "0", "--no-progress",
                 "--out", str(run)]) == 0  # fmt: skip
    volume_path = next((data / "patient004").glob("*_frame01.nii.gz"))
    out = tmp_path / "pred.nii.gz"
    assert (
        main(["predict", "--run", str(run), "--input", str(volume_path), "--out", str(out), "--no-progress"])
        == 0
    )
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    image, affine, spacing = read_volume_file(volume_path)
    slices, _ = volume_slices(Volume(image=image, label=None, affine=affine, spacing=spacing))
    pixels = torch.stack([PREPROCESSORS["sam"](s, 64)[0] for s in slices]).numpy()
    embedding = _session(tmp_path / "export" / "encoder.onnx").run(None, {"image": pixels})[0]
    logits = torch.from_numpy(
        _session(tmp_path / "export" / "model.onnx").run(None, {"embedding": embedding})[0]
    )
    h, w, _ = image.shape
    side = max(h, w)
    labels = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False).argmax(1)[
        :, :h, :w
    ]
    expected = np.asarray(nib.load(str(out)).dataobj)
    agree = float((np.moveaxis(labels.numpy(), 0, -1) == expected).mean())
    assert agree > 0.999, agree
