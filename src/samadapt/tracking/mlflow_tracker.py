"""MLflow backend through `MlflowClient`: one MLflow run per samadapt run, sweep runs nested under a parent run.

Default store: a local file store ``OUT/mlruns`` (a ``file:`` URI; view it with ``mlflow ui --backend-store-uri
OUT/mlruns``); pass ``uri`` for a server or a database (``sqlite:///...`` needs the full ``mlflow`` package).
MLflow 3 keeps the file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which this module sets for
file URIs. No network: MLflow's telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``, ``DO_NOT_TRACK``) before
mlflow is imported. Nested runs carry MLflow's ``mlflow.parentRunId`` tag, so the UI shows them under the sweep.
Params longer than MLflow's limit (6000 characters) are cut, with ``...`` at the end; a param logged twice with
different values is an MLflow error, as in MLflow itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from samadapt.tracking.base import Tracker

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
BATCH = 100  # MLflow's log_batch takes at most 100 params and 1000 metrics per call


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def default_uri(out: Path) -> str:
    return (Path(out) / "mlruns").resolve().as_uri()


class MlflowTracker(Tracker):
    kind = "mlflow"

    def __init__(
        self,
        *,
        out: Path,
        run_name: str,
        experiment: str,
        uri: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        """Start run ``run_name`` in ``experiment`` (created when missing); nested under ``parent_run_id``."""
        super().__init__(run_name=run_name, experiment=experiment)
        self.uri = uri or default_uri(out)
        self.out = Path(out)
        self.client = _client(self.uri)
        self.experiment_id = self._experiment_id(experiment)
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self._run_id: str = run.info.run_id
        self.parent_run_id = parent_run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process of the same sweep
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [
            Param(k, v if len(v) <= MAX_PARAM_CHARS else v[: MAX_PARAM_CHARS - 3] + "...")
            for k, v in params.items()
        ]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self._run_id, params=items[start : start + BATCH])

    def _log_metrics(self, metrics: dict[str, float], *, step: int | None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, int(step or 0)) for k, v in metrics.items()]
        for start in range(0, len(items), 10 * BATCH):
            self.client.log_batch(self._run_id, metrics=items[start : start + 10 * BATCH])

    def _log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self._run_id, str(path))

    def child(self, run_name: str) -> MlflowTracker:
        return MlflowTracker(
            out=self.out,
            run_name=run_name,
            experiment=self.experiment,
            uri=self.uri,
            parent_run_id=self._run_id,
        )

    def _close(self, status: str) -> None:
        self.client.set_terminated(self._run_id, status)
