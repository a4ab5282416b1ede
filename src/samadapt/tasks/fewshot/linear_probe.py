"""Linear probe on frozen, normalised CLIP features (the CLIP paper's protocol), through the shared probe
(`samadapt.evaluation.linear_probe`); the fitted probe becomes a `LinearHead`, so prediction runs through the same
model as every other few-shot method."""

from __future__ import annotations

import numpy as np

from samadapt.evaluation.linear_probe import C_GRID, as_linear_layer
from samadapt.evaluation.linear_probe import fit_linear_probe as fit_probe
from samadapt.tasks.fewshot.heads import LinearHead


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    c_grid: tuple[float, ...] = C_GRID,
    monitor: str = "accuracy",
) -> tuple[LinearHead, dict[str, float]]:
    """Returns the head and {"C": chosen, "val_<metric>": its validation score}."""
    weights, history, c = fit_probe(x_train=train_x, y_train=train_y, x_val=val_x, y_val=val_y,
                                    num_classes=num_classes, monitor=monitor, seed=seed, c_grid=c_grid)  # fmt: skip
    chosen = next((h for h in history if h["C"] == c), {})
    weight, bias = as_linear_layer(weights)
    return LinearHead(weight, bias), {"C": c, f"val_{monitor}": chosen.get(f"val_{monitor}", float("nan"))}
