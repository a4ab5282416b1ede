"""Label-efficiency sweep: training patients (1, 2, 5, all) x heads x seeds, one run folder each.

Resumable: a run whose metrics.json exists is read back, not retrained. A size above the split's training
patients (5 on a small dataset) is skipped with a warning instead of stopping the sweep. All runs share one
embedding store (default SWEEP/store), so every slice is encoded once for all heads and subset sizes.
Writes results.csv (one row per run), results.md (mean +- std per head and size), dice.png and hd95.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from samadapt.data.volumes import read_volumes
from samadapt.errors import ConfigError
from samadapt.tasks.segment.train import run_segmentation, training_patients

log = logging.getLogger(__name__)


def _size(value: str) -> int | None:
    if str(value).lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"train-volumes entries must be integers or 'all', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"train-volumes entries must be >= 1, got {n}")
    return n


def run_sweep(
    *, out: str | Path, heads: list[str], train_volumes: list[str], seeds: list[int], **train_kwargs: Any
) -> list[dict[str, Any]]:
    from samadapt.reports.curves import plot_label_efficiency
    from samadapt.reports.tables import mean_std_markdown, write_csv_rows
    from samadapt.utils.atomic import atomic_write_text

    out = Path(out)
    train_kwargs.pop("seed", None)
    if train_kwargs.get("store") is None:
        train_kwargs["store"] = out / "store"
    rows: list[dict[str, Any]] = []
    dataset = read_volumes(train_kwargs["data"], label_names=train_kwargs.get("label_names"))
    for seed in seeds:
        available = len(training_patients(dataset, seed=seed, splits_file=train_kwargs.get("splits_file")))
        for size in train_volumes:
            n = _size(size)
            if n is not None and n > available:
                log.warning("train-volumes %d skipped: the split (seed %d) has %d training patients", n, seed,
                            available)  # fmt: skip
                continue
            for head in heads:
                run = out / "runs" / f"{head}_tv{size}_seed{seed}"
                if (run / "metrics.json").is_file():
                    metrics = json.loads((run / "metrics.json").read_text())
                    log.info("%s: done before, reading its metrics", run.name)
                else:
                    metrics = run_segmentation(head=head, train_volumes=n, seed=seed, out=run, **train_kwargs)
                test = metrics["test"]
                row = {"head": head, "train_volumes": metrics["train_volumes"], "requested": size, "seed": seed,
                       "dice_mean": test["dice_mean"], "hd95_mean": test["hd95_mean"]}  # fmt: skip
                row.update({f"dice_{k}": v for k, v in test["dice"].items()})
                row.update({f"hd95_{k}": v for k, v in test["hd95"].items()})
                row["run"] = str(run.relative_to(out))
                rows.append(row)
                write_csv_rows(out / "results.csv", rows)  # after every run: a killed sweep keeps its table
    metrics_cols = [k for k in rows[0] if k.startswith(("dice", "hd95"))] if rows else []
    table = mean_std_markdown(rows, group_by=["head", "train_volumes"], metrics=metrics_cols)
    atomic_write_text(out / "results.md", table)
    for metric in ("dice_mean", "hd95_mean"):
        plot_label_efficiency(out / f"{metric.split('_')[0]}.png", rows=rows, metric=metric, x="train_volumes",
                              group="head", title=f"Test {metric} vs. training patients")  # fmt: skip
    print(table)
    return rows
