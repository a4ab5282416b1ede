"""The tasks by name: a plain dict from the CLI's `--task` to the module and class implementing `Task`.

Imported lazily, so `samadapt --help` and `samadapt info` do not load torch and every task.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from samadapt.engine.task import Task
from samadapt.errors import ConfigError

TASKS: dict[str, str] = {
    "classify": "samadapt.tasks.classify.task:ClassifyTask",
    "segment": "samadapt.tasks.segment.task:SegmentTask",
    "fewshot": "samadapt.tasks.fewshot.task:FewShotTask",
}


def get_task(name: str, *, source: Path | None = None) -> Task:
    if name not in TASKS:
        where = f"{source}: " if source is not None else ""
        raise ConfigError(f"{where}unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
