"""One predict path: `samadapt predict --run RUN` reads any task's run through its config model, checks that every
model file it loads is the one the run was trained with (sha256 recorded at training), then lets the task predict."""

from __future__ import annotations

import argparse
from pathlib import Path

from samadapt.engine.config import load_run_config
from samadapt.engine.task import Task
from samadapt.errors import CheckpointError


def checked_checkpoint(
    what: str, given: str | Path | None, saved: str | None, saved_sha: str | None
) -> str | None:
    """The checkpoint predict loads: the one given (it may have moved) or the one recorded; its sha256 must equal
    the recorded one, so predictions never come from other weights than the trained run's."""
    from samadapt.encoders.checkpoint import sha256_file

    path = given if given is not None else saved
    if path is None:
        return None
    flag = "--checkpoint" if what == "encoder" else f"--{what}-checkpoint"
    if not Path(path).is_file():
        raise CheckpointError(f"{what} checkpoint {path}: file not found (pass {flag} FILE)")
    if saved_sha:
        found = sha256_file(path)
        if found != saved_sha:
            raise CheckpointError(
                f"{what} checkpoint {path}: sha256 {found[:12]} differs from the {saved_sha[:12]} the run was "
                f"trained with (another file?); pass the training checkpoint with {flag}"
            )
    return str(path)


def predict_run(task: Task, run: Path, *, args: argparse.Namespace, progress: bool) -> Path:
    cfg, recorded = load_run_config(run, task.Config)
    resolved = {}
    for what, saved, saved_sha in task.checkpoints(cfg, recorded):
        given = getattr(args, "checkpoint" if what == "encoder" else f"{what}_checkpoint", None)
        resolved[what] = checked_checkpoint(what, given, saved, saved_sha)
    args.checkpoints = resolved
    return task.predict(cfg, recorded, run=Path(run), args=args, progress=progress)
