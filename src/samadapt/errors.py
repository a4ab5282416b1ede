"""User-facing errors. The CLI prints them as one line (no traceback unless --debug)."""

from __future__ import annotations


class SamadaptError(Exception):
    """An error caused by the user's input (file, flag, checkpoint), with a message that names it."""


class CheckpointError(SamadaptError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or holding another architecture."""


class DataError(SamadaptError):
    """A dataset, image or label file that cannot be read or is inconsistent."""


class ConfigError(SamadaptError):
    """A flag or configuration value that is invalid."""
