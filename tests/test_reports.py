"""Task-neutral reports and training parts: plots are real PNGs, the HTML is self-contained, tables aggregate
correctly, and the loop stops early and restores the best weights."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
from PIL import Image

from samadapt.engine.cli import _parser, config_layers
from samadapt.engine.config import build_config, read_yaml_mapping
from samadapt.errors import ConfigError
from samadapt.reports import (
    mean_std_markdown,
    mean_std_rows,
    overlay_heatmap,
    plot_confusion_matrix,
    plot_label_efficiency,
    plot_roc,
    plot_training_curves,
    read_csv_rows,
    save_overlay,
    write_csv_rows,
    write_html_report,
    write_predictions_csv,
)
from samadapt.tasks.classify.config import ClassifyConfig
from samadapt.tasks.classify.task import ClassifyTask
from samadapt.training import EarlyStopping, fit, load_weights, save_weights


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plots_write_pngs_and_html_embeds_them(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    logits = rng.normal(size=(9, 3)) + 3 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["normal", "benign", "malignant"]
    history = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_auc": 0.5 + e / 20}
        for e in range(5)
    ]
    rows = [
        {"method": m, "fraction": f, "seed": s, "auc": 0.6 + f / 3 + s / 100}
        for m in ("a", "b")
        for f in (0.1, 1.0)
        for s in (0, 1)
    ]
    figs = [
        plot_confusion_matrix(tmp_path / "cm.png", y_true=y, y_pred=probs.argmax(1), class_names=names),
        plot_roc(tmp_path / "roc.png", y_true=y, probs=probs, class_names=names),
        plot_roc(tmp_path / "roc2.png", y_true=np.array([0, 1, 1, 0]), probs=np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]]), class_names=["neg", "pos"]),
        plot_training_curves(tmp_path / "curves.png", history=history, best_epoch=4),
        plot_label_efficiency(tmp_path / "eff.png", rows=rows, metric="auc"),
        save_overlay(tmp_path / "ov.png", image=rng.integers(0, 255, (40, 30), dtype=np.uint8), heatmap=rng.random((4, 4))),
    ]  # fmt: skip
    for fig in figs:
        assert _png_size(fig)[0] > 20
    assert _png_size(tmp_path / "ov.png") == (30, 40)
    report = write_html_report(
        tmp_path / "report.html", title="t <x>", summary={"test": {"auc": 0.9, "loss": float("nan")}, "n_train": 5},
        tables=[("rows", rows)], figures=[(f.stem, f) for f in figs] + [("gone", tmp_path / "missing.png")], notes=["n"],
    )  # fmt: skip
    text = report.read_text()
    assert "t &lt;x&gt;" in text and "missing figure: missing.png" in text and "n/a" in text
    embedded = text.split("data:image/png;base64,")[1:]
    assert len(embedded) == len(figs)
    assert base64.b64decode(embedded[0].split("'")[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='http" not in text and 'src="http' not in text  # self-contained


def test_overlay_blends_heatmap_where_it_is_high():
    image = np.full((32, 32, 3), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = overlay_heatmap(image, heat, alpha=0.5, cmap="gray")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[1, 1].mean() > out[30, 30].mean() + 50  # hot corner is brighter than the cold one


def test_tables_mean_std_and_csv_roundtrip(tmp_path):
    rows = [
        {"method": "slca", "fraction": 0.1, "seed": 0, "auc": 0.7},
        {"method": "slca", "fraction": 0.1, "seed": 1, "auc": 0.9},
        {"method": "slca", "fraction": 1.0, "seed": 0, "auc": float("nan")},
        {"method": "base", "fraction": 0.1, "seed": 0, "auc": 0.6},
    ]
    agg = {
        (r["method"], r["fraction"]): r
        for r in mean_std_rows(rows, group_by=("method", "fraction"), metrics=["auc"])
    }
    assert agg[("slca", 0.1)]["auc_mean"] == pytest.approx(0.8)
    assert agg[("slca", 0.1)]["auc_std"] == pytest.approx(0.1)
    assert math.isnan(agg[("slca", 1.0)]["auc_mean"])
    md = mean_std_markdown(rows, group_by=("method", "fraction"), metrics=["auc"])
    assert "| slca | 0.1 | 2 | 0.800 ± 0.100 |" in md and "n/a" in md
    write_csv_rows(tmp_path / "r.csv", rows)
    back = read_csv_rows(tmp_path / "r.csv")
    assert [r["method"] for r in back] == ["slca", "slca", "slca", "base"] and back[2]["auc"] == ""
    write_predictions_csv(
        tmp_path / "p.csv",
        ids=["a", "b"],
        probs=np.array([[0.2, 0.8], [0.6, 0.4]]),
        class_names=["x", "y"],
        y_true=np.array([1, 0]),
    )
    pred = read_csv_rows(tmp_path / "p.csv")
    assert (
        [p["predicted"] for p in pred] == ["y", "x"]
        and pred[0]["prob_y"] == "0.800000"
        and pred[1]["true"] == "x"
    )


def test_early_stopping_tie_breaks_on_loss_and_treats_nan_as_worst():
    stop = EarlyStopping(monitor="accuracy", patience=2)
    assert stop.step(0, {"accuracy": 0.5, "loss": 1.0})
    assert stop.step(1, {"accuracy": 0.5, "loss": 0.8})  # same accuracy, lower loss
    assert not stop.step(2, {"accuracy": float("nan"), "loss": 0.1})
    assert not stop.step(3, {"accuracy": 0.4, "loss": 0.1})
    assert stop.should_stop and stop.best_epoch == 1
    low = EarlyStopping(monitor="loss", mode="min", patience=1)
    assert low.step(0, {"loss": 1.0}) and low.step(1, {"loss": 0.5}) and not low.step(2, {"loss": 0.7})


def test_fit_keeps_best_weights_and_stops_early():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    scores = iter([0.6, 0.9, 0.7, 0.65, 0.64, 0.63])
    snapshots = []

    def validate(m):
        snapshots.append(m.weight.detach().clone())
        return {"auc": next(scores), "loss": 1.0}

    result = fit(
        model=model, train_loader=[torch.arange(0, 32), torch.arange(32, 64)],
        loss_fn=lambda m, idx: torch.nn.functional.cross_entropy(m(x[idx]), y[idx]), validate=validate,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5), epochs=6, stopper=EarlyStopping(patience=2), progress=False,
    )  # fmt: skip
    assert result.best_epoch == 1 and result.stopped_early and len(result.history) == 4
    assert torch.equal(model.weight, snapshots[1]) and torch.equal(result.best_state["weight"], snapshots[1])
    assert result.history[0]["train_loss"] > 0 and result.history[1]["val_auc"] == 0.9


def test_fit_monitoring_the_validation_loss_with_a_progress_bar():
    # The monitored metric "loss" once collided with the bar's own "loss" field (a TypeError in every epoch).
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    losses = iter([0.9, 0.5, 0.7])
    result = fit(
        model=model, train_loader=[torch.arange(0, 32)],
        loss_fn=lambda m, idx: torch.nn.functional.cross_entropy(m(x[idx]), y[idx]),
        validate=lambda m: {"loss": next(losses)}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epochs=3, stopper=EarlyStopping(monitor="loss", mode="min", patience=5), progress=True,
    )  # fmt: skip
    assert result.best_epoch == 1 and result.best_val == {"loss": 0.5}


def test_weights_roundtrip_and_config_merge(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2)}  # non-contiguous view
    save_weights(tmp_path / "m.safetensors", state)
    back = load_weights(tmp_path / "m.safetensors")
    assert torch.equal(back["a"], state["a"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    (tmp_path / "c.yaml").write_text("task: classify\nlr: 0.5\nepochs: 7\n")
    task = ClassifyTask()

    def settings(argv):  # the real `samadapt train` parser and layers: defaults < file < command line
        args = _parser("train", task).parse_args(argv)
        file_values = read_yaml_mapping(args.config) if args.config else {}
        file_values.pop("task", None)
        return build_config(ClassifyConfig, config_layers(task, args, file_values=file_values))

    cfg = settings(["--config", str(tmp_path / "c.yaml"), "--epochs", "9"])
    assert cfg.lr == 0.5 and cfg.epochs == 9  # the command line wins over the file
    # ... also when the value given equals the model's default
    default = ClassifyConfig()
    cfg = settings(
        ["--config", str(tmp_path / "c.yaml"), "--lr", str(default.lr), f"--epochs={default.epochs}"]
    )
    assert cfg.lr == default.lr and cfg.epochs == default.epochs
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.5\n")
    with pytest.raises(ConfigError, match="typo.yaml.*learning_rate"):
        settings(["--config", str(tmp_path / "typo.yaml")])
