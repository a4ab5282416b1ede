"""Dataset-ordered views of stored embeddings: what a task trains on, read from memory-mapped shards."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.store.manifest import Location
from samadapt.store.shards import ShardCache, decode, shard_itemsize

READ_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class EmbeddingArray:
    """A read-only [N, ...] float32 array whose rows live in shard files, loaded only when indexed.

    `array[i]` -> np.ndarray [...]; `array[[i, j]]` or `array[a:b]` -> np.ndarray [B, ...];
    `array.tensor(idx)` -> torch.Tensor; `np.asarray(array)` materialises all rows.
    Shards may hold float32, float16 or bfloat16 rows; reads are float32, or float16 with
    `array.astype(np.float16)` (half the memory; float16 shards are then copied without conversion).
    `array.stored_nbytes` is what the rows take on disk. Picklable (memory maps are reopened in the receiving
    process, e.g. a DataLoader worker).
    """

    def __init__(
        self,
        root: Path,
        locations: Sequence[Location],
        *,
        cache: ShardCache | None = None,
        dtype: Any = np.float32,
    ) -> None:
        if not locations:
            raise ValueError("an EmbeddingArray needs at least one row")
        row_shapes = {loc.shape for loc in locations}
        if len(row_shapes) != 1:
            raise ValueError(f"rows of different shapes cannot form one array: {sorted(row_shapes)}")
        self.root = Path(root)
        self.shards = [loc.shard for loc in locations]
        self.rows = np.array([loc.row for loc in locations], dtype=np.int64)
        self.shape: tuple[int, ...] = (len(locations), *row_shapes.pop())
        self.dtype = np.dtype(dtype)
        if self.dtype not in READ_DTYPES:
            raise ValueError(f"an EmbeddingArray reads as float32 or float16, not {self.dtype}")
        self._cache = cache or ShardCache(self.root)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"EmbeddingArray(shape={self.shape}, dtype={self.dtype.name}, root={str(self.root)!r})"

    def astype(self, dtype: Any) -> EmbeddingArray:
        """The same rows read as `dtype` (float32 or float16); no data is read here."""
        out = copy.copy(self)
        out.dtype = np.dtype(dtype)
        if out.dtype not in READ_DTYPES:
            raise ValueError(f"an EmbeddingArray reads as float32 or float16, not {out.dtype}")
        return out

    @property
    def stored_nbytes(self) -> int:
        """Bytes the rows take in their shard files (headers excluded)."""
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        return sum(row * shard_itemsize(shard) for shard in self.shards)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} rows")
            shard = self._cache.get(self.shards[i], row_shape=self.shape[1:], rows=int(self.rows[i]) + 1)
            return decode(shard[self.rows[i]], self.dtype)
        indices = (
            np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        )
        indices = np.where(indices < 0, indices + len(self), indices)
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        # One fancy-index read per shard touched, instead of one per row.
        by_shard: dict[str, list[int]] = {}
        for position, i in enumerate(indices.tolist()):
            by_shard.setdefault(self.shards[i], []).append(position)
        for shard, positions in by_shard.items():
            rows = self.rows[indices[positions]]
            stored = self._cache.get(shard, row_shape=self.shape[1:], rows=int(rows.max()) + 1)[rows]
            out[positions] = decode(stored, self.dtype) if stored.dtype == np.uint16 else stored
        return out

    def tensor(self, index: int | slice | Sequence[int] | np.ndarray = slice(None)) -> torch.Tensor:
        return torch.from_numpy(self[index])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)


@dataclass
class EmbeddingTable:
    """What `embed_dataset` returns: one `EmbeddingArray` per output ("neck", layers) in dataset order."""

    ids: list[str]
    arrays: dict[str, EmbeddingArray]
    keys: dict[str, list[str]] = field(repr=False)
    computed: int = 0  # images embedded by this call (all ranks)
    reused: int = 0  # images already in the store
    seconds: float = 0.0  # wall time of the call
    encoder_seconds: float = 0.0  # time inside the encoder (this rank)

    def __getitem__(self, output: str) -> EmbeddingArray:
        if output not in self.arrays:
            raise KeyError(f"output {output!r} was not embedded; available: {', '.join(self.arrays)}")
        return self.arrays[output]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def outputs(self) -> list[str]:
        return list(self.arrays)

    @property
    def bytes_per_image(self) -> float:
        """Mean bytes one image's entries (every output) take in the shard files."""
        return sum(a.stored_nbytes for a in self.arrays.values()) / max(1, len(self.ids))
