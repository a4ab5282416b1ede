"""Early stopping on a validation metric, with the validation loss as tie-breaker."""

from __future__ import annotations

import math


class EarlyStopping:
    """Track the best epoch by `monitor` (e.g. "auc", "loss"); stop after `patience` epochs without improvement.

    Ties on the monitored metric (common with accuracy on small validation sets) are broken by the lower
    validation "loss" when the metrics hold one. A NaN metric (e.g. AUC with a class absent) counts as worst.
    """

    def __init__(self, *, monitor: str = "auc", mode: str = "max", patience: int = 10) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.best_score: tuple[float, float] | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def _score(self, metrics: dict[str, float]) -> tuple[float, float]:
        value = float(metrics.get(self.monitor, float("nan")))
        loss = float(metrics.get("loss", float("nan")))
        primary = value if self.mode == "max" else -value
        secondary = -loss if self.monitor != "loss" else 0.0
        return (
            -math.inf if math.isnan(primary) else primary,
            -math.inf if math.isnan(secondary) else secondary,
        )

    def step(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record one epoch's validation metrics; return True when this epoch is the new best."""
        score = self._score(metrics)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience
