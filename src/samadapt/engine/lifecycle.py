"""One run's lifecycle, the same for every task.

1. Train into a hidden temporary folder beside the final one (`.RUN.partial`), with per-epoch resume state in
   `.RUN.partial/.resume` (`--resume` continues from it; without it an interrupted run starts over, said loudly).
2. Write the common files, `config.yaml`, `model.safetensors`, `predictions.csv`, `training_curves.png`,
   `report.html` and the task's own extras, then `metrics.json` last.
3. Rename the folder into place. A folder with `metrics.json` is a finished run; nothing else is.

An earlier finished run at the same place stays whole until the new one is complete; files there that are not
run outputs (a user's notes, an embedding store) are carried over into the new folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from samadapt.engine.config import CONFIG_FILE, RunConfig, dump_config
from samadapt.engine.task import Evaluation, Fitted, Output, RunContext, Task
from samadapt.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
CURVES_FILE = "training_curves.png"
# Files of a run that a new run at the same place replaces (the rest of the folder is carried over).
RUN_OUTPUTS = (METRICS_FILE, CONFIG_FILE, WEIGHTS_FILE, PREDICTIONS_FILE, REPORT_FILE, CURVES_FILE, ".resume")
FILES_LIST = ".run-files"  # what the run wrote: a new run at the same place replaces exactly these

_PREPARED: dict[tuple[str, str], Any] = {}


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def is_finished(run: Path) -> bool:
    return (Path(run) / METRICS_FILE).is_file()


def prepared_for(task: Task, cfg: RunConfig) -> Any:
    """`task.prepare(cfg)`, shared by consecutive runs with the same prepare key (one entry kept: memory)."""
    key = (task.name, task.prepare_key(cfg))
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = task.prepare(cfg, progress=cfg.progress)
    return _PREPARED[key]


def forget_prepared() -> None:
    _PREPARED.clear()


def execute_run(
    task: Task, cfg: RunConfig, *, resume: bool = False, dist: Any = None, prepared: Any = None
) -> dict[str, Any]:
    """Train, evaluate and write one run at `cfg.out`; returns its metrics (empty on non-main DDP ranks)."""
    if not cfg.out:
        from samadapt.errors import ConfigError

        raise ConfigError("--out RUN is required")
    final = Path(cfg.out)
    tmp = partial_dir(final)
    main = dist is None or dist.is_main
    started = time.perf_counter()
    # read (and check) the data first: bad data fails before anything of an earlier run is touched
    prepared = prepared if prepared is not None else prepared_for(task, cfg)
    # wall time per stage in metrics.json["stage_seconds"] (prepare: data reading and encoding into the store;
    # writing the outputs is the rest of "seconds")
    timing = {"prepare": time.perf_counter() - started}
    if main:
        _start(tmp, resume=resume)
    tracker = open_tracker(task, cfg) if main else None
    try:
        mark = time.perf_counter()
        fitted = task.fit(cfg, prepared, RunContext(dir=tmp, resume=resume, progress=cfg.progress, dist=dist))
        timing["fit"] = time.perf_counter() - mark
        if not main:
            return {}
        metrics = _finish(task, cfg, prepared, fitted, tmp, started=started, timing=timing)
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED")
        raise
    publish(tmp, final)
    if tracker is not None:
        log_run(tracker, final, metrics, fitted.history)
        tracker.close(status="FINISHED")
    return metrics


def open_tracker(task: Task, cfg: RunConfig) -> Any:
    """The run's tracker (`--track`); None when tracking is off."""
    if cfg.track == "none":
        return None
    from samadapt.tracking import make_tracker

    tracker = make_tracker(cfg.track, out=Path(cfg.out), uri=cfg.track_uri, run_name=Path(cfg.out).name,
                           experiment=cfg.experiment or f"samadapt-{task.name}", parent_run_id=cfg.track_parent)  # fmt: skip
    tracker.log_params({"task": task.name, **cfg.to_dict()})
    return tracker


def log_run(tracker: Any, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]) -> None:
    """Per-epoch history (step = epoch), the final metrics (`test.*`, `val.*` and the scalars of metrics.json)
    and the report, plots and run files as artifacts."""
    for row in history:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
    final = {
        f"{split}.{k}": v for split in ("val", "test") for k, v in flatten(metrics.get(split) or {}).items()
    }
    final.update({k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    tracker.log_metrics(final)
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and path.suffix in (".html", ".png", ".json", ".yaml", ".csv"):
            tracker.log_artifact(path)


def _finish(
    task: Task, cfg: RunConfig, prepared: Any, fitted: Fitted, tmp: Path, *, started: float, timing: dict
) -> dict:
    mark = time.perf_counter()
    evaluation = task.evaluate(cfg, prepared, fitted)
    timing["evaluate"] = time.perf_counter() - mark
    metrics = {
        **evaluation.metrics,
        "method": cfg.method,
        "budget": task.budget_value(evaluation.metrics, cfg),
        "seed": cfg.seed,
        "best_epoch": fitted.best_epoch,
        **fitted.info,
        "protocol": task.protocol(cfg),
        "stage_seconds": {key: round(value, 3) for key, value in timing.items()},
    }
    write_run(task, cfg, prepared, fitted, evaluation, tmp, metrics=metrics, started=started)
    return metrics


def _start(tmp: Path, *, resume: bool) -> None:
    state = tmp / ".resume"
    if tmp.exists() and not (resume and state.is_dir()):
        if state.is_dir():
            log.warning(
                "%s holds an interrupted training; starting from scratch (pass --resume to continue it)", tmp
            )
        shutil.rmtree(tmp)
    elif resume and not state.is_dir():
        log.info("%s: no resume state found, training from the start", tmp)
    tmp.mkdir(parents=True, exist_ok=True)


def write_run(
    task: Task,
    cfg: RunConfig,
    prepared: Any,
    fitted: Fitted,
    evaluation: Evaluation,
    run_dir: Path,
    *,
    metrics: dict[str, Any],
    started: float,
) -> None:
    """The common files and the task's extras; metrics.json last."""
    from samadapt.reports.curves import plot_training_curves
    from samadapt.reports.html import write_html_report
    from samadapt.reports.tables import write_csv_rows
    from samadapt.training.weights import save_weights

    dump_config(run_dir / CONFIG_FILE, cfg, recorded=task.recorded(cfg, prepared))
    save_weights(run_dir / WEIGHTS_FILE, fitted.weights, metadata={"task": task.name, "method": cfg.method})
    write_csv_rows(run_dir / PREDICTIONS_FILE, evaluation.predictions)
    outputs: list[Output] = []
    if fitted.history:
        curves = plot_training_curves(
            run_dir / CURVES_FILE, history=fitted.history, best_epoch=fitted.best_epoch
        )
        outputs.append(Output("Training curves", curves))
        write_csv_rows(run_dir / "history.csv", fitted.history)
    outputs = task.write_outputs(cfg, prepared, fitted, evaluation, run_dir) + outputs
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    summary = {"val": metrics.get("val") or {}, "test": metrics.get("test") or {}}
    summary.update({k: v for k, v in metrics.items() if k not in summary and not isinstance(v, dict | list)})
    protocol = metrics.get("protocol") or []
    tables = [(o.caption, o.rows) for o in outputs if o.rows is not None]
    if protocol:
        tables.insert(0, ("Protocol card: settings that differ from the reference", protocol))
    write_html_report(
        run_dir / REPORT_FILE,
        title=f"samadapt {task.name}: {cfg.method}",
        summary=_flat_summary(summary),
        tables=tables,
        figures=[(o.caption, o.path) for o in outputs if o.path is not None],
        notes=task.describe(cfg, evaluation),
    )
    shutil.rmtree(run_dir / ".resume", ignore_errors=True)  # complete: the resume state is no longer needed
    written = sorted(entry.name for entry in run_dir.iterdir()) + [METRICS_FILE]
    atomic_write_text(run_dir / FILES_LIST, "\n".join(dict.fromkeys(written)) + "\n")
    atomic_write_json(run_dir / METRICS_FILE, metrics)


def _flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Nested metric blocks (segmentation's per-structure dice) flattened to `dice.RV` columns for the report."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out[key] = flatten(value)
        else:
            out[key] = value
    return out


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete folder into place; an earlier run there is replaced, other files there kept."""
    if final.exists():
        listed = final / FILES_LIST
        owned = set(listed.read_text().split()) if listed.is_file() else set(RUN_OUTPUTS)
        for entry in final.iterdir():
            if entry.name not in owned and entry.name != FILES_LIST and not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)  # a user's file or a cache inside the run folder survives
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
