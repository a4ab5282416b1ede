"""Shard files: one `.npy` array [B, ...] per written batch and output, published atomically.

The stored dtype is in the file name, so a `stat` can check a shard's size and a reader knows what it holds:
`*.npy` float32 (every store written before store dtypes existed), `*.f16.npy` IEEE float16 (the default: half
the bytes; SAM-family outputs are far inside its range, relative rounding error <= 2^-11), `*.bf16.npy`
bfloat16 bit patterns saved as uint16 (numpy has no bfloat16; `(bits.astype(np.uint32) << 16).view(np.float32)`
decodes them; float32's range, rounding error <= 2^-8). A float16 batch holding a finite value beyond float16's
range (65504) is written as float32 instead, so nothing is ever clipped to infinity. Readers get float32.
Any reader (numpy, torch, other languages) can memory-map a shard with no library; rows of a batch are
contiguous, so a row read touches only its own pages.
A shard is written to a temporary name, fsynced and renamed; the manifest row that points at it is
written only afterwards, so a crash leaves at worst an unreferenced file, never a reference to half a file.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import os
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.errors import ConfigError, DataError
from samadapt.utils.atomic import atomic_path

SHARD_DIR = "shards"
JOURNAL_DIR = "journal"
_NPY_MAGIC = b"\x93NUMPY"
STORE_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_STORE_DTYPE = "float16"
FLOAT16_MAX = float(np.finfo(np.float16).max)
# store dtype -> (file suffix, numpy dtype of the file's array)
_FILE_FORMATS: dict[str, tuple[str, np.dtype]] = {
    "float32": (".npy", np.dtype("<f4")),
    "float16": (".f16.npy", np.dtype("<f2")),
    "bfloat16": (".bf16.npy", np.dtype("<u2")),
}


def check_store_dtype(store_dtype: str) -> str:
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"unknown store dtype {store_dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
    return store_dtype


def shard_dtype(relpath: str) -> str:
    """The store dtype a shard file holds, from its name."""
    for name in ("float16", "bfloat16"):
        if relpath.endswith(_FILE_FORMATS[name][0]):
            return name
    return "float32"


def shard_itemsize(relpath: str) -> int:
    return _FILE_FORMATS[shard_dtype(relpath)][1].itemsize


def encode(array: np.ndarray, store_dtype: str) -> np.ndarray:
    """float32 values -> the file's array for `store_dtype` (float16, or bfloat16 bits rounded to nearest even)."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    if store_dtype == "float16":
        return values.astype(np.float16)
    if store_dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values


def decode(stored: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A shard's rows (float32, float16 or bfloat16 bits) as a new array of `dtype` (float32 or float16)."""
    if stored.dtype == np.uint16:  # bfloat16 bits: the upper half of a float32
        values = (np.asarray(stored).astype(np.uint32) << 16).view(np.float32)
        return values if np.dtype(dtype) == np.float32 else values.astype(dtype)
    return np.array(stored, dtype=dtype)


def new_writer_id() -> str:
    return uuid.uuid4().hex[:16]


def write_shard(root: Path, relpath: str, array: np.ndarray) -> None:
    """Write `array` (float32 values) as `.npy` at `root/relpath` in the dtype its name says, atomically."""
    target = root / relpath
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, encode(array, shard_dtype(relpath)), allow_pickle=False)


def damaged_shard(root: Path, relpath: str, detail: str) -> DataError:
    """The one-line error for a shard file that is gone or unreadable, with the ways to recover."""
    return DataError(
        f"{Path(root) / relpath}: damaged embedding store shard ({detail}); delete this file and rerun "
        f"`samadapt embed` with the same settings to recompute its entries, or delete the store folder {root} "
        "(the store is a cache)"
    )


def open_shard(root: Path, relpath: str) -> np.ndarray:
    """Memory-map one shard file: its stored array [B, ...] (float32, float16 or bfloat16 bits as uint16, as
    its name says); DataError naming the file when it is not one."""
    path = Path(root) / relpath
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
        if magic != _NPY_MAGIC:  # np.load would call it "pickled data", which misleads
            raise damaged_shard(root, relpath, f"not an .npy file: starts with {magic[:6]!r}")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise damaged_shard(root, relpath, "the file is missing") from None
    except (OSError, ValueError, EOFError) as error:  # cut short, overwritten, not an .npy file at all
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise damaged_shard(root, relpath, f"truncated or corrupt: {text}") from None
    expected = _FILE_FORMATS[shard_dtype(relpath)][1]
    if not isinstance(array, np.ndarray) or array.dtype != expected or array.ndim < 1:
        kind = (
            f"dtype {array.dtype}, shape {array.shape}" if isinstance(array, np.ndarray) else "not one array"
        )
        raise damaged_shard(root, relpath, f"expected a {expected.name} array, found {kind}")
    return array


def shard_looks_complete(path: Path, rows: int, row_shape: tuple[int, ...]) -> bool:
    """One `stat`: the file exists and is big enough for `rows` rows of `row_shape` (plus a header).

    Cheap enough for every shard of a dataset; it catches deleted and truncated shards, not overwritten ones
    (those are caught, naming the file, when they are read).
    """
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return size >= _npy_size(rows, tuple(row_shape), _FILE_FORMATS[shard_dtype(path.name)][1].str)


@functools.lru_cache(maxsize=1024)
def _npy_size(rows: int, row_shape: tuple[int, ...], descr: str = "<f4") -> int:
    """Bytes `np.save` writes for a [rows, *row_shape] array of `descr` (a shard with more rows is larger)."""
    header = io.BytesIO()
    shape = (rows, *row_shape)
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return len(header.getvalue()) + np.dtype(descr).itemsize * int(np.prod(shape, dtype=np.int64))


class ShardCache:
    """Open read-only memory maps of shard files, the most recently used `capacity` of them.

    Bounded because each memory map holds a file descriptor and a store can have many thousands of shards.
    """

    def __init__(self, root: Path, capacity: int = 128) -> None:
        self.root = Path(root)
        self.capacity = capacity
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, relpath: str, *, row_shape: tuple[int, ...] | None = None, rows: int = 0) -> np.ndarray:
        """The shard's [B, ...] array; DataError naming the file when it is missing or damaged.

        `row_shape` and `rows` (how many rows the caller will index, at least) are what the manifest says the
        shard holds; a file that disagrees was overwritten or cut short.
        """
        array = self._maps.get(relpath)
        if array is None:
            array = open_shard(self.root, relpath)
            self._maps[relpath] = array
            if len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(relpath)
        if (row_shape is not None and tuple(array.shape[1:]) != tuple(row_shape)) or array.shape[0] < rows:
            raise damaged_shard(
                self.root,
                relpath,
                f"holds an array of shape {tuple(array.shape)}, the manifest expects "
                f"at least {rows} rows of shape {tuple(row_shape or array.shape[1:])}",
            )
        return array

    def clear(self) -> None:
        self._maps.clear()

    # Memory maps do not pickle; a copy sent to a DataLoader worker reopens what it needs.
    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.capacity = state["capacity"]
        self._maps = OrderedDict()


class Journal:
    """Append-only record of the shards one distributed rank wrote, for rank 0 to add to the manifest.

    Ranks never write the SQLite manifest themselves: SQLite's WAL mode is unsafe on network filesystems
    shared by several machines, and one writer per run keeps the manifest on a single host. Each line is one
    complete JSON record written with one `write` and fsynced, so a killed rank leaves only whole lines (plus
    at most one torn last line, which readers skip). The writer holds an exclusive `flock` while it is alive,
    so rank 0 (or a later run) can tell a finished or dead writer's journal from a live one.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.path = Path(root) / JOURNAL_DIR / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def append(self, records: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode()
        os.write(self._fd, data)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def read_journal(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Return (complete records, whether the writer is gone). A torn last line is ignored."""
    # O_RDWR: on NFS flock is emulated with POSIX locks, and an exclusive one needs a writable descriptor.
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finished = True
        except OSError:  # held by a live writer (or locks unsupported: then keep the file to be safe)
            finished = False
        data = path.read_bytes()
    finally:
        os.close(fd)  # also releases the lock
    records = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # torn last line of a killed writer
            continue
    return records, finished


class ShardWriter:
    """Names and writes the shard files of one writer process:
    `shards/<config>/<writer>-<seq>-<output>{.npy,.f16.npy,.bf16.npy}`.

    Names are unique per writer, so concurrent writers (processes, ranks, machines) never touch one file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.writer_id = new_writer_id()
        self._seq = 0

    def write(self, config: str, output: str, array: np.ndarray, store_dtype: str = "float32") -> str:
        """Write one batch (float32 values) in `store_dtype`; returns the shard's path relative to the root."""
        check_store_dtype(store_dtype)
        if store_dtype == "float16":
            finite = np.abs(array[np.isfinite(array)]) if array.size else array
            if finite.size and float(finite.max()) > FLOAT16_MAX:
                warnings.warn(
                    f"{output!r}: values up to {float(finite.max()):.4g} exceed float16's range; "
                    "this batch is stored as float32",
                    UserWarning,
                    stacklevel=2,
                )
                store_dtype = "float32"
        # No dots: the suffix alone names the dtype (an output called "x.f16" must not look like float16).
        safe_output = "".join(c if c.isalnum() or c in "_-" else "_" for c in output)
        suffix = _FILE_FORMATS[store_dtype][0]
        relpath = f"{SHARD_DIR}/{config[:16]}/{self.writer_id}-{self._seq:06d}-{safe_output}{suffix}"
        self._seq += 1
        write_shard(self.root, relpath, array)
        return relpath
