"""Light store dtypes: float16 (default) and bfloat16 shards, float32 reads, identity, old stores, a linear probe."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt.encoders import load_encoder
from samadapt.store import DEFAULT_STORE_DTYPE, embed_dataset, image_digest, open_store
from samadapt.store.keys import config_digest, entry_key

DATA = Path(__file__).parent / "data"
# What the store may add, relative to the value: float16 rounds to 11 significant bits, bfloat16 to 8.
REL_ERROR = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}
# The float32 store (tests/data/store_v1_float32) was written by the store code before store dtypes existed.
LEGACY_FIELDS = {
    "encoder": "fake",
    "arch": "tiny",
    "weights": "random-seed-0",
    "preprocessing": "sam",
    "image_size": 32,
    "precision": "fp32",
    "implementation": 1,
}


class ImageList:
    def __init__(self, images: list[np.ndarray], labels: np.ndarray | None = None) -> None:
        self.images = images
        self.labels = labels
        self.ids = [f"img_{i:03d}.png" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


def _blobs(n: int, seed: int = 0) -> ImageList:
    """Grey 32x32 images, half with a bright square at a random place (label 1): a task a probe can learn."""
    rng = np.random.default_rng(seed)
    images, labels = [], np.arange(n) % 2
    for label in labels:
        image = rng.normal(90, 25, (32, 32)).clip(0, 255)
        if label:
            y, x = rng.integers(2, 18, size=2)
            image[y : y + 12, x : x + 12] += 110
        images.append(image.clip(0, 255).astype(np.uint8))
    return ImageList(images, labels)


@pytest.fixture(scope="module")
def tiny_sam():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_encoder("sam_vit_b", arch="tiny", image_size=64)


def _shard_files(root: Path) -> list[Path]:
    return sorted((root / "shards").rglob("*.npy"))


def test_default_is_float16_and_at_most_half_the_bytes_of_float32(tmp_path, tiny_sam):
    data = _blobs(6)
    assert DEFAULT_STORE_DTYPE == "float16"
    light = embed_dataset(data, tiny_sam, tmp_path / "f16", layers=[1], progress=False)
    full = embed_dataset(data, tiny_sam, tmp_path / "f32", layers=[1], progress=False, store_dtype="float32")
    disk = {name: sum(p.stat().st_size for p in _shard_files(tmp_path / name)) for name in ("f16", "f32")}
    assert disk["f16"] <= disk["f32"] / 2 + 256 * len(_shard_files(tmp_path / "f16"))  # + .npy headers
    assert light.bytes_per_image * 2 == full.bytes_per_image == (256 * 4 * 4 + 64 * 4 * 4) * 4
    assert all(np.load(p, mmap_mode="r").dtype == np.float16 for p in _shard_files(tmp_path / "f16"))
    for output in ("neck", "1"):
        a, b = np.asarray(light[output]), np.asarray(full[output])
        assert a.dtype == b.dtype == np.float32  # callers get float32 as before
        np.testing.assert_allclose(a, b, rtol=REL_ERROR["float16"], atol=1e-7)
        half = light[output].astype(np.float16)  # opt-in: the stored dtype, half the memory
        assert half[0:2].dtype == np.float16 and half[3].dtype == np.float16
        np.testing.assert_array_equal(half[:].astype(np.float32), a)


def test_bfloat16_shards_round_to_nearest_and_read_as_float32(tmp_path, tiny_sam):
    data = _blobs(4)
    table = embed_dataset(data, tiny_sam, tmp_path, progress=False, store_dtype="bfloat16", batch_size=4)
    (shard,) = _shard_files(tmp_path)
    assert shard.name.endswith(".bf16.npy") and np.load(shard).dtype == np.uint16
    exact = tiny_sam.embed(data.images, batch_size=4).numpy()  # the same batches as the store
    np.testing.assert_allclose(np.asarray(table["neck"]), exact, rtol=REL_ERROR["bfloat16"], atol=1e-30)
    expected = torch.from_numpy(exact).to(torch.bfloat16).float().numpy()  # torch's rounding, bit for bit
    np.testing.assert_array_equal(np.asarray(table["neck"]), expected)
    np.testing.assert_array_equal(table["neck"][[3, 1]], expected[[3, 1]])


def test_store_dtype_is_part_of_the_identity(tmp_path, tiny_sam):
    """A float32 request never gets float16 data; a float16 request may get float32 (more exact) data."""
    data = _blobs(4)
    embed_dataset(data, tiny_sam, tmp_path, progress=False)  # float16
    with open_store(tmp_path) as store:
        assert data.ids[0] in store.view(tiny_sam)
        assert data.ids[0] not in store.view(tiny_sam, store_dtype="float32")
        assert data.ids[0] not in store.view(tiny_sam, store_dtype="bfloat16")
        with pytest.raises(KeyError, match="float32"):
            store.get_by_id(data.ids[0], tiny_sam, store_dtype="float32")
        assert store.get(data.images[0], tiny_sam, store_dtype="float32") is None
        (fields,) = store.configs().values()
        assert fields["store_dtype"] == "float16"  # the manifest says what the entries hold

    full = embed_dataset(data, tiny_sam, tmp_path, progress=False, store_dtype="float32")
    assert full.computed == 4  # recomputed, not converted up from float16
    np.testing.assert_allclose(
        np.asarray(full["neck"]), tiny_sam.embed(data.images).numpy(), rtol=0, atol=1e-6
    )
    more = _blobs(6, seed=1)
    light = embed_dataset(ImageList(data.images + more.images[:2]), tiny_sam, tmp_path, progress=False)
    assert (light.computed, light.reused) == (2, 4)  # float16 entries reused
    bf16 = embed_dataset(data, tiny_sam, tmp_path, progress=False, store_dtype="bfloat16")
    assert (bf16.computed, bf16.reused) == (0, 4)  # no bfloat16 entries, but float32 ones answer
    np.testing.assert_array_equal(np.asarray(bf16["neck"]), np.asarray(full["neck"]))
    assert not [p for p in _shard_files(tmp_path) if p.name.endswith(".bf16.npy")]  # nothing written
    with open_store(tmp_path) as store:
        assert {"float16", "float32"} <= {f.get("store_dtype", "float32") for f in store.configs().values()}


def test_a_store_written_before_store_dtypes_still_reads(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(DATA / "store_v1_float32", root)
    images = list(np.load(DATA / "store_v1_float32_images.npy"))
    vectors = np.load(DATA / "store_v1_float32_vectors.npy")
    with open_store(root) as store:
        # float32 entries keep the keys they had: the settings digest of float32 is the old one
        assert store.key(images[1], LEGACY_FIELDS, store_dtype="float32") == entry_key(
            image_digest(images[1]), config_digest(LEGACY_FIELDS), "neck"
        )
        for dtype in ("float32", "float16", "bfloat16"):  # every request accepts float32 entries
            np.testing.assert_array_equal(
                store.get_by_id("b.png", LEGACY_FIELDS, store_dtype=dtype), vectors[1]
            )
        np.testing.assert_array_equal(store.get(images[2], LEGACY_FIELDS), vectors[2])
        np.testing.assert_array_equal(
            np.asarray(store.view(LEGACY_FIELDS).array(["c.png", "a.png"])), vectors[[2, 0]]
        )
        # a new float16 entry goes beside them; the old ones are untouched
        new = np.full((1, 6, 5), 7, np.uint8)
        store.put([new], LEGACY_FIELDS, {"neck": vectors[:1] * 2})
        np.testing.assert_array_equal(store.get(new, LEGACY_FIELDS), (vectors[0] * 2).astype(np.float16))
        assert store.get(new, LEGACY_FIELDS, store_dtype="float32") is None
        assert store.verify() == ([], 0)


def test_values_beyond_float16_range_are_stored_as_float32(tmp_path):
    fields = dict(LEGACY_FIELDS)
    huge = np.array([[1.0e6, -3.0, 0.5, 70000.0]], np.float32)
    image = np.zeros((4, 4), np.uint8)
    with open_store(tmp_path) as store:
        with pytest.warns(UserWarning, match="exceed float16's range"):
            store.put([image], fields, {"neck": huge})
        np.testing.assert_array_equal(store.get(image, fields), huge[0])  # never clipped to inf
        assert store.get(image, fields, store_dtype="float32") is None  # still a float16-requested entry
    (shard,) = _shard_files(tmp_path)
    assert not shard.name.endswith(".f16.npy") and np.load(shard).dtype == np.float32


def test_output_names_with_dots_cannot_fake_a_dtype_suffix(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    value = np.array([[1.0, 2.0]], np.float32)
    with open_store(tmp_path) as store:
        store.put([image], LEGACY_FIELDS, {"x.f16": value}, store_dtype="float32")
        np.testing.assert_array_equal(
            store.get(image, LEGACY_FIELDS, "x.f16", store_dtype="float32"), value[0]
        )
    (shard,) = _shard_files(tmp_path)
    assert shard.name.endswith("-x_f16.npy")


def _probe_probabilities(
    features: dict[str, np.ndarray], labels: np.ndarray, train: np.ndarray
) -> dict[str, np.ndarray]:
    """Task-neutral training: a standardised logistic-regression probe on pooled neck features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for name, x in features.items():
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000, tol=1e-8))
        probe.fit(x[train], labels[train])
        out[name] = probe.predict_proba(x[~train])[:, 1]
    return out


# The probe on float16 features must give the float32 probe's test probabilities to this absolute tolerance.
PROBE_TOLERANCE = 1e-3


def test_a_probe_trained_on_float16_matches_one_trained_on_float32(tmp_path, tiny_sam):
    data = _blobs(48)
    tables = {
        dtype: embed_dataset(data, tiny_sam, tmp_path / dtype, progress=False, store_dtype=dtype)
        for dtype in ("float32", "float16", "bfloat16")
    }
    pooled = {dtype: np.asarray(t["neck"]).mean(axis=(2, 3)) for dtype, t in tables.items()}
    train = np.arange(len(data)) < 32
    probs = _probe_probabilities(pooled, data.labels, train)
    assert np.abs(probs["float16"] - probs["float32"]).max() <= PROBE_TOLERANCE
    assert np.abs(probs["bfloat16"] - probs["float32"]).max() <= 10 * PROBE_TOLERANCE
    accuracy = {k: float(((p > 0.5) == data.labels[~train]).mean()) for k, p in probs.items()}
    assert accuracy["float16"] == accuracy["float32"]
