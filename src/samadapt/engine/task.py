"""The Task contract: what classify, segment and fewshot (and any new task) implement for the engine.

The engine owns everything around a task: reading and validating settings, the run folder's lifecycle (a temporary
folder renamed into place when complete, per-epoch resume state), seeds, the common run files (`config.yaml`,
`metrics.json`, `predictions.csv`, `model.safetensors`, `report.html`), sweeps and their tables and plots, and the
predict path. A task says how its data become features, how a method is fitted and evaluated, and how a trained run
predicts on new inputs. A new task is one module with a `Task` subclass and its `RunConfig` subclass, registered in
`samadapt.engine.registry.TASKS` (see docs/ARCHITECTURE.md, "Adding a task").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from samadapt.engine.config import RunConfig

if TYPE_CHECKING:
    import torch


@dataclass
class RunContext:
    """Where a run is being written and how it executes (given to `Task.fit`)."""

    dir: Path  # the temporary run folder (renamed to the final one when complete)
    resume: bool = False
    progress: bool = True
    dist: Any = None  # samadapt.training.DistContext under torchrun, else None

    @property
    def resume_dir(self) -> Path:
        return self.dir / ".resume"

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main


@dataclass
class Fitted:
    """What `Task.fit` returns: the trained model's weights (saved as model.safetensors) and what else it learned."""

    weights: dict[str, torch.Tensor]
    model: Any = None  # the live model, for evaluate (not saved)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # goes into metrics.json (epochs_run, probe_C, ...)


@dataclass
class Evaluation:
    """What `Task.evaluate` returns: metrics.json's `val` and `test` blocks plus task facts, and per-item rows."""

    metrics: dict[str, Any]  # {"val": {...}, "test": {...}, "n_train": N, ...}
    predictions: list[dict[str, Any]]  # predictions.csv rows (per image, or per volume)
    payload: Any = None  # anything `write_outputs` needs (probabilities, predicted volumes, ...)


@dataclass
class Output:
    """A figure or table the task wrote into the run folder, for report.html."""

    caption: str
    path: Path | None = None
    rows: list[dict[str, Any]] | None = None


class Task:
    """Base class of a task. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    Config: ClassVar[type[RunConfig]]
    methods: ClassVar[tuple[str, ...]]
    budget_field: ClassVar[str]  # the config field that is a sweep's label budget
    headline_metrics: ClassVar[tuple[str, ...]]  # test metrics plotted against the budget
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    sweep_defaults: ClassVar[dict[str, Any]] = {}  # axis field -> default values of `samadapt sweep`
    supports_ddp: ClassVar[bool] = False  # trains under torchrun with DistributedDataParallel

    # ---- training ---------------------------------------------------------------------------------------------
    prepare_fields: ClassVar[tuple[str, ...]] = ("data",)

    def prepare_key(self, cfg: RunConfig) -> str:
        """Runs whose configs agree on `prepare_fields` share one `prepare` result (a sweep prepares once)."""
        return repr([(name, getattr(cfg, name)) for name in self.prepare_fields])

    def prepare(self, cfg: RunConfig, *, progress: bool) -> Any:
        """Read the data and fill the caches (embedding store, masks) that every run of a sweep shares."""
        raise NotImplementedError

    def fit(self, cfg: RunConfig, prepared: Any, run: RunContext) -> Fitted:
        """Train `cfg.method` (per-epoch resume state in `run.resume_dir`)."""
        raise NotImplementedError

    def evaluate(self, cfg: RunConfig, prepared: Any, fitted: Fitted) -> Evaluation:
        raise NotImplementedError

    def write_outputs(
        self, cfg: RunConfig, prepared: Any, fitted: Fitted, evaluation: Evaluation, run_dir: Path
    ) -> list[Output]:
        """The task's own files beside the common ones (plots, overlays, per-structure tables); for report.html."""
        return []

    def recorded(self, cfg: RunConfig, prepared: Any) -> dict[str, Any]:
        """Facts config.yaml keeps for predict (class names, the checkpoint sha256, label names, ...)."""
        return {}

    def protocol(self, cfg: RunConfig) -> list[dict[str, str]]:
        """The protocol card: settings that differ from the method's reference, and why."""
        return []

    def describe(self, cfg: RunConfig, evaluation: Evaluation) -> list[str]:
        """Notes at the top of the run's report.html."""
        return []

    def budget_value(self, metrics: dict[str, Any], cfg: RunConfig) -> Any:
        return getattr(cfg, self.budget_field)

    def sweep_skip(self, cfg: RunConfig) -> str | None:
        """A reason to leave this grid point out of a sweep (e.g. more training volumes than the split has)."""
        return None

    # ---- prediction -------------------------------------------------------------------------------------------
    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific predict flags (the engine adds --run, --out, --checkpoint, --device, --no-progress)."""

    def predict(
        self, cfg: RunConfig, recorded: dict[str, Any], *, run: Path, args: argparse.Namespace, progress: bool
    ) -> Path:
        """Predict with the trained run on the inputs named in `args`; return the main output file."""
        raise NotImplementedError

    def checkpoints(
        self, cfg: RunConfig, recorded: dict[str, Any]
    ) -> list[tuple[str, str | None, str | None]]:
        """(what, path in the config, sha256 recorded at training) of every model file predict loads."""
        return []

    # ---- export ---------------------------------------------------------------------------------------------
    def export_encoder(self, cfg: RunConfig, recorded: dict[str, Any], *, checkpoint: str | None) -> Any:
        """The run's frozen encoder in fp32 for `samadapt export`, or None when the task has none."""
        return None

    def export_models(
        self, cfg: RunConfig, recorded: dict[str, Any], *, run: Path, checkpoints: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """(ExportItems, glue): the task models to export and how their inputs are made from the encoder's."""
        raise NotImplementedError(f"samadapt export is not available for --task {self.name}")
