"""Run configuration: YAML files whose keys are the CLI flag names (dashes or underscores), and config.yaml in RUN.

A flag given on the command line wins over the same key in `--config FILE`; the file wins over the flag's default.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import yaml

from samadapt.errors import ConfigError
from samadapt.utils.atomic import atomic_write_text


def read_yaml_mapping(path: str | os.PathLike[str], *, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one); any problem is a ConfigError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def load_yaml_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; keys are normalised to argparse destinations (`label-fraction` -> `label_fraction`)."""
    data = read_yaml_mapping(path)
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def read_run_config(
    run: str | os.PathLike[str], *, task: str, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """RUN/config.yaml of a `samadapt train` run of `task`, with the keys `predict` cannot guess present."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run}: not a run folder written by `samadapt train` (no config.yaml)")
    data = read_yaml_mapping(path, what="run config")
    if data.get("task") != task:
        raise ConfigError(f"{path}: task is {data.get('task')!r}, expected {task!r}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ConfigError(
            f"{path}: missing key(s) {', '.join(missing)}; this file is written by `samadapt train` "
            "(train the run again, or restore its config.yaml)"
        )
    return data


def require(
    flag: str,
    value: float,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
) -> None:
    """A flag's value is a finite number in its range, or one ConfigError naming the flag (NaN fails every
    bound). Values argparse lets through but torch would reject deep inside a run (Adam with lr nan, batch 0)."""
    ok = (
        math.isfinite(value)
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        bounds = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
                  f"<= {at_most:g}" if at_most is not None else ""]  # fmt: skip
        raise ConfigError(
            f"{flag} must be a finite number {' and '.join(b for b in bounds if b)}, got {value}"
        )


# Namespace attribute listing the destinations given on the command line (set by `mark_explicit`).
EXPLICIT_ATTR = "_explicit_flags"


def parse_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, config_key: str = "config"
) -> argparse.Namespace:
    """Parse `argv`, letting a YAML file named by `--config` supply values for flags not given on the line."""
    args = parser.parse_args(argv)
    mark_explicit(parser, args, argv)
    return merge_config(parser, args, config_key=config_key)


def mark_explicit(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> None:
    """Record on `args` which flags `argv` gave, so that `--lr 0.1` beats a config file even when 0.1 is the
    default. Parses `argv` again with every default suppressed: what comes back was on the command line."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    setattr(args, EXPLICIT_ATTR, frozenset(vars(given)))


def merge_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, config_key: str = "config"
) -> argparse.Namespace:
    """Fill `args` from the YAML file in `args.<config_key>` for every flag not given on the command line
    (known when `mark_explicit` ran; otherwise: every flag still at its default).

    Unknown keys raise ConfigError (a typo in a config should not be silently ignored); `task` is allowed.
    """
    path = getattr(args, config_key, None)
    if not path:
        return args
    config = load_yaml_config(path)
    known = {action.dest: action for action in parser._actions}  # argparse keeps no public list
    explicit = getattr(args, EXPLICIT_ATTR, None)
    for key, value in config.items():
        if key == "task":
            continue
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(k for k in known if k != 'help'))}"
            )
        action = known[key]
        if (key not in explicit) if explicit is not None else (getattr(args, key) == action.default):
            setattr(args, key, _typed_value(path, key, value, action))
    return args


def _typed_value(path: Any, key: str, value: Any, action: argparse.Action) -> Any:
    """Convert a YAML value with the flag's type; refuse what the flag could never hold (a mapping, a list for a
    single value, null for a flag that always has a value) instead of passing it on to fail later."""
    if action.type is None:
        return value
    if value is None:
        if action.default is not None:
            raise ConfigError(f"{path}: key {key!r}: expected a value, found null")
        return None
    if isinstance(value, dict):
        raise ConfigError(f"{path}: key {key!r}: expected a single value, found a mapping")
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        # list-valued flags parse "a,b,c" (e.g. --heads, --seeds); any other flag takes one value
        if any(isinstance(v, dict | list) for v in value):
            raise ConfigError(f"{path}: key {key!r}: expected a list of plain values, found nested ones")
        try:
            converted = action.type(",".join(str(v) for v in value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            converted = None
        if not isinstance(converted, list | tuple):
            raise ConfigError(f"{path}: key {key!r}: expected a single value, found a list of {len(value)}")
        return converted
    return _convert(path, key, value, action)


def _convert(path: Any, key: str, value: Any, action: argparse.Action) -> Any:
    try:
        return action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{path}: key {key!r}: {exc}") from exc


def save_run_config(path: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Write config.yaml atomically (paths as strings, keys in the given order)."""
    clean = {key: _plain(value) for key, value in config.items()}
    atomic_write_text(path, yaml.safe_dump(clean, sort_keys=False))
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
