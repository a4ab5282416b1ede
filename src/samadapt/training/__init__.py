"""Task-neutral training parts: the loop (`fit`), early stopping, DDP helpers, safetensors weights, run configs.

Tasks build their model, loss and validation and hand them to `fit`; nothing here knows a task.
"""

from samadapt.training.config import load_yaml_config, merge_config, parse_with_config, save_run_config
from samadapt.training.distributed import (
    DistContext,
    barrier,
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
    "barrier",
    "cleanup_distributed",
    "collect_outputs",
    "fit",
    "init_distributed",
    "load_weights",
    "load_yaml_config",
    "merge_config",
    "parse_with_config",
    "save_run_config",
    "save_weights",
    "seed_everything",
    "unwrap_model",
    "wrap_model",
]
