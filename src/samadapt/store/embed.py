"""`embed_dataset`: fill the store for every image of a dataset (skipping hits) and return its table.

Two passes. First every image is decoded and hashed (cheap next to the encoder), so the work left is known
exactly, duplicates inside the dataset are embedded once, and under torch.distributed the misses are split
evenly between ranks. Then the misses are embedded batch by batch; each batch is written and committed on
its own, so a killed run loses at most the batch in flight and a rerun resumes where it stopped.

In one process the manifest is updated after every batch (other processes see the entries at once).
Under torch.distributed only rank 0 touches the SQLite manifest: the other ranks write shard files and a
journal; after all ranks are done rank 0 adds the journals to the manifest and sends everyone the locations.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from samadapt.errors import DataError
from samadapt.store.distributed import all_gather, broadcast, rank_and_world
from samadapt.store.keys import (
    canonical_fields,
    entry_key,
    fields_of,
    image_digest,
    output_names,
    readable_configs,
)
from samadapt.store.manifest import Entry, Location
from samadapt.store.shards import Journal, ShardWriter
from samadapt.store.store import EmbeddingStore, open_store, source_name, store_dtype_of
from samadapt.store.table import EmbeddingArray, EmbeddingTable


class ImageSource(Protocol):
    """What `embed_dataset` needs from a dataset (`samadapt.data.readers.ImageDataset` has it)."""

    def __len__(self) -> int: ...
    def image(self, index: int) -> np.ndarray: ...


def embed_dataset(
    dataset: ImageSource | Sequence[np.ndarray],
    encoder: Any,
    store_dir: str | os.PathLike[str],
    *,
    layers: Sequence[int | str] | None = None,
    batch_size: int = 1,
    progress: bool = True,
    store_dtype: str | None = None,
) -> EmbeddingTable:
    """Embed every image of `dataset` with `encoder` into the store at `store_dir`, reusing what is there.

    Returns an `EmbeddingTable` whose `table["neck"]` (and `table[str(layer)]`) is a memory-mapped
    [N, C, h, w] array in dataset order (float32 reads). Works in one process or under torch.distributed (every
    rank calls it with the same dataset and settings; each embeds its share; all get the full table).
    New entries are written as `store_dtype` ("float16" by default, "bfloat16", "float32"); entries already
    stored in that dtype or in float32 are reused.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    rank, world = rank_and_world()
    root = Path(store_dir)
    n = len(dataset)
    if n == 0:
        raise DataError(f"{_describe(dataset)}: the dataset has no images to embed")
    ids: list[str | None] = [str(i) for i in dataset.ids] if hasattr(dataset, "ids") else [None] * n
    raw_fields = fields_of(encoder)
    dtype = store_dtype_of(raw_fields, store_dtype)
    configs = [c for c, _ in readable_configs(raw_fields, dtype)]  # preferred first: the one written
    config, fields_json = configs[0], canonical_fields(readable_configs(raw_fields, dtype)[0][1])
    outputs = output_names(layers)
    show = progress and rank == 0

    digests = _hash_all(dataset, rank, world, show)
    first_index: dict[str, int] = {}
    for i, digest in enumerate(digests):
        first_index.setdefault(digest, i)

    store = open_store(root) if rank == 0 else None  # only rank 0 touches the SQLite manifest
    try:
        # Rank 0 decides what is missing (per image and output) and tells everyone.
        plan = None
        if store is not None:
            store.manifest.ingest_journals(root)  # entries of an interrupted distributed run
            plan = (_missing(store, list(first_index), configs, outputs), uuid.uuid4().hex[:12])
        todo, run_id = broadcast(plan)
        my_todo = list(todo.items())[rank::world]

        # Embed this rank's misses, one committed batch at a time.
        journal = Journal(root, f"{run_id}-rank{rank:05d}") if world > 1 else None
        try:
            computed, encoder_seconds = _embed_share(
                dataset=dataset, encoder=encoder, todo=my_todo, first_index=first_index, ids=ids,
                writer=ShardWriter(root), store=store if world == 1 else None, journal=journal, configs=configs,
                fields_json=fields_json, layers=layers, batch_size=batch_size, show=show, world=world,
                store_dtype=dtype,
            )  # fmt: skip
        finally:
            if journal is not None:
                journal.close()

        # Everyone is done once the counts are gathered; rank 0 publishes and resolves the locations.
        computed = sum(all_gather(computed))
        located = None  # ranks other than 0 get rank 0's answer from the broadcast below
        if store is not None:
            if world > 1:
                store.manifest.ingest_journals(root)
            source = source_name(getattr(dataset, "source", None))
            links = [(source, i, d) for i, d in zip(ids, digests) if i is not None]
            store.manifest.add([], {config: fields_json}, links)
            located = _locations(store, digests, configs, outputs)
    finally:
        if store is not None:
            store.close()
    keys, locations = broadcast(located)
    return EmbeddingTable(
        ids=ids,
        arrays={o: EmbeddingArray(root, locs) for o, locs in locations.items()},
        keys=keys,
        computed=computed,
        reused=n - computed,
        seconds=time.perf_counter() - start,
        encoder_seconds=encoder_seconds,
    )


def _hash_all(dataset: Any, rank: int, world: int, show: bool) -> list[str]:
    """Content digest of every image; each rank hashes a strided share, then the shares are gathered."""
    share = range(rank, len(dataset), world)
    mine = [
        (i, image_digest(_image(dataset, i)))
        for i in tqdm(share, desc="hashing", disable=not show, leave=False)
    ]
    digests = [""] * len(dataset)
    for part in all_gather(mine):
        for i, digest in part:
            digests[i] = digest
    return digests


def _embed_share(
    *,
    dataset: Any,
    encoder: Any,
    todo: list[tuple[str, list[str]]],
    first_index: dict[str, int],
    ids: list[str | None],
    writer: ShardWriter,
    store: EmbeddingStore | None,
    journal: Journal | None,
    configs: list[str],
    fields_json: str,
    layers: Sequence[int | str] | None,
    batch_size: int,
    show: bool,
    world: int,
    store_dtype: str,
) -> tuple[int, float]:
    """Embed `todo` ({digest: missing outputs} items) batch by batch; record each batch in the manifest
    (one process) or the journal (distributed). Returns (images embedded, seconds inside the encoder)."""
    computed, encoder_seconds = 0, 0.0
    config = configs[0]
    desc = f"embedding ({world} ranks)" if world > 1 else "embedding"
    with tqdm(total=len(todo), desc=desc, disable=not show, unit="img") as bar:
        if journal is not None:
            journal.append([{"kind": "config", "config": config, "fields": fields_json}])
        for begin in range(0, len(todo), batch_size):
            batch = dict(todo[begin : begin + batch_size])
            if store is not None:  # another process may have written some meanwhile
                batch = _missing(store, list(batch), configs, output_names(layers))
            if batch:
                images = [_checked_image(dataset, first_index[d], d, ids) for d in batch]
                tick = time.perf_counter()
                result = encoder.embed(images, layers=list(layers) if layers else None, batch_size=batch_size)
                encoder_seconds += time.perf_counter() - tick
                entries = _write_batch(writer, list(batch.items()), _as_dict(result), config, store_dtype)
                if journal is not None:
                    journal.append([{"kind": "entry", **e._asdict()} for e in entries])
                else:
                    store.manifest.add(entries, {config: fields_json})  # type: ignore[union-attr]
                computed += len(batch)
            bar.update(len(todo[begin : begin + batch_size]))
    return computed, encoder_seconds


def _locations(
    store: EmbeddingStore, digests: list[str], configs: list[str], outputs: list[str]
) -> tuple[dict[str, list[str]], dict[str, list[Location]]]:
    """(keys, locations) per output in dataset order, each from the first of `configs` that holds it."""
    candidates = {(d, o, c): entry_key(d, c, o) for d in set(digests) for o in outputs for c in configs}
    found = store.locate(sorted(set(candidates.values())))
    keys: dict[str, list[str]] = {}
    for output in outputs:
        chosen = []
        for digest in digests:
            key = next(
                (candidates[digest, output, c] for c in configs if candidates[digest, output, c] in found),
                None,
            )
            if key is None:
                raise RuntimeError(f"{store.root}: entry missing after embedding (image {digest}, {output})")
            chosen.append(key)
        keys[output] = chosen
    return keys, {o: [found[k] for k in ks] for o, ks in keys.items()}


def _missing(
    store: EmbeddingStore, digests: list[str], configs: list[str], outputs: list[str]
) -> dict[str, list[str]]:
    """{digest: outputs not yet stored} for the digests that miss at least one output, in input order.

    An output is stored when an entry of any of `configs` (the requested store dtype, or float32) holds it.
    Entries whose shard file was deleted or cut short count as missing (and leave the manifest): a rerun heals
    the store."""
    candidates = {(d, o): [entry_key(d, c, o) for c in configs] for d in digests for o in outputs}
    found = store.locate([k for ks in candidates.values() for k in ks])
    broken, dropped = store.verify_locations(found.values())
    if broken:
        warnings.warn(
            f"{store.root}: {len(broken)} shard file(s) missing or truncated (e.g. {broken[0]}); "
            f"recomputing the {dropped} entries they held",
            UserWarning,
            stacklevel=3,
        )
    lost = set(broken)
    present = {key for key, location in found.items() if location.shard not in lost}
    todo: dict[str, list[str]] = {}
    for (digest, output), keys in candidates.items():
        if not any(key in present for key in keys):
            todo.setdefault(digest, []).append(output)
    return todo


def _write_batch(
    writer: ShardWriter,
    batch: list[tuple[str, list[str]]],
    result: dict[str, torch.Tensor],
    config: str,
    store_dtype: str,
) -> list[Entry]:
    """Write one shard per output holding the rows that were missing; return the manifest entries."""
    entries: list[Entry] = []
    for output in dict.fromkeys(o for _, outs in batch for o in outs):
        if output not in result:
            raise RuntimeError(f"encoder returned outputs {sorted(result)}, expected {output!r}")
        rows = [r for r, (_, outs) in enumerate(batch) if output in outs]
        array = result[output][rows].detach().float().cpu().numpy()
        shard = writer.write(config, output, array, store_dtype)
        for shard_row, r in enumerate(rows):
            digest = batch[r][0]
            key = entry_key(digest, config, output)
            entries.append(Entry(key, digest, config, output, shard, shard_row, tuple(array.shape[1:])))
    return entries


def _as_dict(result: torch.Tensor | dict[Any, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return {"neck": result}
    return {str(name): value for name, value in result.items()}


def _image(dataset: Any, index: int) -> np.ndarray:
    return np.asarray(dataset.image(index) if hasattr(dataset, "image") else dataset[index])


def _checked_image(dataset: Any, index: int, digest: str, ids: list[str | None]) -> np.ndarray:
    image = _image(dataset, index)
    if image_digest(image) != digest:  # the file was replaced between the two passes
        raise DataError(
            f"{ids[index] or f'image {index}'}: image changed while it was being embedded; run again"
        )
    return image


def _describe(dataset: Any) -> str:
    return str(getattr(dataset, "source", None) or getattr(dataset, "root", None) or type(dataset).__name__)
