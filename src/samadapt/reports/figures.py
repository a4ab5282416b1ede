"""Matplotlib figures without pyplot's global state (safe in workers and threads), saved atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from samadapt.utils.atomic import atomic_write_with


def new_figure(*, width: float = 5.0, height: float = 4.0, dpi: int = 110) -> Figure:
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as a PNG at `path` (temp file + rename)."""
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)
