"""Linear probe: scikit-learn logistic regression on frozen, normalised CLIP features (CLIP paper's protocol).

The inverse regularisation C is chosen on the validation set over a log grid (ties keep the stronger
regularisation); the fitted weights become a `LinearHead`, so prediction runs through the same model as the rest.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from samadapt.tasks.fewshot.heads import LinearHead

C_GRID = tuple(10.0**k for k in range(-2, 5))


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    c_grid: tuple[float, ...] = C_GRID,
) -> tuple[LinearHead, dict[str, float]]:
    """Returns the head and {"C": chosen, "val_accuracy": its accuracy}."""
    best: tuple[float, float, LogisticRegression | None] = (-1.0, 0.0, None)
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(train_x, train_y)
        acc = float((clf.predict(val_x) == val_y).mean()) if len(val_y) else 0.0
        if acc > best[0] + 1e-12:
            best = (acc, c, clf)
    acc, c, clf = best
    assert clf is not None
    weight = np.zeros((num_classes, train_x.shape[1]), np.float32)
    bias = np.zeros(num_classes, np.float32)
    if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:
        # binary: softmax([0, z]) = sigmoid(z), the probability scikit-learn gives the second class
        weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    # classes absent from the training subset can never win
    bias[np.setdiff1d(np.arange(num_classes), clf.classes_)] = -1e4
    head = LinearHead(torch.from_numpy(weight), torch.from_numpy(bias))
    return head, {"C": c, "val_accuracy": acc}
