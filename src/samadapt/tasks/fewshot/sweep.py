"""Label-efficiency sweep: methods x data fractions x seeds on the same splits, CLIP and masks loaded once.

Each run is a normal RUN folder (`OUT/<method>/frac<f>/seed<s>`); a run whose metrics.json exists is read back
instead of retrained, so an interrupted sweep resumes. The sweep writes results.csv, summary.md (mean +- std),
label_efficiency_<metric>.png and report.html.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from samadapt.reports import mean_std_markdown, plot_label_efficiency, write_csv_rows, write_html_report
from samadapt.tasks.fewshot.methods import get_method
from samadapt.tasks.fewshot.run import FewShotConfig, load_resources, run_fewshot, with_method
from samadapt.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro")


def run_sweep(
    cfg: FewShotConfig,
    *,
    methods: list[str],
    fractions: list[float],
    seeds: list[int],
    out: Path,
    resume: bool = False,
) -> Path:
    """Run every (method, fraction, seed); returns the sweep's report.html. With `resume`, a run interrupted
    mid-training continues from its last finished epoch (finished runs are always read back)."""
    for method in methods:
        get_method(method)  # unknown names fail before anything loads
    out = Path(out)
    res = load_resources(cfg, methods=methods, out=out)
    rows: list[dict[str, Any]] = []
    for method in methods:
        for fraction in fractions:
            for seed in seeds:
                run_dir = out / method / f"frac{fraction:g}" / f"seed{seed}"
                done = run_dir / "metrics.json"
                if done.is_file():
                    metrics = json.loads(done.read_text())
                else:
                    run_cfg = with_method(cfg, method=method, fraction=fraction, seed=seed, out=run_dir)
                    metrics = run_fewshot(run_cfg, res, run_dir, resume=resume)
                test = metrics["test"]
                log.info(
                    "%s fraction %g seed %d: test accuracy %.4f", method, fraction, seed, test["accuracy"]
                )
                rows.append(
                    {"method": method, "fraction": fraction, "seed": seed, "n_train": metrics["n_train"],
                     **{f"test_{m}": test.get(m) for m in METRICS},
                     "val_accuracy": metrics.get("val", {}).get("accuracy"), "run": str(run_dir.relative_to(out))}
                )  # fmt: skip
    write_csv_rows(out / "results.csv", rows)
    table = mean_std_markdown(rows, group_by=["method", "fraction"], metrics=[f"test_{m}" for m in METRICS])
    atomic_write_text(out / "summary.md", table + "\n")
    figures = [
        (f"Test {m} vs. fraction of training labels",
         plot_label_efficiency(out / f"label_efficiency_{m}.png", rows=rows, metric=f"test_{m}", x="fraction",
                               group="method", title=f"test {m}"))
        for m in ("accuracy", "auc")
    ]  # fmt: skip
    return write_html_report(
        out / "report.html",
        title=f"samadapt fewshot sweep ({cfg.clip})",
        tables=[("Runs", rows)],
        figures=figures,
        notes=[f"methods {', '.join(methods)}; fractions {fractions}; seeds {seeds}; data {cfg.data}"]
        + (
            []
            if cfg.clip_checkpoint
            else ["CLIP has RANDOM weights (no --clip-checkpoint): numbers are meaningless."]
        ),
    )
