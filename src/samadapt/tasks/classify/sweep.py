"""Label-efficiency sweep: methods x label fractions x seeds on one dataset, embeddings computed once.

Resumable: each run is trained in a hidden temporary folder and renamed to `runs/<method>_f<fraction>_s<seed>`
only when complete, so after a crash finished runs are skipped and half-written ones are redone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from samadapt.errors import ConfigError
from samadapt.reports import mean_std_markdown, plot_label_efficiency, write_csv_rows, write_html_report
from samadapt.tasks.classify.config import METHODS, ClassifyConfig
from samadapt.tasks.classify.prepare import prepare
from samadapt.tasks.classify.train import run_classification
from samadapt.training import save_run_config
from samadapt.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)
METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro", "loss")


def run_name(method: str, fraction: float, seed: int) -> str:
    return f"{method}_f{fraction:g}_s{seed}"


def result_row(metrics: dict[str, Any], *, run: str) -> dict[str, Any]:
    """One results.csv row: test metrics under their own names, validation metrics prefixed `val_`."""
    row: dict[str, Any] = {
        "method": metrics["method"],
        "fraction": metrics["label_fraction"],
        "seed": metrics["seed"],
        "n_train": metrics["n_train"],
    }
    row.update({k: metrics["test"].get(k) for k in METRICS})
    row.update({f"val_{k}": metrics["val"].get(k) for k in METRICS})
    row.update({"seconds": metrics.get("seconds"), "run": run})
    return row


def run_sweep(
    base: ClassifyConfig,
    *,
    methods: list[str],
    fractions: list[float],
    seeds: int,
    out: Path,
    progress: bool = True,
    extra_notes: list[str] | None = None,
) -> Path:
    """Run every (method, fraction, seed), write results.csv, summary.md, label-efficiency plots, report.html."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods {','.join(methods)}: choose from {', '.join(METHODS)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"--label-fractions {fractions}: each must be in (0, 1]")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    store = base.store or str(out / "embeddings")
    base = dataclasses.replace(base, store=store, out=str(out))
    save_run_config(
        out / "sweep.yaml",
        {
            "task": "classify",
            **base.to_dict(),
            "methods": methods,
            "label_fractions": fractions,
            "seeds": seeds,
        },
    )
    networks = [m for m in methods if m != "linear-probe"]
    prep_cfg = dataclasses.replace(base, method=networks[0] if networks else "linear-probe").validate()
    prepared = prepare(prep_cfg, need_sam=methods != ["baseline"], progress=progress)
    rows: list[dict[str, Any]] = []
    for method in methods:
        for fraction in fractions:
            for seed in range(seeds):
                name = run_name(method, fraction, seed)
                final = runs_dir / name
                if not (final / "metrics.json").is_file():
                    cfg = dataclasses.replace(
                        base, method=method, label_fraction=fraction, seed=seed
                    ).validate()
                    tmp = runs_dir / f".{name}.partial"
                    shutil.rmtree(tmp, ignore_errors=True)
                    log.info("sweep: training %s", name)
                    run_classification(cfg, prepared, tmp, progress=progress)
                    shutil.rmtree(final, ignore_errors=True)  # a folder without metrics.json is incomplete
                    os.replace(tmp, final)
                else:
                    log.info("sweep: %s already complete, skipped", name)
                metrics = json.loads((final / "metrics.json").read_text())
                rows.append(result_row(metrics, run=f"runs/{name}"))
                write_csv_rows(out / "results.csv", rows)
    return write_sweep_summary(out, rows=rows, base=base, notes=extra_notes or [])


def write_sweep_summary(
    out: Path, *, rows: list[dict[str, Any]], base: ClassifyConfig, notes: list[str]
) -> Path:
    """summary.md (mean ± std per method and fraction), label-efficiency plots and report.html."""
    table = mean_std_markdown(
        rows, group_by=("method", "fraction"), metrics=("accuracy", "auc", "balanced_accuracy", "f1_macro")
    )
    weights = (
        base.checkpoint or f"RANDOM weights ({base.encoder_arch or 'default'} {base.encoder} architecture)"
    )
    header = [
        "# Label-efficiency sweep",
        "",
        f"Data: `{base.data}`; encoder {base.encoder} with {weights}; backbone {base.backbone} "
        f"({base.backbone_weights or 'random init'}), image size {base.image_size}; test-split metrics, mean ± std over seeds.",
        "",
    ]
    atomic_write_text(out / "summary.md", "\n".join(header) + "\n" + table)
    figures = [
        (f"Label efficiency ({metric}, test)", plot_label_efficiency(out / f"label_efficiency_{metric}.png", rows=rows, metric=metric))
        for metric in ("accuracy", "auc")
    ]  # fmt: skip
    shutil.copyfile(out / "label_efficiency_accuracy.png", out / "label_efficiency.png")
    from samadapt.reports import mean_std_rows

    agg = mean_std_rows(
        rows, group_by=("method", "fraction"), metrics=("accuracy", "auc", "balanced_accuracy", "f1_macro")
    )
    return write_html_report(
        out / "report.html",
        title="samadapt classify: label-efficiency sweep",
        tables=[("Mean and std over seeds (test split)", agg), ("All runs", rows)],
        figures=figures,
        notes=[header[2], *notes],
    )
