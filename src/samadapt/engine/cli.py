"""`samadapt train|sweep|predict` for every task, from the task's config model (one flag vocabulary).

    samadapt train --task T [--config CFG] [--preset NAME] [--resume] --out RUN  ...settings...
    samadapt sweep --task T [--config CFG] --methods a,b --budgets x,y --seeds N [--grid key=v1,v2] --out DIR
    samadapt predict --run RUN [--checkpoint FILE] --out OUT  ...task inputs...

Layers, later ones winning: the model's defaults < `--preset` < `--config` file < flags on the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from samadapt.engine.config import RunConfig, build_config, canonical_key, field_meta, read_yaml_mapping
from samadapt.engine.flags import SINGLE, add_config_flags, axis_fields, flag_of, given_settings, parse_grid
from samadapt.engine.registry import TASKS, get_task
from samadapt.engine.task import Task
from samadapt.errors import ConfigError

log = logging.getLogger(__name__)


def _parser(command: str, task: Task) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"samadapt {command} --task {task.name}")
    parser.add_argument("--task", choices=list(TASKS), default=task.name)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if command in ("train", "sweep"):
        parser.add_argument(
            "--config", type=Path, default=None, help="YAML file with the same keys as the flags"
        )
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue interrupted trainings from their last finished epoch",
        )
        add_config_flags(parser, task.Config, sweep=command == "sweep")
    if command == "sweep":
        launch = parser.add_argument_group("launching the runs")
        launch.add_argument(
            "--launcher",
            choices=("local", "slurm"),
            default="local",
            help="local: on this machine (--jobs N processes); slurm: one array job per run (submitit)",
        )
        launch.add_argument(
            "--jobs", type=int, default=1, help="local: runs at once in a process pool (default 1)"
        )
        launch.add_argument(
            "--slurm-partition", default=None, help="slurm: partition (default: the cluster's)"
        )
        launch.add_argument("--slurm-time", type=int, default=60, help="slurm: minutes per run (default 60)")
        launch.add_argument("--gpus-per-run", type=int, default=0, help="slurm: GPUs per run (default 0)")
        launch.add_argument("--cpus-per-run", type=int, default=4, help="slurm: CPUs per run (default 4)")
        launch.add_argument(
            "--mem-gb", type=float, default=16, help="slurm: memory per run in GB (default 16)"
        )
        launch.add_argument("--array-parallelism", type=int, default=16, help="slurm: array tasks at once")
        launch.add_argument("--slurm-executor", choices=("slurm", "local", "debug"), default="slurm",
                            help="submitit executor: slurm, or local/debug to try a sweep without a cluster")  # fmt: skip
    return parser


def _preset_layer(task: Task, name: str | None, where: str) -> list[tuple[str, dict[str, Any]]]:
    if not name:
        return []
    if name not in task.presets:
        known = ", ".join(task.presets) or "none"
        raise ConfigError(f"{where}: unknown {task.name} preset {name!r}; known presets: {known}")
    return [(f"preset {name!r}", dict(task.presets[name]))]


def config_layers(
    task: Task, args: argparse.Namespace, *, file_values: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """defaults < preset < config file < command line, as build_config's layers."""
    model = task.Config
    cli = given_settings(model, args)
    file_values = dict(file_values or {})
    source = str(args.config) if getattr(args, "config", None) else "config"
    preset = cli.get("preset") or file_values.get("preset")
    layers = _preset_layer(task, preset, "command line" if cli.get("preset") else source)
    if file_values:
        layers.append((source, file_values))
    if cli:
        layers.append(("command line", cli))
    if getattr(args, "no_progress", False):
        layers.append(("--no-progress", {"progress": False}))
    return layers


def _file_values(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    if not getattr(args, "config", None):
        return {}
    values = read_yaml_mapping(args.config)
    named = values.pop("task", None)
    if named is not None and named != task.name:
        raise ConfigError(f"{args.config}: task is {named!r}, but this command runs --task {task.name}")
    return values


def train(task: Task, rest: list[str]) -> int:
    from samadapt.engine.lifecycle import execute_run, forget_prepared
    from samadapt.training.progress import close_bars_on_error

    args = _parser("train", task).parse_args(rest)
    file_values = {
        canonical_key(task.Config, k, where=str(args.config)): v for k, v in _file_values(args, task).items()
    }
    cfg = build_config(task.Config, config_layers(task, args, file_values=file_values))
    if not cfg.out:
        raise ConfigError("--out RUN is required")
    dist = _join(task, cfg)
    forget_prepared()  # nothing prepared by an earlier command in this process (a failed one, say) is reused
    try:
        with close_bars_on_error():
            metrics = execute_run(task, cfg, resume=bool(args.resume), dist=dist)
    finally:
        forget_prepared()
        _leave(dist)
    if metrics:
        test = metrics.get("test") or {}
        shown = ", ".join(f"{m} {_fmt(_get(test, m))}" for m in task.headline_metrics)
        print(f"{task.name} {cfg.method}: test {shown} (n_train {metrics.get('n_train')}) -> {cfg.out}")
    return 0


def _join(task: Task, cfg: RunConfig) -> Any:
    """Under torchrun: join the process group for tasks that train with DDP; refuse it for the others."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not getattr(task, "supports_ddp", False):
        raise ConfigError(f"--task {task.name} does not train under torchrun (DDP); run it as one process")
    from samadapt.training import init_distributed

    return init_distributed(device=cfg.device)


def _leave(dist: Any) -> None:
    if dist is not None:
        from samadapt.training import cleanup_distributed

        cleanup_distributed(dist)


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    value: Any = mapping
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def sweep_axes(task: Task, args: argparse.Namespace, file_values: dict[str, Any]) -> dict[str, list[Any]]:
    """Axes from the command line (`--methods a,b`), then the config file (`methods: [a, b]`), then the task's
    defaults; the rest of the file's keys are single settings (left in `file_values`)."""
    from samadapt.engine.sweep import as_list, expand_seeds

    model = task.Config
    axes: dict[str, list[Any]] = {}
    for name in axis_fields(model):
        info = field_meta(model, name)
        keys = [
            flag_of(model, name, sweep=True),
            *info.get("sweep_aliases", []),
            *info.get("sweep_deprecated", []),
        ]
        yaml_keys = [k.lstrip("-").replace("-", "_") for k in keys]
        found = None
        for key in yaml_keys:
            if key in file_values:
                found = file_values.pop(key)
                if key in [d.lstrip("-").replace("-", "_") for d in info.get("sweep_deprecated", [])]:
                    import warnings

                    warnings.warn(f"{args.config}: {key!r} is deprecated; use {yaml_keys[0]!r}", FutureWarning,
                                  stacklevel=2)  # fmt: skip
        if (
            name in file_values and found is None
        ):  # the plain key: a list is an axis, a value a one-value axis
            value = file_values.pop(name)
            found = value if isinstance(value, list) or (isinstance(value, str) and "," in value) else [value]
        if hasattr(args, name + SINGLE):
            found = [getattr(args, name + SINGLE)]
        if hasattr(args, name):
            found = getattr(args, name)
        if found is None:
            found = task.sweep_defaults.get(name)
        if found is None:
            continue
        # seeds: N means 0..N-1, a list (or `--seed S`, `seed: S`) those seeds
        axes[name] = expand_seeds(found) if name == "seed" else as_list(found)
    for key, values in parse_grid(model, getattr(args, "grid", None)).items():
        axes[key] = values
    return axes


def sweep(task: Task, rest: list[str]) -> int:
    from samadapt.engine.lifecycle import forget_prepared
    from samadapt.engine.sweep import run_sweep
    from samadapt.training.progress import close_bars_on_error

    args = _parser("sweep", task).parse_args(rest)
    file_values = {
        canonical_key(task.Config, k, where=str(args.config)): v for k, v in _file_values(args, task).items()
    }
    axes = sweep_axes(task, args, file_values)
    for name in axes:  # axis values given on the command line are not single settings
        for attr in (name, name + SINGLE):
            if hasattr(args, attr):
                delattr(args, attr)
    layers = config_layers(task, args, file_values=file_values)
    first = {name: values[0] for name, values in axes.items()}
    base = build_config(task.Config, [*layers, ("sweep axes", first)])
    if not base.out:
        raise ConfigError(
            f"{args.config or 'sweep'}: say where the sweep goes with --out (or `out:` in the file)"
        )
    forget_prepared()
    try:
        with close_bars_on_error():
            report = run_sweep(task, base, axes, out=base.out, resume=bool(args.resume), skip=task.sweep_skip,
                               launcher=_launcher(args, Path(base.out)))  # fmt: skip
    finally:
        forget_prepared()
    print(f"sweep report: {report}")
    return 0


def _launcher(args: argparse.Namespace, out: Path) -> Any:
    """None (in this process, as before) unless a pool or a scheduler is asked for."""
    if args.launcher == "local" and args.jobs == 1:
        return None
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    from samadapt.engine.launchers import make_launcher

    return make_launcher(
        args.launcher, jobs=args.jobs, folder=out / "slurm", slurm_partition=args.slurm_partition,
        slurm_time_min=args.slurm_time, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
        mem_gb=args.mem_gb, array_parallelism=args.array_parallelism, executor=args.slurm_executor,
    )  # fmt: skip


def predict(task: Task, rest: list[str]) -> int:
    from samadapt.engine.predict import predict_run

    parser = _parser("predict", task)
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (holds config.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output (a folder, or a file for volumes)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the encoder checkpoint, if it moved")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    task.add_predict_arguments(parser)
    args = parser.parse_args(rest)
    path = predict_run(task, args.run, args=args, progress=not args.no_progress)
    print(f"predictions: {path}")
    return 0


def export(task: Task, rest: list[str]) -> int:
    from samadapt.engine.export import export as run_export

    return run_export(task, rest)


COMMANDS = {"train": train, "sweep": sweep, "predict": predict, "export": export}


def dispatch(command: str, task_name: str, rest: list[str], *, source: Path | None = None) -> int:
    return int(COMMANDS[command](get_task(task_name, source=source), rest) or 0)
