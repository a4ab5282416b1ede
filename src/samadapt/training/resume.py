"""Resume state for `fit`: everything needed to continue a killed training exactly where the last epoch ended.

Layout in RUN/.resume/ (one set per finished epoch, published by the JSON written last):
- `state-E.safetensors`: current and best weights (`model.*`, `best.*`);
- `extra-E.pt`: optimizer and scheduler state dicts and the RNG states (nested python: torch.save, read back with
  `weights_only=True`);
- `state.json`: the epoch, history, early-stopping state, best metrics, the run's fingerprint and the two file names.
Each file is written atomically and `state.json` is replaced last, so a kill at any point leaves the previous
complete set (older sets are deleted only after the new JSON is in place).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from samadapt.errors import CheckpointError, ConfigError
from samadapt.training.early_stopping import EarlyStopping
from samadapt.utils.atomic import atomic_write_json, atomic_write_with

log = logging.getLogger(__name__)
RESUME_DIR = ".resume"
STATE_JSON = "state.json"


@dataclass
class ResumeState:
    """What `fit` needs to continue after `epoch` (the last finished epoch, 0-based)."""

    epoch: int
    history: list[dict[str, float]]
    best_val: dict[str, float]
    stopped: bool
    stopper: dict[str, Any]
    model: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]


def resume_dir(run: str | Path) -> Path:
    return Path(run) / RESUME_DIR


def normalise_fingerprint(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists, paths strings), nested settings as
    dotted keys (`options.lr`), so that a refused resume names the one setting that differs."""
    return _flat(json.loads(json.dumps(fingerprint or {}, default=str)))


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_resume(directory: Path, state: ResumeState, *, fingerprint: dict[str, Any] | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in state.model.items()} | {
        f"best.{k}": v for k, v in state.best_state.items()
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    weights_name, extra_name = f"state-{state.epoch}.safetensors", f"extra-{state.epoch}.pt"
    atomic_write_with(directory / weights_name, lambda tmp: save_file(tensors, str(tmp)))
    extra = {"optimizer": state.optimizer, "scheduler": state.scheduler, "rng": state.rng}
    atomic_write_with(directory / extra_name, lambda tmp: torch.save(extra, tmp))
    atomic_write_json(
        directory / STATE_JSON,
        {
            "epoch": state.epoch,
            "history": state.history,
            "best_val": state.best_val,
            "stopped": state.stopped,
            "stopper": state.stopper,
            "fingerprint": normalise_fingerprint(fingerprint),
            "weights": weights_name,
            "extra": extra_name,
        },
    )
    for old in directory.iterdir():  # only now is the previous set unreferenced
        if old.name not in (STATE_JSON, weights_name, extra_name):
            old.unlink(missing_ok=True)


def load_resume(directory: Path, *, fingerprint: dict[str, Any] | None) -> ResumeState | None:
    """Read the saved state, or None when there is none; a state from another configuration is refused."""
    path = directory / STATE_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        tensors = load_file(str(directory / meta["weights"]))
        extra = torch.load(directory / meta["extra"], weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{directory}: unreadable resume state ({exc}); rerun without --resume"
        ) from exc
    expected = normalise_fingerprint(fingerprint)
    if meta.get("fingerprint") != expected:
        saved = meta.get("fingerprint") or {}
        diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        key = diff[0] if diff else "?"
        raise ConfigError(
            f"{path}: the interrupted run used {key}={saved.get(key)!r}, this command {key}={expected.get(key)!r}; "
            "use the same settings or rerun without --resume"
        )
    return ResumeState(
        epoch=int(meta["epoch"]),
        history=meta["history"],
        best_val=meta["best_val"],
        stopped=bool(meta["stopped"]),
        stopper=meta["stopper"],
        model={k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        best_state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
        optimizer=extra["optimizer"],
        scheduler=extra["scheduler"],
        rng=extra["rng"],
    )


def stopper_state(stopper: EarlyStopping) -> dict[str, Any]:
    score = list(stopper.best_score) if stopper.best_score is not None else None
    return {"best_score": score, "best_epoch": stopper.best_epoch, "bad_epochs": stopper.bad_epochs}


def restore_stopper(stopper: EarlyStopping, state: dict[str, Any]) -> None:
    # JSON keeps -inf as -Infinity, so the tuple compares exactly as before
    stopper.best_score = tuple(state["best_score"]) if state["best_score"] is not None else None
    stopper.best_epoch, stopper.bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])


def rng_state(generators: list[torch.Generator]) -> dict[str, Any]:
    """python, numpy (legacy global), torch and the data-order generators, as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global generator is what we seed)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }


def restore_rng(state: dict[str, Any], generators: list[torch.Generator]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if len(state["generators"]) != len(generators):
        raise ConfigError(
            f"resume state holds {len(state['generators'])} data generators, the run has {len(generators)}"
        )
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)


def _saved_epoch(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / STATE_JSON).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return None
