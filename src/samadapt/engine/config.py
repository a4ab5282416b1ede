"""Typed run configurations as data: one pydantic model per task, defaults stated once.

A task's `RunConfig` subclass lists every setting of one run. From the model alone the engine derives:
- the CLI flags (`flags.add_config_flags`: one `--kebab-case` flag per field, choices from `Literal` types, aliases
  and deprecated spellings from the field's metadata);
- the resume fingerprint (`fingerprint`: every field not marked `run_only`, i.e. not where it runs or reports);
- the run's `config.yaml` (`dump_config` / `load_run_config`: the same model reads it back at predict and resume time).

Settings come from four layers, later ones winning: the model's defaults < a `--preset` < a `--config` YAML file <
flags given on the command line. A bad value is one `ConfigError` that names the key and where it came from
(the file, or the command-line flag).
"""

from __future__ import annotations

import math
import os
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from samadapt.errors import ConfigError
from samadapt.utils.atomic import atomic_write_text

CONFIG_FILE = "config.yaml"


def meta(
    description: str = "",
    *,
    run_only: bool = False,
    aliases: tuple[str, ...] = (),
    deprecated: tuple[str, ...] = (),
    flag: str | None = None,
    sweep_flag: str | None = None,
    sweep_aliases: tuple[str, ...] = (),
    sweep_deprecated: tuple[str, ...] = (),
    cli: bool = True,
) -> dict[str, Any]:
    """Field metadata the engine reads (pass as `json_schema_extra`).

    run_only: where or how a run executes (out, device, progress), not what it computes: left out of the fingerprint.
    aliases: other accepted spellings of the flag; deprecated: accepted with a warning naming the canonical flag.
    flag / sweep_flag: the flag's name in `train` / `sweep` when it is not `--field-name`; a field with a sweep flag
    is a sweep axis (`--methods a,b`), `sweep_aliases` other spellings of that flag.
    cli: False for settings that only YAML files and the Python API set.
    """
    return {
        "description": description,
        "run_only": run_only,
        "aliases": list(aliases),
        "deprecated": list(deprecated),
        "flag": flag,
        "sweep_flag": sweep_flag,
        "sweep_aliases": list(sweep_aliases),
        "sweep_deprecated": list(sweep_deprecated),
        "cli": cli,
    }


def setting(default: Any, description: str = "", **kwargs: Any) -> Any:
    """A config field: its default, a one-line description (the flag's help) and engine metadata (see `meta`)."""
    return Field(default, description=description, json_schema_extra=meta(description, **kwargs))


class RunConfig(BaseModel):
    """Settings every task shares. Subclasses add their own and set `task`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    task: ClassVar[str] = ""

    data: str | None = setting(None, "the dataset (folder, file or manifest)")
    method: str = setting("", "the method to train", sweep_flag="--methods")
    seed: int = setting(
        0, "training seed (initialisation, training subset, data order)", sweep_flag="--seeds"
    )
    preset: str | None = setting(None, "named settings of a reference protocol (e.g. reference, fast)")
    out: str | None = setting(
        None, "output folder (RUN for train, the sweep folder for sweep)", run_only=True
    )
    device: str | None = setting(None, "cpu, cuda or auto (default: cuda when available)", run_only=True)
    progress: bool = setting(True, "progress bars", run_only=True, cli=False)
    track: Literal["none", "mlflow", "tensorboard"] = setting(
        "none", "experiment tracking: mlflow (a local store under the output folder unless --track-uri) or "
        "tensorboard", run_only=True,
    )  # fmt: skip
    track_uri: str | None = setting(None, "MLflow tracking URI, or TensorBoard's log folder", run_only=True)
    experiment: str | None = setting(
        None, "tracking experiment name (default samadapt-<task>)", run_only=True
    )
    track_parent: str | None = setting(
        None, "MLflow run to nest under (set by sweeps)", run_only=True, cli=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _comma_lists(cls, value: Any, info: Any) -> Any:
        """`a,b,c` from a flag becomes a list for list-typed fields; paths become strings."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and _list_item_type(annotation) is not None:
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    def check(self) -> None:
        """Cross-field checks a subclass adds (raise ValueError/ConfigError); called by `build_config`."""

    # ---- derived views ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: every field except the run-only ones."""
        return {k: v for k, v in self.to_dict().items() if not field_meta(type(self), k).get("run_only")}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (a ConfigError names the field on a bad value)."""
        return build_config(type(self), [("the Python API", {**self.to_dict(), **changes})])


def field_meta(model: type[BaseModel], name: str) -> dict[str, Any]:
    extra = model.model_fields[name].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _list_item_type(annotation: Any) -> Any | None:
    inner = _strip_optional(annotation)
    if get_origin(inner) in (list, tuple):
        args = get_args(inner)
        return args[0] if args else str
    return None


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    inner = _strip_optional(annotation)
    return get_args(inner) if get_origin(inner) is Literal else None


def is_bool(annotation: Any) -> bool:
    return _strip_optional(annotation) is bool


# ---- building a config from its layers -------------------------------------------------------------------------
Layer = tuple[str, Mapping[str, Any]]  # (where the values came from, values)


def build_config(model: type[RunConfig], layers: list[Layer]) -> RunConfig:
    """Merge the layers (later wins) and validate once; a bad value names its key and its source."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for where, values in layers:
        for key, value in values.items():
            key = canonical_key(model, str(key).replace("-", "_"), where=where)
            if key == "task":
                continue
            if key not in model.model_fields:
                known = ", ".join(sorted(model.model_fields))
                raise ConfigError(
                    f"{where}: unknown {model.task or 'config'} setting {key!r}; known: {known}"
                )
            merged[key] = value
            source[key] = where
    try:
        cfg = model.model_validate(merged)
        cfg.check()
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else "?"
        where = source.get(key, "the defaults")
        value = merged.get(key, "(default)")
        raise ConfigError(
            f"{where}: {_name(key, where)} = {value!r}: {error['msg'].removeprefix('Value error, ')}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{model.task} settings: {exc}") from None
    return cfg


def canonical_key(model: type[RunConfig], key: str, *, where: str) -> str:
    """A deprecated spelling of a setting (e.g. `image_size` for `encoder_image_size`) maps to the field, with a
    warning that names the new one."""
    if key in model.model_fields:
        return key
    for name in model.model_fields:
        old = [d.lstrip("-").replace("-", "_") for d in field_meta(model, name).get("deprecated", [])]
        if key in old:
            warnings.warn(f"{where}: {key!r} is deprecated; use {name!r}", FutureWarning, stacklevel=3)
            return name
    return key


def _name(key: str, where: str) -> str:
    return f"--{key.replace('_', '-')}" if where.startswith("command line") else f"key {key!r}"


def read_yaml_mapping(path: str | os.PathLike[str], *, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one); any problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ---- the run's config.yaml -------------------------------------------------------------------------------------
def dump_config(
    path: str | os.PathLike[str], cfg: RunConfig, *, recorded: Mapping[str, Any] | None = None
) -> Path:
    """RUN/config.yaml: `task`, every setting (the model's own serialisation), and `recorded`: what the run found
    out and predict needs (class names, the encoder checkpoint's sha256, ...)."""
    from samadapt import __version__

    data = {
        "task": cfg.task,
        **cfg.to_dict(),
        "samadapt_version": __version__,
        "recorded": _plain(recorded or {}),
    }
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def load_run_config(run: str | os.PathLike[str], model: type[RunConfig]) -> tuple[RunConfig, dict[str, Any]]:
    """Read RUN/config.yaml back through the task's model: (config, recorded). Errors name the file."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run}: not a run folder written by `samadapt train` (no {CONFIG_FILE})")
    data = read_yaml_mapping(path, what="run config")
    if data.get("task") != model.task:
        raise ConfigError(f"{path}: task is {data.get('task')!r}, expected {model.task!r}")
    recorded = data.pop("recorded", None) or {}
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path}: key 'recorded' must be a mapping, found {type(recorded).__name__}")
    data.pop("samadapt_version", None)
    # dump_config writes every setting: a missing one would silently become its default at predict time
    missing = [k for k in model.model_fields if k not in data and not field_meta(model, k).get("run_only")]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(map(repr, missing))}")
    cfg = build_config(model, [(str(path), data)])
    return cfg, recorded


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def bounded(*names: str, low: float | None = None, high: float | None = None, strict: bool = False) -> Any:
    """A range check for config fields (`_positive = bounded("epochs", "batch_size", low=1)` in a class body):
    values below `low` (or equal to it with `strict`) or above `high` are refused with the bound in the message."""

    def check(cls: type, value: Any) -> Any:
        if value is None:
            return value
        if low is not None and (value <= low if strict else value < low):
            raise ValueError(f"must be {'>' if strict else '>='} {low:g}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high:g}")
        return value

    return field_validator(*names)(classmethod(check))


Precision = Literal["auto", "fp32", "bf16"]


class EncoderRunConfig(RunConfig):
    """Settings of tasks that read a frozen SAM-family encoder's embeddings from the store (classify, segment)."""

    encoder: str = setting(
        "sam_vit_b", "encoder name (sam_vit_b, medsam_vit_b, sam2_hiera_t, ...; see samadapt info)"
    )
    checkpoint: str | None = setting(None, "the encoder's official checkpoint file (default: RANDOM weights)")
    encoder_arch: Literal["default", "tiny"] | None = setting(
        None, "tiny: the registry's tiny random-weight configuration (tests, demo)", aliases=("--arch",)
    )
    encoder_image_size: int | None = setting(None, "encoder input size S (default: the encoder's own, 1024)")
    precision: Precision = setting(
        "auto", "encoder precision; auto: bf16 where this CPU/GPU runs it natively and faster, else fp32 (the resolved "
        "value is recorded in config.yaml and the store key)"
    )  # fmt: skip
    store: str | None = setting(
        None, "embedding store directory (default $SAMADAPT_STORE, else OUT/embeddings)", run_only=True
    )
    embed_batch_size: int = setting(4, "images per encoder call", run_only=True)

    _positive = bounded("encoder_image_size", "embed_batch_size", low=1)

    def store_dir(self) -> Path:
        """The embedding store: --store, else $SAMADAPT_STORE, else OUT/embeddings."""
        if self.store:
            return Path(self.store)
        if os.environ.get("SAMADAPT_STORE"):
            return Path(os.environ["SAMADAPT_STORE"])
        return Path(self.out or ".") / "embeddings"

    def load_encoder(self, device: str | None = None, *, precision: str | None = None) -> Any:
        """The encoder these settings name; `precision` "auto" is resolved here (and said once), or pass the one a
        trained run recorded."""
        import logging

        from samadapt.encoders import load_encoder
        from samadapt.encoders.precision import decide_precision

        device = device or self.device or "auto"
        chosen = precision or self.precision
        if chosen == "auto":
            decision = decide_precision("auto", None if device == "auto" else device)
            logging.getLogger(__name__).info("precision auto -> %s (%s)", decision.precision, decision.reason)
            chosen = decision.precision
        return load_encoder(
            self.encoder,
            self.checkpoint,
            precision=chosen,
            image_size=self.encoder_image_size,
            arch=None if self.encoder_arch == "default" else self.encoder_arch,
            device=device,
        )
