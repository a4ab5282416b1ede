"""Experiment tracking: `make_tracker(kind, out=..., run_name=..., experiment=...)` for MLflow or TensorBoard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from samadapt.errors import ConfigError
from samadapt.tracking.base import Tracker, clean_metrics, flatten_params


def _none(
    *, out: Path, uri: str | None, run_name: str, experiment: str, parent_run_id: str | None
) -> Tracker:
    return Tracker(run_name=run_name, experiment=experiment)


def _mlflow(
    *, out: Path, uri: str | None, run_name: str, experiment: str, parent_run_id: str | None
) -> Tracker:
    from samadapt.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(
        out=out, uri=uri, run_name=run_name, experiment=experiment, parent_run_id=parent_run_id
    )


def _tensorboard(
    *, out: Path, uri: str | None, run_name: str, experiment: str, parent_run_id: str | None
) -> Tracker:
    from samadapt.tracking.tensorboard_tracker import TensorBoardTracker

    # uri, when given, is the folder the event files go under (instead of OUT/tensorboard)
    log_dir = Path(uri) / run_name if uri else None
    return TensorBoardTracker(out=out, run_name=run_name, experiment=experiment, log_dir=log_dir)


TRACKERS: dict[str, Callable[..., Tracker]] = {"none": _none, "mlflow": _mlflow, "tensorboard": _tensorboard}


def make_tracker(
    kind: str | None,
    *,
    out: str | Path,
    uri: str | None = None,
    run_name: str,
    experiment: str,
    parent_run_id: str | None = None,
) -> Tracker:
    """The tracker ``kind`` (None / "none", "mlflow", "tensorboard") for one run writing into folder ``out``.

    ``uri``: MLflow tracking URI (default ``file:`` store ``OUT/mlruns``), or TensorBoard's log root (default
    ``OUT/tensorboard``). ``parent_run_id`` (MLflow) nests the run under a sweep's run started in another process
    (in the same process use ``parent.child(run_name)``).
    """
    name = "none" if kind is None else str(kind).lower()
    if name not in TRACKERS:
        raise ConfigError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    return TRACKERS[name](
        out=Path(out), uri=uri, run_name=run_name, experiment=experiment, parent_run_id=parent_run_id
    )


__all__ = ["TRACKERS", "Tracker", "clean_metrics", "flatten_params", "make_tracker"]
