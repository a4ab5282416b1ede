"""The manifest: an SQLite database (WAL mode) mapping entry keys to (shard file, row).

WAL mode gives what the store needs for free on one machine: readers see a consistent snapshot while a
writer commits, several writer processes serialise on a short lock, and a killed writer loses only its
uncommitted transaction. Each written batch is one transaction, committed after its shard file is in place.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from samadapt.errors import DataError
from samadapt.store.shards import JOURNAL_DIR, read_journal

MANIFEST_NAME = "manifest.sqlite"
FORMAT_VERSION = "1"
_CHUNK = 500  # keys per IN (...) query, well under SQLite's variable limit
_BUSY_TIMEOUT_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS configs (config TEXT PRIMARY KEY, fields TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, image TEXT NOT NULL, config TEXT NOT NULL, output TEXT NOT NULL,
    shard TEXT NOT NULL, row INTEGER NOT NULL, shape TEXT NOT NULL
);
-- Reader ids are relative to their dataset, so the dataset source is part of the link.
CREATE TABLE IF NOT EXISTS ids (
    source TEXT NOT NULL, dataset_id TEXT NOT NULL, image TEXT NOT NULL, PRIMARY KEY (source, dataset_id)
);
"""


class Location(NamedTuple):
    shard: str  # path relative to the store root
    row: int
    shape: tuple[int, ...]  # shape of one row


class Entry(NamedTuple):
    key: str
    image: str
    config: str
    output: str
    shard: str
    row: int
    shape: tuple[int, ...]


_F = TypeVar("_F", bound=Callable[..., Any])


def manifest_error(path: Path, error: sqlite3.DatabaseError) -> DataError | None:
    """The one-line error for a manifest SQLite cannot use (None: a lock or a bug, to be raised as it is)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return None
        return DataError(
            f"{path}: cannot use the embedding store manifest ({text}); check the disk and its permissions; "
            f"if the file is damaged, delete the store folder {path.parent} and rerun `samadapt embed` "
            "(the store is a cache: everything in it is recomputed)"
        )
    if type(error) is not sqlite3.DatabaseError:  # IntegrityError, ProgrammingError...: our bug, not the file
        return None
    return DataError(
        f"{path}: damaged embedding store manifest ({text}); delete the store folder {path.parent} and rerun "
        "`samadapt embed` (the store is a cache: everything in it is recomputed)"
    )


def _guarded(method: _F) -> _F:
    """SQLite's errors about the file itself (not a database, malformed, disk I/O) become a DataError."""

    @functools.wraps(method)
    def wrapper(self: Manifest, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as error:
            translated = manifest_error(self.path, error)
            if translated is None:
                raise
            raise translated from error

    return wrapper  # type: ignore[return-value]


class Manifest:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / MANIFEST_NAME
        try:
            self.conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.DatabaseError as error:  # a folder in its place, no permission
            raise (manifest_error(self.path, error) or error) from error
        try:
            self._open()
        except BaseException:
            self.conn.close()
            raise

    @_guarded
    def _open(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
        self.conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: a process kill never loses a commit
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT_VERSION,))
        found = self.conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0]
        if found != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: embedding store format {found}, this samadapt reads {FORMAT_VERSION}"
            )

    @staticmethod
    def _retry(action: Any) -> Any:
        # Switching to WAL takes an exclusive lock that the busy handler does not always wait for.
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                return action()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()

    # ---- writes -------------------------------------------------------------------------------------------
    @_guarded
    def add(
        self, entries: Sequence[Entry], configs: dict[str, str], ids: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Insert entries (first writer of a key wins), their configs, and dataset-id -> image links."""
        with self.transaction():
            self.conn.executemany("INSERT OR IGNORE INTO configs VALUES (?, ?)", configs.items())
            self.conn.executemany(
                "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*e[:6], json.dumps(list(e.shape))) for e in entries],
            )
            # An id always points at the content it had when it was last embedded.
            self.conn.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?)", ids)

    @_guarded
    def ingest_journals(self, root: Path) -> int:
        """Add the records of distributed ranks' journals; delete the journals of writers that are gone."""
        count = 0
        for path in sorted((Path(root) / JOURNAL_DIR).glob("*.jsonl")):
            records, finished = read_journal(path)
            configs = {r["config"]: r["fields"] for r in records if r.get("kind") == "config"}
            entries = [
                Entry(r["key"], r["image"], r["config"], r["output"], r["shard"], r["row"], tuple(r["shape"]))
                for r in records
                if r.get("kind") == "entry"
            ]
            self.add(entries, configs)
            count += len(entries)
            if finished:
                path.unlink(missing_ok=True)
        return count

    # ---- reads --------------------------------------------------------------------------------------------
    @_guarded
    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def keys(self) -> Iterator[str]:
        return iter(self._keys())

    @_guarded
    def _keys(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT key FROM entries ORDER BY key").fetchall()]

    @_guarded
    def locate(self, keys: Sequence[str]) -> dict[str, Location]:
        found: dict[str, Location] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = list(keys[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT key, shard, row, shape FROM entries WHERE key IN ({marks})", chunk
            )
            for key, shard, row, shape in rows.fetchall():
                found[key] = Location(shard, row, tuple(json.loads(shape)))
        return found

    @_guarded
    def shard_extents(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """{shard: (rows its entries need, row shape)} over every entry (one grouped query)."""
        rows = self.conn.execute("SELECT shard, MAX(row), MIN(shape) FROM entries GROUP BY shard").fetchall()
        return {shard: (int(top) + 1, tuple(json.loads(shape))) for shard, top, shape in rows}

    @_guarded
    def drop_shards(self, shards: Sequence[str]) -> int:
        """Delete the entries that point into `shards` (files gone or damaged); returns how many."""
        dropped = 0
        with self.transaction():
            for start in range(0, len(shards), _CHUNK):
                chunk = list(shards[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                dropped += self.conn.execute(f"DELETE FROM entries WHERE shard IN ({marks})", chunk).rowcount
        return dropped

    @_guarded
    def shards(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT DISTINCT shard FROM entries").fetchall()}

    @_guarded
    def keys_with_config(self, configs: Sequence[str]) -> set[str]:
        marks = ",".join("?" * len(configs))
        rows = self.conn.execute(f"SELECT key FROM entries WHERE config IN ({marks})", list(configs))
        return {row[0] for row in rows.fetchall()}

    @_guarded
    def images_of(self, dataset_ids: Sequence[str], source: str | None = None) -> dict[str, str]:
        """Image digest of each known id; without `source`, an id that two datasets use differently is an error."""
        found: dict[str, set[tuple[str, str]]] = {}
        for start in range(0, len(dataset_ids), _CHUNK):
            chunk = list(dataset_ids[start : start + _CHUNK])
            query = f"SELECT dataset_id, source, image FROM ids WHERE dataset_id IN ({','.join('?' * len(chunk))})"
            if source is not None:
                query, chunk = query + " AND source = ?", [*chunk, source]
            for dataset_id, src, image in self.conn.execute(query, chunk).fetchall():
                found.setdefault(dataset_id, set()).add((src, image))
        for dataset_id, links in found.items():
            if len({image for _, image in links}) > 1:
                sources = ", ".join(sorted(src for src, _ in links))
                raise DataError(
                    f"{self.path}: id {dataset_id!r} names different images in {sources}; pass source="
                )
        return {dataset_id: next(iter(links))[1] for dataset_id, links in found.items()}

    @_guarded
    def configs(self) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute("SELECT config, fields FROM configs").fetchall()
        return {config: json.loads(fields) for config, fields in rows}


class _Transaction:
    """`BEGIN IMMEDIATE` takes the write lock up front, so concurrent writers wait instead of deadlocking."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        Manifest._retry(lambda: self.conn.execute("BEGIN IMMEDIATE"))

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
