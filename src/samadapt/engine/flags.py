"""CLI flags derived from a task's config model: one vocabulary for `train`, `sweep` and every task.

Every field of the model is a `--kebab-case` flag (its help is the field's description, its choices the `Literal`
values). Flags are parsed as text and validated by the model, so a flag and the same key in a YAML file obey one rule.
Defaults are `argparse.SUPPRESS`: the namespace holds exactly the flags given on the command line, which is how they
beat the `--config` file even when their value equals the default. In `sweep`, fields with a `sweep_flag` are axes
(`--methods a,b --budgets 0.1,1 --seeds 3`) and `--grid KEY=V1,V2` adds an axis over any other field.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from samadapt.engine.config import RunConfig, field_meta, is_bool, literal_choices
from samadapt.errors import ConfigError

SINGLE = "__single"  # dest suffix of an axis given with its train spelling (one value)


class DeprecatedFlag(argparse.Action):
    """An old spelling that still works, with a warning that names the new flag."""

    def __init__(self, option_strings: list[str], dest: str, *, canonical: str, **kwargs: Any) -> None:
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        warnings.warn(f"{option_string} is deprecated; use {self.canonical}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def flag_of(model: type[RunConfig], name: str, *, sweep: bool = False) -> str:
    info = field_meta(model, name)
    if sweep and info.get("sweep_flag"):
        return str(info["sweep_flag"])
    return str(info.get("flag") or "--" + name.replace("_", "-"))


def add_config_flags(parser: argparse.ArgumentParser, model: type[RunConfig], *, sweep: bool = False) -> None:
    """One flag per field of `model`; in a sweep, axis fields take comma lists under their sweep flag."""
    group = parser.add_argument_group(f"{model.task} settings")
    for name, field in model.model_fields.items():
        info = field_meta(model, name)
        if not info.get("cli", True):
            continue
        axis = sweep and bool(info.get("sweep_flag"))
        canonical = flag_of(model, name, sweep=axis)
        names = [canonical, *(info.get("sweep_aliases", []) if axis else info.get("aliases", []))]
        if axis:  # the train spelling of an axis (`--seed 3`, `--method m`) is a one-value axis in a sweep
            singles = [
                s for s in dict.fromkeys([flag_of(model, name), *info.get("aliases", [])]) if s not in names
            ]
            group.add_argument(
                *singles, dest=name + SINGLE, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        names = list(dict.fromkeys(names))
        help_text = field.description or ""
        choices = literal_choices(field.annotation)
        if choices and not axis:
            help_text += f" ({'|'.join(str(c) for c in choices if c is not None)})"
        default_note = "" if field.default in (None, "") else f" (default {field.default})"
        if is_bool(field.annotation) and not axis:  # `--x`, `--x off` (on/off/true/false) and `--no-x`
            group.add_argument(*names, dest=name, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="on|off", help=help_text + default_note)  # fmt: skip
            negative = ["--no-" + n.removeprefix("--") for n in names]
            group.add_argument(*negative, dest=name, action="store_const", const="false", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)  # fmt: skip
        else:
            metavar = "V1,V2" if axis else None
            group.add_argument(*names, dest=name, default=argparse.SUPPRESS, help=help_text + default_note,
                               metavar=metavar)  # fmt: skip
        for old in info.get("sweep_deprecated", []) if axis else []:
            parser.add_argument(old, dest=name, action=DeprecatedFlag, canonical=canonical,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
        for old in info.get("deprecated", []):
            kwargs: dict[str, Any] = {"nargs": 0} if is_bool(field.annotation) else {}
            parser.add_argument(old, dest=name, action=DeprecatedFlag, canonical=canonical,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)  # fmt: skip
    if sweep:
        group.add_argument(
            "--grid", action="append", default=argparse.SUPPRESS, metavar="KEY=V1,V2",
            help="an extra sweep axis over any setting, e.g. --grid slca_window=2,4 (repeatable)",
        )  # fmt: skip


def given_settings(model: type[RunConfig], args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (the namespace holds nothing else for them)."""
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    for name, value in list(values.items()):
        if is_bool(model.model_fields[name].annotation) and value == []:  # a deprecated on/off flag (nargs=0)
            values[name] = "true"
    return values


def axis_fields(model: type[RunConfig]) -> list[str]:
    return [name for name in model.model_fields if field_meta(model, name).get("sweep_flag")]


def parse_grid(model: type[RunConfig], items: list[str] | None) -> dict[str, list[str]]:
    """`--grid key=v1,v2` -> {key: [v1, v2]} (values validated later by the model)."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2 (e.g. slca_window=2,4)")
        if key not in model.model_fields:
            raise ConfigError(f"--grid {item!r}: unknown {model.task} setting {key!r}")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid
