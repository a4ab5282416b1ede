"""`open_store(DIR)`: the content-addressed embedding store (shard files + SQLite manifest)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.errors import DataError
from samadapt.store.keys import (
    canonical_fields,
    config_digest,
    entry_key,
    fields_of,
    image_digest,
    readable_configs,
    store_fields,
)
from samadapt.store.manifest import MANIFEST_NAME, Entry, Location, Manifest
from samadapt.store.shards import (
    DEFAULT_STORE_DTYPE,
    JOURNAL_DIR,
    SHARD_DIR,
    ShardCache,
    ShardWriter,
    check_store_dtype,
    decode,
    read_journal,
    shard_looks_complete,
)
from samadapt.store.table import EmbeddingArray


def open_store(path: str | os.PathLike[str], *, create: bool = True) -> EmbeddingStore:
    """Open (and by default create) the embedding store in directory `path`."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: expected an embedding store directory, found a file")
    if not create and not (root / MANIFEST_NAME).exists():
        raise DataError(f"{root}: not an embedding store (no {MANIFEST_NAME})")
    root.mkdir(parents=True, exist_ok=True)
    return EmbeddingStore(root)


class EmbeddingStore:
    """Embeddings keyed by (image content, encoder settings, output). Safe for concurrent readers and writers.

    `len(store)`, `key in store`, `store[key] -> np.ndarray`; `store.key(image, encoder, output)`;
    `store.put(images, encoder, outputs)`; `store.get_by_id(dataset_id, encoder)`; `store.view(encoder)`.
    `encoder` is an `Encoder` or its `cache_key_fields()` dict. `store_dtype` ("float16" by default, "bfloat16",
    "float32") is how new entries are written and which entries a lookup accepts: the requested dtype, or
    float32 (a float32 request never gets lighter data). Every read returns float32.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = Manifest(self.root)
        self._cache = ShardCache(self.root)
        self._writer: ShardWriter | None = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self._cache.clear()
        self.manifest.close()

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r}, entries={len(self)})"

    # ---- mapping interface --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.manifest.locate([key]))

    def __iter__(self) -> Iterator[str]:
        return self.manifest.keys()

    def keys(self) -> Iterator[str]:
        return self.manifest.keys()

    def __getitem__(self, key: str) -> np.ndarray:
        location = self.manifest.locate([key]).get(key)
        if location is None:
            raise KeyError(key)
        shard = self._cache.get(location.shard, row_shape=location.shape, rows=location.row + 1)
        return decode(shard[location.row])

    def tensor(self, key: str) -> torch.Tensor:
        return torch.from_numpy(self[key])

    # ---- content addressing -------------------------------------------------------------------------------
    @staticmethod
    def key(
        image: np.ndarray | str, encoder: Any, output: str = "neck", *, store_dtype: str | None = None
    ) -> str:
        """Key of `image` (an array, or its `image_digest`) under `encoder`'s settings and output name, for an
        entry written as `store_dtype`."""
        digest = image if isinstance(image, str) else image_digest(image)
        fields = fields_of(encoder)
        return entry_key(
            digest, config_digest(store_fields(fields, store_dtype_of(fields, store_dtype))), output
        )

    def get(
        self, image: np.ndarray | str, encoder: Any, output: str = "neck", *, store_dtype: str | None = None
    ) -> np.ndarray | None:
        """The stored float32 value for `image`, or None; entries of `store_dtype` or float32 answer."""
        digest = image if isinstance(image, str) else image_digest(image)
        found = self.find([digest], encoder, output, store_dtype=store_dtype)
        return self[found[digest]] if digest in found else None

    def find(
        self, digests: Sequence[str], encoder: Any, output: str = "neck", *, store_dtype: str | None = None
    ) -> dict[str, str]:
        """{image digest: key of the entry that answers it} for the digests stored in an acceptable dtype
        (the requested one preferred, then float32)."""
        return {d: key for d, (key, _) in self.find_locations(digests, encoder, output, store_dtype).items()}

    def find_locations(
        self, digests: Sequence[str], encoder: Any, output: str, store_dtype: str | None = None
    ) -> dict[str, tuple[str, Location]]:
        """`find` with each entry's location: {digest: (key, Location)}."""
        fields = fields_of(encoder)
        configs = [c for c, _ in readable_configs(fields, store_dtype_of(fields, store_dtype))]
        candidates = {(d, c): entry_key(d, c, output) for c in configs for d in digests}
        located = self.manifest.locate(list(candidates.values()))
        found: dict[str, tuple[str, Location]] = {}
        for (digest, _config), key in candidates.items():  # configs in preference order
            if digest not in found and key in located:
                found[digest] = (key, located[key])
        return found

    def locate(self, keys: Sequence[str]) -> dict[str, Location]:
        return self.manifest.locate(keys)

    def array(self, keys: Sequence[str]) -> EmbeddingArray:
        """Memory-mapped [len(keys), ...] array of stored entries, in the given order."""
        found = self.manifest.locate(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            raise KeyError(f"{len(missing)} of {len(keys)} keys are not in {self.root}, e.g. {missing[0]}")
        return EmbeddingArray(self.root, [found[k] for k in keys], cache=self._cache)

    # ---- lookups by the id a data reader gave -------------------------------------------------------------
    def view(
        self,
        encoder: Any,
        output: str = "neck",
        *,
        source: str | os.PathLike[str] | None = None,
        store_dtype: str | None = None,
    ) -> StoreView:
        """Lookups by dataset id for one encoder setting and output; `source` (the dataset's path) scopes ids."""
        return StoreView(self, fields_of(encoder), output, source=source, store_dtype=store_dtype)

    def get_by_id(
        self,
        dataset_id: str,
        encoder: Any,
        output: str = "neck",
        *,
        source: str | os.PathLike[str] | None = None,
        store_dtype: str | None = None,
    ) -> np.ndarray:
        return self.view(encoder, output, source=source, store_dtype=store_dtype)[dataset_id]

    def configs(self) -> dict[str, dict[str, Any]]:
        """Every encoder setting the store holds entries for, by config digest."""
        return self.manifest.configs()

    def prune(self, grace_seconds: float = 86400.0) -> int:
        """Delete shard and temporary files no entry or journal refers to, once older than `grace_seconds`.

        Such files are what killed writers leave behind. The grace period protects files a live writer has
        written but not yet recorded. Returns the number of files deleted.
        """
        referenced = set(self.manifest.shards())
        for journal in (self.root / JOURNAL_DIR).glob("*.jsonl"):
            referenced.update(r["shard"] for r in read_journal(journal)[0] if r.get("kind") == "entry")
        cutoff = time.time() - grace_seconds
        deleted = 0
        for path in (self.root / SHARD_DIR).rglob("*"):
            relpath = path.relative_to(self.root).as_posix()
            if path.is_file() and relpath not in referenced and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                deleted += 1
        return deleted

    def verify(self, keys: Sequence[str] | None = None) -> tuple[list[str], int]:
        """Forget the entries whose shard file is missing or cut short, so the next embed recomputes them.

        Checks the shards of `keys` (default: every entry) with one `stat` each, not one read per row: a shard
        that exists at full size but was overwritten is reported, naming the file, when it is read. Returns
        (the broken shards, relative to the store root, and the number of entries dropped).
        """
        if keys is None:
            return self._drop_broken(self.manifest.shard_extents())
        return self.verify_locations(self.manifest.locate(keys).values())

    def verify_locations(self, locations: Iterable[Location]) -> tuple[list[str], int]:
        """`verify` for entries already located (saves a second manifest lookup)."""
        extents: dict[str, tuple[int, tuple[int, ...]]] = {}
        for location in locations:
            rows, _ = extents.get(location.shard, (0, location.shape))
            extents[location.shard] = (max(rows, location.row + 1), location.shape)
        return self._drop_broken(extents)

    def _drop_broken(self, extents: Mapping[str, tuple[int, tuple[int, ...]]]) -> tuple[list[str], int]:
        broken = sorted(
            shard
            for shard, (rows, shape) in extents.items()
            if not shard_looks_complete(self.root / shard, rows, shape)
        )
        if not broken:
            return [], 0
        self._cache.clear()
        return broken, self.manifest.drop_shards(broken)

    # ---- writes -------------------------------------------------------------------------------------------
    def put(
        self,
        images: Sequence[np.ndarray | str],
        encoder: Any,
        outputs: Mapping[str, np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
        *,
        ids: Sequence[str | None] | None = None,
        source: str | os.PathLike[str] | None = None,
        store_dtype: str | None = None,
    ) -> dict[str, list[str]]:
        """Store one batch: `outputs[name]` is [len(images), ...], written as `store_dtype` (default float16).
        Returns the keys per output name.

        The shard files are complete on disk before the manifest commit that makes them visible, so a crash
        loses at most this batch. An existing key keeps its first value (equal settings give equal vectors).
        """
        if not isinstance(outputs, Mapping):
            outputs = {"neck": outputs}
        digests = [d if isinstance(d, str) else image_digest(d) for d in images]
        raw = fields_of(encoder)
        dtype = store_dtype_of(raw, store_dtype)
        fields = store_fields(raw, dtype)
        config = config_digest(fields)
        writer = self._writer = self._writer or ShardWriter(self.root)
        entries, keys = [], {}
        for output, value in outputs.items():
            array = (
                value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            )
            if array.shape[0] != len(digests):
                raise ValueError(f"output {output!r} has {array.shape[0]} rows for {len(digests)} images")
            keys[output] = [entry_key(d, config, output) for d in digests]
            present = self.manifest.locate(keys[output])
            rows = [r for r, k in enumerate(keys[output]) if k not in present and k not in keys[output][:r]]
            if not rows:  # all stored already: write nothing
                continue
            shard = writer.write(config, output, array[rows], dtype)
            entries += [
                Entry(keys[output][r], digests[r], config, output, shard, i, tuple(array.shape[1:]))
                for i, r in enumerate(rows)
            ]
        links = [(source_name(source), i, d) for i, d in zip(ids or (), digests) if i is not None]
        self.manifest.add(entries, {config: canonical_fields(fields)}, links)
        return keys


class StoreView:
    """The entries of one encoder setting and output, looked up by dataset id (`ImageDataset.ids[i]`).

    An id resolves to the image content it had when it was last embedded; re-embed after editing a file.
    Entries stored as `store_dtype` (default float16) answer, or float32 ones.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        fields: dict[str, Any],
        output: str,
        *,
        source: str | os.PathLike[str] | None,
        store_dtype: str | None = None,
    ) -> None:
        self.store = store
        self.source = None if source is None else source_name(source)
        self.store_dtype = store_dtype_of(fields, store_dtype)
        self.fields = {k: v for k, v in fields.items() if k != "store_dtype"}
        self.output = output
        # config digests whose entries answer, preferred first; `config` is the one entries are written under
        self.configs = [c for c, _ in readable_configs(self.fields, self.store_dtype)]
        self.config = self.configs[0]

    def keys_of(self, dataset_ids: Sequence[str]) -> list[str | None]:
        """The key that answers each id (None: never embedded, or not in an acceptable dtype)."""
        images = self.store.manifest.images_of(dataset_ids, self.source)
        found = self.store.find(
            sorted(set(images.values())), self.fields, self.output, store_dtype=self.store_dtype
        )
        return [found.get(images[i]) if i in images else None for i in dataset_ids]

    def __contains__(self, dataset_id: object) -> bool:
        if not isinstance(dataset_id, str):
            return False
        return self.keys_of([dataset_id])[0] is not None

    def __getitem__(self, dataset_id: str) -> np.ndarray:
        key = self.keys_of([dataset_id])[0]
        if key is None:
            raise KeyError(
                f"{dataset_id!r} has no {self.output!r} embedding ({self.store_dtype} or float32) for encoder "
                f"{self.fields} in {self.store.root}"
            )
        return self.store[key]

    def array(self, dataset_ids: Sequence[str]) -> EmbeddingArray:
        keys = self.keys_of(dataset_ids)
        unknown = [i for i, k in zip(dataset_ids, keys) if k is None]
        if unknown:
            raise KeyError(
                f"{len(unknown)} ids have no {self.output!r} embedding ({self.store_dtype} or float32) in "
                f"{self.store.root}, e.g. {unknown[0]!r}"
            )
        return self.store.array(keys)  # type: ignore[arg-type]


def store_dtype_of(fields: dict[str, Any], store_dtype: str | None) -> str:
    """The store dtype asked for: the argument, else the one named in `fields` (as `configs()` lists them),
    else the default (float16)."""
    chosen = store_dtype or fields.get("store_dtype") or DEFAULT_STORE_DTYPE
    return check_store_dtype(str(chosen))


def source_name(source: str | os.PathLike[str] | None) -> str:
    """How a dataset source is recorded next to its ids: the absolute path, or "" when unknown."""
    return "" if source is None or str(source) == "" else str(Path(source).resolve())
