"""Classification metrics (scikit-learn), the keys every classification-like task writes to metrics.json."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score


def classification_metrics(*, y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc (binary: positive class; multi-class: macro one-vs-rest), f1_macro, loss.

    `probs` is [N, C] class probabilities. AUC is NaN (written as null) when a class is absent from y_true.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    out: dict[str, float] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(_quiet(balanced_accuracy_score, y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "loss": float(log_loss(y_true, _renormalised(probs), labels=labels)),
    }
    try:
        if n_classes == 2:
            out["auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            out["auc"] = float(
                roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)
            )
    except ValueError:  # a class missing from this split: AUC undefined
        out["auc"] = float("nan")
    return out


def _renormalised(probs: np.ndarray) -> np.ndarray:
    # float32 softmax rows sum to 1 only within ~1e-7; scikit-learn warns about that, so clip and rescale
    clipped = np.clip(probs, 1e-12, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)
