"""`Tracker`: what a run reports to an experiment tracker, and the no-op tracker.

Every backend implements the same five calls: ``log_params`` (nested dicts flattened with dots), ``log_metrics``
(NaN / None / non-numbers skipped), ``log_artifact`` (a file or a folder), ``child(run_name)`` (a nested run, for
the runs of a sweep) and ``close(status)``; a tracker is a context manager that closes with ``"FAILED"`` when
the block raises. Trackers are for one process: a worker process makes its own (see ``make_tracker``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from samadapt.errors import ConfigError

STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten_params(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}``: keys joined with dots, values strings
    (lists and tuples as JSON, None as ``"None"``, paths and everything else with ``str``)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a tracker can store: finite or infinite numbers as floats; None, NaN and non-numbers dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool | str):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isnan(number):
            out[str(key)] = number
    return out


class Tracker:
    """Base class and the ``"none"`` tracker: every call does nothing."""

    kind = "none"

    def __init__(self, *, run_name: str = "", experiment: str = "") -> None:
        self.run_name = run_name
        self.experiment = experiment
        self.closed = False

    @property
    def run_id(self) -> str | None:
        """The backend's id of this run (MLflow run id, TensorBoard log folder), None for the no-op tracker."""
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_params(flatten_params(params))

    def log_metrics(self, metrics: Mapping[str, Any], *, step: int | None = None) -> None:
        values = clean_metrics(metrics)
        if values:
            self._log_metrics(values, step=step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"artifact {path}: no such file or folder")
        self._log_artifact(path)

    def child(self, run_name: str) -> Tracker:
        """A nested run (one run of a sweep under the sweep's run)."""
        return Tracker(run_name=run_name, experiment=self.experiment)

    def close(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ConfigError(f"run status {status!r}: choose one of {', '.join(STATUSES)}")
        if not self.closed:
            self.closed = True
            self._close(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is KeyboardInterrupt:
            self.close("KILLED")
        else:
            self.close("FAILED" if exc_type is not None else "FINISHED")

    # What backends implement; the public methods have cleaned the inputs.
    def _log_params(self, params: dict[str, str]) -> None:
        pass

    def _log_metrics(self, metrics: dict[str, float], *, step: int | None) -> None:
        pass

    def _log_artifact(self, path: Path) -> None:
        pass

    def _close(self, status: str) -> None:
        pass
