"""Task-neutral training parts: the loop (`fit`), early stopping, DDP helpers, safetensors weights.

Tasks build their model, loss and validation and hand them to `fit`; nothing here knows a task.
"""

from samadapt.training.distributed import (
    DistContext,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
    wrap_model,
)
from samadapt.training.early_stopping import EarlyStopping
from samadapt.training.loop import FitResult, collect_outputs, fit
from samadapt.training.seed import seed_everything
from samadapt.training.weights import load_weights, save_weights

__all__ = [
    "DistContext",
    "EarlyStopping",
    "FitResult",
    "cleanup_distributed",
    "collect_outputs",
    "fit",
    "init_distributed",
    "load_weights",
    "save_weights",
    "seed_everything",
    "unwrap_model",
    "wrap_model",
]
