"""The `linear-probe` baseline: logistic regression (scikit-learn) on globally pooled SAM features.

The regularisation strength C is chosen on the validation split. The fitted model is saved as safetensors
(scaler mean/scale, coefficients, intercept), and `probe_probabilities` reproduces `predict_proba` from them.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from samadapt.evaluation.classification import classification_metrics
from samadapt.training.early_stopping import EarlyStopping

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def fit_linear_probe(
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    monitor: str = "auc",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], float]:
    """Fit one probe per C, keep the best by the validation `monitor`; return (weights, history per C, best C)."""
    scaler = StandardScaler().fit(x_train)
    xt = scaler.transform(x_train)
    stopper = EarlyStopping(monitor=monitor, mode="min" if monitor == "loss" else "max", patience=len(C_GRID))
    history, best, best_c = [], None, C_GRID[0]
    for i, c in enumerate(C_GRID):
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        clf.fit(xt, y_train)
        weights = _weights(scaler, clf, num_classes)
        val = classification_metrics(y_true=y_val, probs=probe_probabilities(weights, x_val))
        history.append({"C": c, **{f"val_{k}": v for k, v in val.items()}})
        if stopper.step(i, val):
            best, best_c = weights, c
    return best, history, best_c


def probe_probabilities(weights: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """[N, D] features -> [N, classes] probabilities (softmax, or sigmoid of the single binary logit)."""
    x = (np.asarray(x, dtype=np.float64) - weights["mean"].double().numpy()) / weights[
        "scale"
    ].double().numpy()
    logits = x @ weights["coef"].double().numpy().T + weights["intercept"].double().numpy()
    if logits.shape[1] == 1:  # scikit-learn's binary model: one logit for the positive class
        p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        return np.stack([1 - p, p], axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _weights(scaler: StandardScaler, clf: LogisticRegression, num_classes: int) -> dict[str, torch.Tensor]:
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) != num_classes and coef.shape[0] != 1:
        # a class absent from a tiny training subset: give it a very low logit
        full_c = np.zeros((num_classes, coef.shape[1]))
        full_i = np.full(num_classes, -1e4)
        full_c[clf.classes_], full_i[clf.classes_] = coef, intercept
        coef, intercept = full_c, full_i
    return {
        "mean": torch.from_numpy(scaler.mean_.astype(np.float64)),
        "scale": torch.from_numpy(scaler.scale_.astype(np.float64)),
        "coef": torch.from_numpy(np.asarray(coef, dtype=np.float64)),
        "intercept": torch.from_numpy(np.asarray(intercept, dtype=np.float64)),
    }
