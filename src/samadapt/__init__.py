"""samadapt: adapt Segment Anything family encoders to medical image classification and segmentation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder", "open_store", "read_dataset", "list_encoders"]

if TYPE_CHECKING:  # pragma: no cover
    from samadapt.data.readers import read_dataset
    from samadapt.encoders import list_encoders, load_encoder
    from samadapt.store import open_store


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import samadapt` and `samadapt --help` fast (torch is heavy).
    if name in ("load_encoder", "list_encoders"):
        from samadapt import encoders

        return getattr(encoders, name)
    if name == "open_store":
        from samadapt.store import open_store

        return open_store
    if name == "read_dataset":
        from samadapt.data.readers import read_dataset

        return read_dataset
    raise AttributeError(f"module 'samadapt' has no attribute {name!r}")
