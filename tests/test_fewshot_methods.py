"""Every few-shot method trains and evaluates end to end on tiny data (24 images of 64 px, 2 classes) with a
random-weight tiny CLIP and a random-weight tiny SAM 2, both saved in their official formats and loaded back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from samadapt.encoders.clip import write_tiny_clip
from samadapt.encoders.masks import write_tiny_sam2
from samadapt.engine.lifecycle import execute_run
from samadapt.tasks.fewshot.config import FewShotConfig
from samadapt.tasks.fewshot.heads import load_learned_state
from samadapt.tasks.fewshot.methods import METHODS, build_model, evaluate_probs
from samadapt.tasks.fewshot.synthetic import CLASS_NAMES, write_toy_npz
from samadapt.tasks.fewshot.task import FewShotTask
from samadapt.training.weights import load_weights


def _test_rows(out):
    with open(out / "predictions.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "test"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    clip_config, clip_ckpt = write_tiny_clip(root)
    cfg = FewShotConfig(
        data=str(write_toy_npz(root / "toy.npz")),
        clip=str(clip_config),
        clip_checkpoint=str(clip_ckpt),
        masker_checkpoint=str(write_tiny_sam2(root / "tiny_sam2.pt")),
        masker_arch="tiny",
        masker_image_size=128,
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        class_names=list(CLASS_NAMES),
        data_fraction=0.5,
        epochs=2,
        coop_epochs=2,
        coop_schedule="fixed",
        clip_adapter_epochs=2,
        tip_epochs=2,
        coop_n_ctx=4,
        lr=1e-4,
        aug_views=2,
        progress=False,
        out=str(root),
    )
    res = FewShotTask().prepare(cfg, progress=False)
    return cfg, res, root


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_evaluates(setup, method):
    cfg, res, root = setup
    out = root / method
    metrics = execute_run(FewShotTask(), cfg.replace(method=method, seed=1, out=str(out)), prepared=res)
    assert metrics["n_train"] == 6 and metrics["n_test"] == 6 and metrics["method"] == method
    with open(out / "predictions.csv", newline="") as fh:
        all_rows = list(csv.DictReader(fh))
    for split in ("val", "test"):  # the metrics are those of the run's own per-image predictions
        rows_of = [r for r in all_rows if r["split"] == split]
        accuracy = np.mean([r["true"] == r["predicted"] for r in rows_of])
        assert metrics[split]["accuracy"] == pytest.approx(accuracy) and np.isfinite(metrics[split]["loss"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    for name in ("predictions.csv", "report.html", "confusion_matrix.png", "roc.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "fewshot"
    weights = load_weights(out / "model.safetensors")
    spec = METHODS[method]
    trains_tower = spec.family == "finetune"
    assert any(k.startswith("visual.") for k in weights) == trains_tower
    if spec.family in ("finetune", "coop", "tip") and method != "tip-adapter":
        assert (out / "training_curves.png").is_file() and metrics["best_epoch"] is not None
    if spec.input != "plain":
        assert (out / "overlays.png").is_file()
        assert metrics["mean_masks_per_image"] is not None and metrics["images_without_masks"] is not None
    # the saved weights rebuild the same model (what `samadapt predict` does)
    rebuilt = build_model(method, res.clip, res.class_names, cfg.options, state=weights)
    load_learned_state(rebuilt, weights, source=str(out))
    test_inputs = res.inputs(spec.input, res.dataset.split_indices("test"), cfg.options)
    saved_probs = np.array([[float(r["prob_band"]), float(r["prob_square"])] for r in _test_rows(out)])
    np.testing.assert_allclose(evaluate_probs(rebuilt, test_inputs), saved_probs, atol=2e-6)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 + 6 and rows[0].startswith("id,split,true,predicted,prob_band,prob_square")


def test_same_splits_and_nested_fractions_across_methods(setup):
    cfg, res, _ = setup
    from samadapt.data.splits import label_fraction_indices

    train = res.dataset.split_indices("train")
    small = set(label_fraction_indices(train, res.dataset.labels, 0.25, 0))
    half = set(label_fraction_indices(train, res.dataset.labels, 0.5, 0))
    assert small <= half and len(res.dataset.split_indices("test")) == 6
