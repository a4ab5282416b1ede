"""The linear probe both classification tasks use: scikit-learn logistic regression on frozen features.

Features are standardised (scaler fitted on the training features); the inverse regularisation C is chosen on the
validation set over a log grid by the validation `monitor` (ties broken by the lower validation loss, then the
stronger regularisation). The fitted probe is plain tensors (scaler mean/scale, coefficients, intercept for every
class) saved as safetensors; `probe_logits` reproduces scikit-learn's decision function from them, and
`as_linear_layer` folds the scaler in, for a probe that runs inside a torch model.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from samadapt.evaluation.classification import classification_metrics
from samadapt.training.early_stopping import EarlyStopping

C_GRID = tuple(10.0**k for k in range(-3, 5))
ABSENT_CLASS_LOGIT = -1e4  # a class missing from a tiny training subset can never win


def fit_linear_probe(
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    monitor: str = "accuracy",
    seed: int = 0,
    c_grid: tuple[float, ...] = C_GRID,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], float]:
    """Fit one probe per C and keep the best by the validation `monitor`: (weights, history per C, best C).

    Without validation images the middle of the grid is taken (nothing to select on)."""
    scaler = StandardScaler().fit(x_train)
    xt = scaler.transform(x_train)
    stopper = EarlyStopping(monitor=monitor, mode="min" if monitor == "loss" else "max", patience=len(c_grid))
    history: list[dict[str, float]] = []
    best, best_c = None, c_grid[len(c_grid) // 2]
    for i, c in enumerate(c_grid):
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xt, y_train)
        weights = _weights(scaler, clf, num_classes)
        if len(y_val) == 0:
            if c == best_c:
                best = weights
            continue
        val = classification_metrics(y_true=y_val, probs=probe_probabilities(weights, x_val))
        history.append({"C": c, **{f"val_{k}": v for k, v in val.items()}})
        if stopper.step(i, val):
            best, best_c = weights, c
    assert best is not None
    return best, history, best_c


def probe_logits(weights: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """[N, D] features -> [N, classes] logits (float64)."""
    z = (np.asarray(x, dtype=np.float64) - weights["mean"].double().numpy()) / weights[
        "scale"
    ].double().numpy()
    return z @ weights["coef"].double().numpy().T + weights["intercept"].double().numpy()


def probe_probabilities(weights: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """[N, D] features -> [N, classes] probabilities (softmax of the logits)."""
    logits = probe_logits(weights, x)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def as_linear_layer(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with the scaler folded in: x W^T + b equals `probe_logits(weights, x)`."""
    scale = weights["scale"].double()
    w = weights["coef"].double() / scale
    b = weights["intercept"].double() - (weights["coef"].double() * weights["mean"].double() / scale).sum(1)
    return w.float(), b.float()


def _weights(scaler: StandardScaler, clf: LogisticRegression, num_classes: int) -> dict[str, torch.Tensor]:
    """Coefficients for every class: scikit-learn's binary model (one logit z for its second class) becomes the
    logits [0, z] (softmax([0, z]) = sigmoid(z)); classes absent from training get a very low logit."""
    coef = np.zeros((num_classes, clf.coef_.shape[1]))
    intercept = np.full(num_classes, ABSENT_CLASS_LOGIT)
    if clf.coef_.shape[0] == 1 and len(clf.classes_) == 2:
        intercept[clf.classes_] = 0.0
        coef[clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    return {
        "mean": torch.from_numpy(scaler.mean_.astype(np.float64)),
        "scale": torch.from_numpy(scaler.scale_.astype(np.float64)),
        "coef": torch.from_numpy(coef),
        "intercept": torch.from_numpy(intercept),
    }
