"""Progress bars and errors: a bar left open when an error is raised would glue the one-line error to its text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def close_bars_on_error() -> Iterator[None]:
    """Close every open tqdm bar before an exception leaves the block, so the error starts on its own line."""
    try:
        yield
    except BaseException:
        for bar in list(getattr(tqdm, "_instances", ())):  # tqdm keeps its live bars in this class-level set
            bar.close()
        raise
