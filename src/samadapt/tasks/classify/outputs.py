"""What a classification run leaves in RUN: metrics.json, predictions.csv, plots and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samadapt.reports.classification_run import write_classification_run


def write_run_outputs(out: Path, *, metrics: dict[str, Any], **outputs: Any) -> None:
    """The shared classification run files, titled with the method and backbone."""
    title = f"samadapt classify: {metrics.get('method')} ({metrics.get('backbone', '')})"
    write_classification_run(out, title=title, metrics=metrics, **outputs)
