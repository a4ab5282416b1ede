"""`samadapt` entry point: subcommands dispatch to the encoders, the store and the task packages.

User mistakes (`SamadaptError`) print one line and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from samadapt import __version__
from samadapt.engine.registry import TASKS
from samadapt.errors import ConfigError, SamadaptError

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(message: object) -> str:
    """An error message as one terminal line: library texts (torch, pydicom) can span lines or carry colours."""
    text = _ANSI_ESCAPE.sub("", str(message))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `samadapt: warning: ...` lines, without the source line Python echoes (it reads as a crash)."""
    print(f"samadapt: warning: {one_line(message)}", file=file or sys.stderr)


def _error(message: object) -> int:
    print(f"samadapt: error: {one_line(message)}", file=sys.stderr)
    return 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt",
        description="Adapt SAM / MedSAM / SAM 2 encoders to medical image classification and segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"samadapt {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, threads, bf16 support, encoders and their preprocessing")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    _common(info)

    embed = sub.add_parser("embed", help="embed a dataset with a frozen encoder into the embedding store")
    from samadapt.cli import embed as embed_cli

    embed_cli.add_arguments(embed)
    _common(embed)

    for command, helptext in (
        ("train", "train a task model (--task classify|segment|fewshot)"),
        ("sweep", "run a sweep over methods x budgets x seeds (--task, or a YAML config with `task:`)"),
        ("predict", "predict with a trained run (--run RUN) on new images or volumes"),
        ("export", "export a trained run (--run RUN) to ONNX / TorchScript / torch.export"),
    ):
        p = sub.add_parser(command, help=helptext, add_help=False)
        p.add_argument("-h", "--help", action="store_true")
        _common(p)

    demo = sub.add_parser("demo", help="run the demo on generated data (no downloads)")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    demo.add_argument("--quick", action="store_true", help="smaller, faster demo (for tests)")
    demo.add_argument("--encoder", default="sam_vit_b", help="encoder name (default sam_vit_b)")
    demo.add_argument(
        "--checkpoint", type=Path, default=None, help="real checkpoint; default: tiny random weights"
    )
    _common(demo)
    return parser


def _dispatch_task_command(command: str, rest: list[str], debug: bool) -> int:
    """train/sweep/predict: find the task (--task, the --config file's `task:`, or the run's config.yaml), then the
    engine parses the task's flags from its config model."""
    from samadapt.engine.config import read_yaml_mapping

    pre = argparse.ArgumentParser(prog=f"samadapt {command}", add_help=False)
    pre.add_argument("--task", choices=list(TASKS))
    pre.add_argument("--config", type=Path)
    pre.add_argument("--run", type=Path)
    known, _ = pre.parse_known_args(rest)
    task, source = known.task, None
    if task is None and known.config is not None and command != "predict":
        value = read_yaml_mapping(known.config).get("task")
        task, source = (str(value) if value is not None else None), known.config
    if task is None and known.run is not None and command in ("predict", "export"):
        path = known.run / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"{known.run}: not a run folder written by `samadapt train` (no config.yaml)")
        value = read_yaml_mapping(path, what="run config").get("task")
        task, source = (str(value) if value is not None else None), path
        if task is None and "-h" not in rest and "--help" not in rest:
            raise ConfigError(f"{path}: no `task:` key (not a run samadapt wrote?)")
    wants_help = "-h" in rest or "--help" in rest
    if task is None:
        if wants_help:
            print(f"usage: samadapt {command} --task {{{','.join(TASKS)}}} ... --help for the task's flags")
            return 0
        where = {
            "train": "--task",
            "sweep": "--task (or --config CFG with a `task:` key)",
            "predict": "--run RUN",
        }
        raise ConfigError(f"samadapt {command}: say which task with {where[command]}")
    from samadapt.engine.cli import dispatch

    if debug and "--debug" not in rest:
        rest = [*rest, "--debug"]
    return dispatch(command, task, rest, source=source)


def main(argv: Sequence[str] | None = None) -> int:
    own_process = argv is None  # the console script; in-process callers (tests) keep their warning handlers
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if own_process and not debug:
        warnings.showwarning = _show_warning
    logging.basicConfig(
        level=logging.DEBUG if ("-v" in argv or "--verbose" in argv) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        parser = _build_parser()
        command = next((a for a in argv if not a.startswith("-")), None)
        if command in ("train", "sweep", "predict", "export"):
            rest = argv[argv.index(command) + 1 :]
            return _dispatch_task_command(command, rest, debug)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "info":
            from samadapt.cli.info import run as run_info

            return run_info(args)
        if args.command == "embed":
            from samadapt.cli import embed as embed_cli

            return int(embed_cli.run(args) or 0)
        if args.command == "demo":
            from samadapt.cli.demo import run as run_demo

            return run_demo(args)
        parser.error(f"unknown command {args.command}")
    except SamadaptError as exc:
        if debug:
            raise
        return _error(exc)
    except FloatingPointError as exc:
        # training.loop.fit: a NaN/Inf loss (bad inputs or weights, too high a learning rate)
        if debug:
            raise
        return _error(
            f"training diverged: {exc}; look for NaN/Inf in the data or weights, or lower --lr "
            "(--debug shows where)"
        )
    except KeyboardInterrupt:
        print("samadapt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `samadapt info | head`: the reader left, not an error
        sys.stdout = None  # type: ignore[assignment]
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
