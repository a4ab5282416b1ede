"""Seeding for reproducible CPU runs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = True) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator for data order (keeps shuffles independent of models)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (libraries we call use the legacy global generator)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
