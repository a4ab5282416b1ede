"""The embedding store: content addressing, random access, resumable and concurrent writes (fake encoder)."""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt.errors import DataError
from samadapt.store import EmbeddingStore, embed_dataset, image_digest, open_store
from samadapt.store.shards import Journal, ShardWriter


class FakeEncoder:
    """Deterministic stand-in with the `Encoder` interface: output depends on pixels and every setting."""

    def __init__(self, **overrides: object) -> None:
        self.fields = {
            "encoder": "fake",
            "arch": "tiny",
            "weights": "random-seed-0",
            "preprocessing": "sam",
            "image_size": 32,
            "precision": "fp32",
            "implementation": 1,
            **overrides,
        }
        self.seen = 0

    def cache_key_fields(self) -> dict[str, object]:
        return dict(self.fields)

    def embed(self, images, layers=None, batch_size=1):
        self.seen += len(images)
        neck = torch.stack([_fake_vector(image, self.fields) for image in images])
        if layers is None:
            return neck
        return {"neck": neck, **{str(layer): neck * (int(layer) + 1) for layer in layers}}


def _fake_vector(image: np.ndarray, fields: dict[str, object]) -> torch.Tensor:
    salt = sum(map(ord, repr(sorted(fields.items())))) % 97
    flat = np.resize(image.astype(np.float32), 8 * 3 * 3) + salt
    return torch.from_numpy(flat.reshape(8, 3, 3))


class TinyDataset:
    """The slice of `ImageDataset` that `embed_dataset` uses."""

    def __init__(self, images: list[np.ndarray], source: Path | None = None) -> None:
        self.images = images
        self.ids = [f"img_{i:03d}.png" for i in range(len(images))]
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(12, 10), (9, 9, 3), (16, 8)]
    return [rng.integers(0, 256, size=shapes[i % 3], dtype=np.uint8) for i in range(n)]


def test_image_digest_covers_pixels_shape_and_dtype():
    image = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert image_digest(image) == image_digest(image.copy())
    assert image_digest(image) == image_digest(np.asfortranarray(image))  # memory layout is not content
    assert image_digest(image) != image_digest(image.reshape(6, 4))
    assert image_digest(image) != image_digest(image.astype(np.uint16))
    changed = image.copy()
    changed[2, 3] += 1
    assert image_digest(image) != image_digest(changed)


def test_put_and_random_access(tmp_path):
    images = _images(5)
    encoder = FakeEncoder()
    with open_store(tmp_path / "store") as store:
        assert len(store) == 0
        vectors = torch.stack([_fake_vector(im, encoder.fields) for im in images])
        keys = store.put(images, encoder, vectors, ids=[f"id{i}" for i in range(5)], source=tmp_path)["neck"]
        assert len(store) == 5 and all(k in store for k in keys) and "nope" not in store
        assert store.key(images[3], encoder) == keys[3]
        np.testing.assert_array_equal(store[keys[3]], vectors[3].numpy())
        np.testing.assert_array_equal(store.get(images[1], encoder), vectors[1].numpy())
        np.testing.assert_array_equal(store.get_by_id("id4", encoder), vectors[4].numpy())
        np.testing.assert_array_equal(store.get_by_id("id4", encoder, source=tmp_path), vectors[4].numpy())
        with pytest.raises(KeyError):
            store.get_by_id("id4", FakeEncoder(weights="other"))
        with pytest.raises(KeyError):
            store[keys[0][::-1]]
        assert sorted(store) == sorted(keys)
        array = store.array(keys[::-1])
        np.testing.assert_array_equal(np.asarray(array), vectors.numpy()[::-1])
        assert list(store.configs().values())[0]["weights"] == "random-seed-0"
    # the on-disk format is plain: every shard is a .npy any reader can memory-map (float16 by default)
    shards = list((tmp_path / "store" / "shards").rglob("*.npy"))
    assert len(shards) == 1 and np.load(shards[0], mmap_mode="r").dtype == np.float16


def test_same_id_in_two_datasets_needs_source(tmp_path):
    encoder = FakeEncoder()
    a, b = _images(1, seed=1), _images(1, seed=2)
    with open_store(tmp_path / "s") as store:
        store.put(
            a,
            encoder,
            torch.stack([_fake_vector(a[0], encoder.fields)]),
            ids=["x.png"],
            source=tmp_path / "A",
        )
        store.put(
            b,
            encoder,
            torch.stack([_fake_vector(b[0], encoder.fields)]),
            ids=["x.png"],
            source=tmp_path / "B",
        )
        with pytest.raises(DataError, match="x.png"):
            store.get_by_id("x.png", encoder)
        np.testing.assert_array_equal(
            store.get_by_id("x.png", encoder, source=tmp_path / "B"),
            _fake_vector(b[0], encoder.fields).numpy(),
        )


@pytest.mark.parametrize(
    "change",
    [
        {"weights": "sha256-of-another-checkpoint"},
        {"precision": "bf16"},
        {"image_size": 64},
        {"preprocessing": "medsam"},
        {"encoder": "fake2"},
        {"implementation": 2},
    ],
)
def test_any_setting_change_misses_and_same_settings_hit(tmp_path, change):
    dataset = TinyDataset(_images(4))
    first = FakeEncoder()
    table = embed_dataset(dataset, first, tmp_path, progress=False)
    assert (table.computed, table.reused, first.seen) == (4, 0, 4)
    again = FakeEncoder()
    table = embed_dataset(dataset, again, tmp_path, progress=False)
    assert (table.computed, table.reused, again.seen) == (0, 4, 0)
    changed = FakeEncoder(**change)
    table = embed_dataset(dataset, changed, tmp_path, progress=False)
    assert (table.computed, table.reused, changed.seen) == (4, 0, 4)
    expected = torch.stack([_fake_vector(im, changed.fields) for im in dataset.images]).numpy()
    np.testing.assert_array_equal(np.asarray(table["neck"]), expected)  # never the stale vectors


def test_embed_dataset_order_duplicates_layers_and_renames(tmp_path):
    images = _images(6)
    images[4] = images[1].copy()  # the same content twice is embedded once
    encoder = FakeEncoder()
    table = embed_dataset(TinyDataset(images), encoder, tmp_path, batch_size=4, progress=False)
    assert (table.computed, table.reused, encoder.seen) == (5, 1, 5)
    expected = torch.stack([_fake_vector(im, encoder.fields) for im in images]).numpy()
    neck = table["neck"]
    assert neck.shape == (6, 8, 3, 3) and len(table) == 6
    np.testing.assert_array_equal(neck[2], expected[2])
    np.testing.assert_array_equal(neck[-1], expected[-1])
    np.testing.assert_array_equal(neck[1:4], expected[1:4])
    np.testing.assert_array_equal(neck[[5, 0, 5]], expected[[5, 0, 5]])
    np.testing.assert_array_equal(neck.tensor([3]).numpy(), expected[[3]])
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(neck))[[0, 2]], expected[[0, 2]]
    )  # DataLoader workers

    # A plain list of arrays works too (no ids); its images are all hits now.
    listed = embed_dataset(images, FakeEncoder(), tmp_path, progress=False)
    assert listed.computed == 0 and listed.ids == [None] * 6
    np.testing.assert_array_equal(np.asarray(listed["neck"]), expected)

    # Asking for layers later reuses the stored neck and computes only the new outputs.
    layered = embed_dataset(
        TinyDataset(images), FakeEncoder(), tmp_path, layers=[3], batch_size=4, progress=False
    )
    assert layered.outputs == ["neck", "3"]
    np.testing.assert_array_equal(np.asarray(layered["3"]), expected * 4)
    np.testing.assert_array_equal(np.asarray(layered["neck"]), expected)
    with open_store(tmp_path) as store:
        assert len(store) == 10  # 5 unique images x 2 outputs

    # Renamed files (new ids, same pixels) are hits; ids then resolve through the store.
    renamed = TinyDataset(images, source=tmp_path / "renamed")
    renamed.ids = [f"renamed_{i}" for i in range(6)]
    encoder = FakeEncoder()
    assert embed_dataset(renamed, encoder, tmp_path, progress=False).computed == 0 and encoder.seen == 0
    with open_store(tmp_path) as store:
        view = store.view(encoder, "neck", source=tmp_path / "renamed")
        assert "renamed_5" in view and "img_000.png" not in view
        np.testing.assert_array_equal(view["renamed_5"], expected[5])
        np.testing.assert_array_equal(np.asarray(view.array(renamed.ids)), expected)


def test_interrupted_run_resumes(tmp_path):
    class Dies(FakeEncoder):
        def embed(self, images, layers=None, batch_size=1):
            if self.seen >= 4:
                raise KeyboardInterrupt  # stands in for a kill after two batches
            return super().embed(images, layers, batch_size)

    dataset = TinyDataset(_images(7))
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(dataset, Dies(), tmp_path, batch_size=2, progress=False)
    with open_store(tmp_path) as store:
        assert len(store) == 4  # the two finished batches are kept
    encoder = FakeEncoder()
    table = embed_dataset(dataset, encoder, tmp_path, batch_size=2, progress=False)
    assert (table.computed, table.reused, encoder.seen) == (3, 4, 3)
    expected = torch.stack([_fake_vector(im, encoder.fields) for im in dataset.images]).numpy()
    np.testing.assert_array_equal(np.asarray(table["neck"]), expected)

    # What a killed writer leaves (a shard never recorded, a temporary file) is pruned after the grace period.
    leftovers = [tmp_path / "shards" / "x" / "dead-000000-neck.npy", tmp_path / "shards" / "x" / ".y.npy.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    with open_store(tmp_path) as store:
        assert store.prune() == 0  # too recent: could belong to a live writer
        assert store.prune(grace_seconds=-1) == 2 and not any(p.exists() for p in leftovers)
        np.testing.assert_array_equal(np.asarray(store.array(table.keys["neck"])), expected)


def test_journal_of_dead_writer_is_ingested_and_live_one_kept(tmp_path):
    encoder = FakeEncoder()
    image = _images(1)[0]
    store = open_store(tmp_path)
    vector = _fake_vector(image, encoder.fields).numpy()[None]
    for name in ("dead", "live"):
        journal = Journal(tmp_path, name)
        writer = ShardWriter(tmp_path)
        config = store.view(encoder).config
        digest = image_digest(image) if name == "dead" else image_digest(image + 1)
        shard = writer.write(config, "neck", vector)
        key = EmbeddingStore.key(digest, encoder)
        journal.append([{"kind": "config", "config": config, "fields": "{}"}])
        journal.append(
            [
                dict(
                    kind="entry",
                    key=key,
                    image=digest,
                    config=config,
                    output="neck",
                    shard=shard,
                    row=0,
                    shape=[8, 3, 3],
                )
            ]
        )
        journal.path.with_suffix(".jsonl").open("ab").write(
            b'{"kind": "entry", "key": "tor'
        )  # torn last line
        if name == "dead":
            journal.close()
    assert store.manifest.ingest_journals(tmp_path) == 2
    assert len(store) == 2 and store.key(image, encoder) in store
    assert sorted(p.stem for p in (tmp_path / "journal").glob("*.jsonl")) == ["live"]
    np.testing.assert_array_equal(store.get(image + 1, encoder), vector[0])
    store.close()


def _writer_process(root: str, seed: int, rounds: int, pause: float = 0.0) -> None:
    encoder = FakeEncoder()
    images = _images(24, seed=0)  # both writers share 12 images, and each has 12 of its own
    images[12:] = _images(12, seed=100 + seed)
    order = np.random.default_rng(seed).permutation(24)
    with open_store(root) as store:
        for _ in range(rounds):
            for chunk in np.array_split(order, 12):
                batch = [images[i] for i in chunk]
                store.put(batch, encoder, torch.stack([_fake_vector(im, encoder.fields) for im in batch]))
                time.sleep(pause)


def test_two_processes_writing_one_store_do_not_corrupt_it(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer_process, args=(str(tmp_path), seed, 4)) for seed in (1, 2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    encoder = FakeEncoder()
    expected_images = _images(12, seed=0) + _images(12, seed=101) + _images(12, seed=102)
    with open_store(tmp_path) as store:
        assert store.manifest.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(store) == 36
        for image in expected_images:
            np.testing.assert_array_equal(
                store.get(image, encoder), _fake_vector(image, encoder.fields).numpy()
            )


def test_reader_sees_consistent_entries_while_a_writer_runs(tmp_path):
    open_store(tmp_path).close()
    writer = multiprocessing.get_context("fork").Process(
        target=_writer_process, args=(str(tmp_path), 1, 1, 0.02)
    )
    writer.start()
    encoder = FakeEncoder()
    images = {image_digest(im): im for im in _images(12, seed=0) + _images(12, seed=101)}
    counts, checked = [], 0
    with open_store(tmp_path) as store:
        while writer.is_alive() or not counts or counts[-1] < 24:
            keys = list(store)
            counts.append(len(keys))
            for key in keys:  # every visible entry is complete and correct
                digest = store.manifest.conn.execute(
                    "SELECT image FROM entries WHERE key = ?", (key,)
                ).fetchone()[0]
                np.testing.assert_array_equal(
                    store[key], _fake_vector(images[digest], encoder.fields).numpy()
                )
                checked += 1
            if len(counts) > 2000:
                break
            time.sleep(0.002)
    writer.join(timeout=60)
    assert writer.exitcode == 0
    assert counts == sorted(counts) and counts[-1] == 24 and checked >= 24
    assert any(0 < count < 24 for count in counts)  # the reader did run while the writer was writing


def test_open_store_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="found a file"):
        open_store(tmp_path / "file")
    with pytest.raises(DataError, match="not an embedding store"):
        open_store(tmp_path / "missing", create=False)
    with pytest.raises(DataError, match="no images"):
        embed_dataset(TinyDataset([]), FakeEncoder(), tmp_path / "s", progress=False)
    open_store(tmp_path / "s").close()
    with sqlite3.connect(tmp_path / "s" / "manifest.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'format'")
    with pytest.raises(DataError, match="format 99"):
        open_store(tmp_path / "s")


def _filled_store(root: Path, n: int = 6, batch_size: int = 2) -> tuple[TinyDataset, np.ndarray, list[Path]]:
    dataset = TinyDataset(_images(n))
    encoder = FakeEncoder()
    embed_dataset(dataset, encoder, root, batch_size=batch_size, progress=False)
    expected = torch.stack([_fake_vector(im, encoder.fields) for im in dataset.images]).numpy()
    return dataset, expected, sorted((root / "shards").rglob("*.npy"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("deleted", "the file is missing"),
        ("truncated", "truncated or corrupt"),
        ("zeroed", "not an .npy file"),
        ("other_shape", "manifest expects"),
        ("other_dtype", "expected a float16 array"),
    ],
)
def test_damaged_shard_reads_name_the_file(tmp_path, damage, message):
    """Every read path (store[key], the dataset-ordered array, one row or many) gives one DataError."""
    _, _, shards = _filled_store(tmp_path)
    shard = shards[0]
    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:140])
    elif damage == "zeroed":
        shard.write_bytes(b"\0" * shard.stat().st_size)
    elif damage == "other_shape":
        np.save(shard, np.zeros((2, 3), np.load(shard).dtype))  # its own dtype, another shape
    else:
        np.save(shard, np.zeros((2, 8, 3, 3), np.float64))
    with open_store(tmp_path) as store:
        keys = sorted(store)
        hit = next(k for k in keys if store.locate([k])[k].shard == shard.relative_to(tmp_path).as_posix())
        pattern = f"{shard.name}: damaged embedding store shard.*{message}.*rerun `samadapt embed`"
        with pytest.raises(DataError, match=pattern):
            store[hit]
        with pytest.raises(DataError, match=pattern):
            store.array([hit])[0]
        with pytest.raises(DataError, match=pattern):
            np.asarray(store.array(keys))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_embed_recomputes_entries_of_missing_or_cut_shards(tmp_path, damage):
    dataset, expected, shards = _filled_store(tmp_path)
    assert len(shards) == 3  # one per batch of 2
    if damage == "deleted":
        shards[1].unlink()
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:-4])  # one float short of complete
    encoder = FakeEncoder()
    with pytest.warns(
        UserWarning, match=r"1 shard file\(s\) missing or truncated .*recomputing the 2 entries"
    ):
        table = embed_dataset(dataset, encoder, tmp_path, batch_size=2, progress=False)
    assert (table.computed, table.reused, encoder.seen) == (2, 4, 2)
    np.testing.assert_array_equal(np.asarray(table["neck"]), expected)
    with open_store(tmp_path) as store:
        assert len(store) == 6 and store.verify() == ([], 0)
        assert store.manifest.shards() == {
            p.relative_to(tmp_path).as_posix() for p in (tmp_path / "shards").rglob("*.npy")
        } - ({shards[1].relative_to(tmp_path).as_posix()} if damage == "truncated" else set())
    # Healed: the next run has nothing to do (and checks only stat the shards, so it stays cheap).
    encoder = FakeEncoder()
    assert embed_dataset(dataset, encoder, tmp_path, batch_size=2, progress=False).computed == 0
    assert encoder.seen == 0


def test_verify_checks_every_entry_without_keys(tmp_path):
    _, _, shards = _filled_store(tmp_path)
    shards[0].unlink()
    shards[2].unlink()
    with open_store(tmp_path) as store:
        broken, dropped = store.verify()
        assert len(broken) == 2 and dropped == 4 and len(store) == 2
        assert store.verify() == ([], 0)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory"])
def test_damaged_manifest_is_a_data_error(tmp_path, damage):
    _filled_store(tmp_path)
    manifest = tmp_path / "manifest.sqlite"
    if damage == "garbage":
        manifest.write_bytes(b"SQLite format 2\0" + b"\xff" * 4000)
    elif damage == "truncated":
        manifest.write_bytes(manifest.read_bytes()[:1500])
    else:
        manifest.unlink()
        manifest.mkdir()
    with pytest.raises(DataError, match=r"manifest\.sqlite: (damaged|cannot use) .*rerun `samadapt embed`"):
        with open_store(tmp_path) as store:
            sorted(store)
            store.locate(["x"])
