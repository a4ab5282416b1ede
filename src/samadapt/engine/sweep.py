"""One sweep engine for every task: a grid over config fields (methods x budgets x seeds, or any key).

Each point of the grid is a normal run folder `SWEEP/runs/<method>_b<budget>_s<seed>[_<key><value>...]`, written
through the shared lifecycle (a temporary folder renamed into place when complete), so a restarted sweep skips
finished runs and redoes half-written ones. The runs are handed to a launcher (`launcher.map(run_job, specs)`):
in-process one after another by default; process pools and cluster schedulers plug in at that seam. Outputs, the
same for every task:

- `results.csv`: `method, budget, seed, n_train, run, seconds`, any extra axes, then the test metrics under the
  names of `metrics.json["test"]` (nested blocks as dotted names, e.g. `dice.RV`);
- `summary.md`: mean ± std and n per method and budget (no std when n = 1);
- `label_efficiency_<metric>.png` for the task's headline metrics; `report.html` with all of it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.engine.config import RunConfig, dump_config
from samadapt.engine.lifecycle import execute_run, flatten, is_finished, prepared_for
from samadapt.engine.registry import get_task
from samadapt.engine.task import Task
from samadapt.errors import ConfigError

log = logging.getLogger(__name__)

LEADING = ("method", "budget", "seed", "n_train", "run", "seconds")
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.md"


def run_job(spec: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    """Execute one run of a sweep from a picklable spec (task name, config as a dict, resume)."""
    task_name, values, resume = spec
    task = get_task(task_name)
    cfg = task.Config.model_validate(values)
    return execute_run(task, cfg, resume=resume)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "-").replace(" ", "")


def run_name(cfg: RunConfig, task: Task, extra_axes: Sequence[str]) -> str:
    budget = getattr(cfg, task.budget_field)
    parts = [f"{cfg.method}_b{format_value(budget) if budget is not None else '-all'}_s{cfg.seed}"]
    parts += [f"{key}{format_value(getattr(cfg, key))}" for key in extra_axes]
    return "_".join(parts)


def expand_seeds(value: Any) -> list[int]:
    """`3` (or "3") means seeds 0, 1, 2; a list (or "0,3") means those seeds."""
    if isinstance(value, bool):
        raise ConfigError(f"--seeds {value!r}: give N >= 1 (seeds 0..N-1) or a comma list such as 0,3")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        return list(range(n)) if n >= 1 else [0]
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        seeds = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {value!r}: give N >= 1 (seeds 0..N-1) or a comma list such as 0,3"
        ) from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {value!r}: seeds must be integers >= 0")
    return seeds


def as_list(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def plan_runs(task: Task, base: RunConfig, axes: dict[str, list[Any]], out: Path) -> list[RunConfig]:
    """One validated config per grid point, in axis order (methods outermost, as the tables read)."""
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"sweep axis {key!r} is empty")
    extra = [k for k in axes if k not in ("method", task.budget_field, "seed")]
    configs, seen = [], set()
    for values in itertools.product(*axes.values()):
        cfg = base.replace(**dict(zip(axes, values)))
        name = run_name(cfg, task, extra)
        if name in seen:
            continue
        seen.add(name)
        configs.append(cfg.replace(out=str(out / "runs" / name)))
    return configs


def run_sweep(
    task: Task,
    base: RunConfig,
    axes: dict[str, list[Any]],
    *,
    out: str | Path,
    resume: bool = False,
    launcher: Any = None,
    notes: Sequence[str] = (),
    skip: Callable[[RunConfig], str | None] | None = None,
) -> Path:
    """Run every grid point not finished yet, then write the sweep's tables, plots and report; returns report.html.

    `skip(cfg)` may return a reason to leave a grid point out (e.g. more training volumes than the split has)."""
    out = Path(out)
    shared = {k: str(out / d) for k, d in (("store", "embeddings"), ("mask_cache", "mask_cache"))
              if k in type(base).model_fields and getattr(base, k) is None}  # fmt: skip
    if shared:  # every run of the sweep reads one embedding store / mask cache
        base = base.replace(**shared)
    configs = plan_runs(task, base, axes, out)
    kept = []
    for cfg in configs:
        reason = skip(cfg) if skip is not None else None
        if reason:
            log.warning("sweep: %s skipped: %s", Path(cfg.out).name, reason)
        else:
            kept.append(cfg)
    configs = kept
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(c.out).name for c in configs]
    dump_config(out / "sweep.yaml", base, recorded={"axes": axes, "runs": runs})
    todo = [cfg for cfg in configs if not is_finished(Path(cfg.out))]
    for cfg in configs:
        if cfg not in todo:
            log.info("sweep: %s already complete, skipped", Path(cfg.out).name)
    parent = _sweep_tracker(task, base, out)
    failed: list[Any] = []
    try:
        if todo:
            # fill the shared caches (embedding store, masks) once, before any run
            prepared_for(task, todo[0])
            if base.track != "none":  # every run logs into the sweep's store / log folder, under its run
                uri = _child_uri(base, out)
                parent_id = parent.run_id if parent is not None else None
                todo = [cfg.replace(track_parent=parent_id, track_uri=uri) for cfg in todo]
            specs = [(task.name, cfg.to_dict(), resume) for cfg in todo]
            if launcher is None:
                # in this process, one after another: a run's error stops the sweep with that error
                for spec in specs:
                    run_job(spec)
            else:
                failed = [r for r in launcher.map(run_job, specs) if not r.ok]
        extra = [k for k in axes if k not in _STANDARD(task)]
        rows = [result_row(task, cfg, out, extra_axes=extra) for cfg in configs if is_finished(Path(cfg.out))]
        report = write_sweep_outputs(task, base, rows, out=out, extra_axes=extra, notes=notes)
        if parent is not None:
            for name in (RESULTS_FILE, SUMMARY_FILE, "report.html", "label_efficiency.png"):
                if (out / name).is_file():
                    parent.log_artifact(out / name)
    except BaseException:
        if parent is not None:
            parent.close(status="FAILED")
        raise
    if parent is not None:
        parent.close(status="FAILED" if failed else "FINISHED")
    if failed:
        names = "; ".join(f"{Path(todo[r.index].out).name}: {r.error}" for r in failed[:5])
        raise SweepError(
            f"{len(failed)} of {len(todo)} runs failed ({names}); the others are in {out / RESULTS_FILE}. "
            "Run the same command again to redo only the failed and missing runs"
        )
    return report


class SweepError(ConfigError):
    """Some runs of a sweep failed (the finished ones are kept and tabled)."""


def _child_uri(base: RunConfig, out: Path) -> str | None:
    """Every run of a sweep logs into the sweep's store (MLflow) or log folder (TensorBoard)."""
    if base.track_uri:
        return base.track_uri
    if base.track == "mlflow":
        from samadapt.tracking.mlflow_tracker import default_uri

        return default_uri(out)
    return str(out / "tensorboard")


def _sweep_tracker(task: Task, base: RunConfig, out: Path) -> Any:
    """The sweep's own tracking run (MLflow: the parent of every run's; TensorBoard: none needed)."""
    if base.track != "mlflow":
        return None
    from samadapt.tracking import make_tracker

    tracker = make_tracker("mlflow", out=out, uri=base.track_uri, run_name=out.name,
                           experiment=base.experiment or f"samadapt-{task.name}")  # fmt: skip
    tracker.log_params({"task": task.name, "sweep": str(out), **base.to_dict()})
    return tracker


def _STANDARD(task: Task) -> tuple[str, ...]:  # noqa: N802 (reads as a constant)
    return ("method", task.budget_field, "seed")


def result_row(task: Task, cfg: RunConfig, out: Path, *, extra_axes: Sequence[str] = ()) -> dict[str, Any]:
    """One results.csv row from a finished run's metrics.json."""
    run = Path(cfg.out)
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable metrics of a finished run ({exc}); delete the run to redo it"
        ) from None
    row: dict[str, Any] = {
        "method": metrics.get("method", cfg.method),
        "budget": metrics.get("budget", getattr(cfg, task.budget_field)),
        "seed": metrics.get("seed", cfg.seed),
        "n_train": metrics.get("n_train"),
        "run": str(run.relative_to(out)),
        "seconds": metrics.get("seconds"),
    }
    for key in extra_axes:
        row[key] = getattr(cfg, key)
    row.update(flatten(metrics.get("test") or {}))
    return row


def summary_rows(
    rows: list[dict[str, Any]], *, group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
    table = []
    for key, members in groups.items():
        cells: dict[str, Any] = dict(zip(group_by, key))
        cells["n"] = len(members)
        for metric in metrics:
            values = np.array([_number(m.get(metric)) for m in members], dtype=float)
            values = values[~np.isnan(values)]
            if not values.size:
                cells[metric] = "n/a"
            elif len(values) == 1:
                cells[metric] = f"{values[0]:.3f}"
            else:
                cells[metric] = f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"
        table.append(cells)
    return table


def write_sweep_outputs(
    task: Task,
    base: RunConfig,
    rows: list[dict[str, Any]],
    *,
    out: Path,
    extra_axes: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Path:
    from samadapt.reports.curves import plot_label_efficiency
    from samadapt.reports.html import write_html_report
    from samadapt.reports.tables import markdown_table, write_csv_rows
    from samadapt.utils.atomic import atomic_write_text

    metric_columns = list(
        dict.fromkeys(k for r in rows for k in r if k not in LEADING and k not in extra_axes)
    )
    metric_columns = [k for k in metric_columns if not any(k == a for a in extra_axes)]
    columns = [*LEADING, *extra_axes, *metric_columns]
    write_csv_rows(out / "results.csv", rows, columns=columns)
    group_by = ["method", "budget", *extra_axes]
    headline = [m for m in task.headline_metrics if any(m in r for r in rows)]
    shown = headline + [m for m in metric_columns if m not in headline]
    table = summary_rows(rows, group_by=group_by, metrics=shown)
    header = [f"# samadapt {task.name} sweep", "", *[f"{n}" for n in notes], "",
              "Test-split metrics: mean ± std over seeds (population std), n runs per row.", ""]  # fmt: skip
    atomic_write_text(
        out / SUMMARY_FILE, "\n".join(header) + markdown_table(table, columns=[*group_by, "n", *shown])
    )
    figures = []
    numeric_budget = all(_number(r.get("budget")) == _number(r.get("budget")) for r in rows)
    for metric in headline:
        if not numeric_budget:
            break
        path = plot_label_efficiency(
            out / f"label_efficiency_{metric.replace('.', '_')}.png", rows=rows, metric=metric, x="budget",
            group="method", title=f"test {metric} vs. {task.budget_field.replace('_', ' ')}",
        )  # fmt: skip
        figures.append((f"Label efficiency: test {metric}", path))
    if figures:
        import shutil

        shutil.copyfile(figures[0][1], out / "label_efficiency.png")
    return write_html_report(
        out / "report.html",
        title=f"samadapt {task.name}: sweep",
        tables=[("Mean ± std over seeds (test split)", table), ("All runs", rows)],
        figures=figures,
        notes=[*notes, f"budget = {task.budget_field}; {len(rows)} runs"],
    )


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number
