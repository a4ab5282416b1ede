"""Bounded hypothesis fuzzing: decoders, preprocessing, CSV manifests and YAML configs raise only our errors.

Each property either returns a well-formed result or raises a `SamadaptError` subclass (never a raw
ValueError/OSError/TypeError that would reach the user as a traceback). Budgets are small so CI stays fast.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from corpus import png_bytes, sample_rgb
from samadapt.data.images import read_image
from samadapt.data.readers import read_dataset
from samadapt.encoders.preprocessing import PREPROCESSORS
from samadapt.errors import ConfigError, DataError, SamadaptError

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
VALID_PNG = png_bytes(sample_rgb(12))
_scratch = Path(tempfile.mkdtemp(prefix="samadapt-fuzz-"))  # hypothesis re-runs a test body; one folder


def _file(name: str, data: bytes) -> Path:
    path = _scratch / name
    path.write_bytes(data)
    return path


def _check_image(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 2
    assert image.ndim == 2 or image.shape[2] == 3


# ---- image decoding ------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".dcm"]))
def test_random_bytes_with_an_image_suffix_raise_only_data_error(data: bytes, suffix: str) -> None:
    try:
        _check_image(read_image(_file("random" + suffix, data)))
    except DataError:
        pass


def _refresh_crcs(png: bytes) -> bytes:
    """Recompute every chunk CRC, so mutations reach the decoder instead of stopping at the checksum."""
    out, pos = bytearray(png[:8]), 8
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        body = png[pos + 4 : pos + 8 + length]
        out += png[pos : pos + 4] + body + zlib.crc32(body).to_bytes(4, "big")
        pos += 12 + length
    return bytes(out + png[pos:])


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), min_size=1, max_size=4),
    fix_crc=st.booleans(),
)
def test_mutated_png_headers_raise_only_data_error(edits: list[tuple[int, int]], fix_crc: bool) -> None:
    data = bytearray(VALID_PNG)
    for offset, value in edits:  # signature and IHDR (width, height, bit depth, colour type, ...)
        data[offset] = value
    mutated = _refresh_crcs(bytes(data)) if fix_crc else bytes(data)
    try:
        _check_image(read_image(_file("mutated.png", mutated)))
    except DataError:
        pass


@FUZZ
@given(cut=st.integers(1, len(VALID_PNG) - 1))
def test_every_truncation_of_a_png_raises_data_error(cut: int) -> None:
    with pytest.raises(DataError, match="mutated|cut"):
        read_image(_file("cut.png", VALID_PNG[:cut]))


# ---- preprocessing ---------------------------------------------------------------------------------------------

_valid_images = hnp.arrays(
    dtype=np.uint8,
    shape=st.one_of(
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=48),
        st.tuples(st.integers(2, 48), st.integers(2, 48), st.sampled_from([1, 3])),
    ),
    elements=st.integers(0, 255),
)
_invalid_images = st.one_of(
    hnp.arrays(  # numeric dtypes other than uint8
        dtype=st.sampled_from([np.uint16, np.int8, np.int32, np.float32, np.float64, np.bool_]),
        shape=st.tuples(st.integers(2, 16), st.integers(2, 16)),
    ),
    hnp.arrays(  # wrong ranks or channel counts
        dtype=np.uint8,
        shape=st.one_of(
            hnp.array_shapes(min_dims=1, max_dims=1, max_side=16),
            st.tuples(st.integers(2, 8), st.integers(2, 8), st.sampled_from([2, 4, 5])),
            hnp.array_shapes(min_dims=4, max_dims=4, max_side=4),
        ),
    ),
    st.lists(st.integers(0, 255), max_size=4),  # not an array at all
)


@FUZZ
@given(image=_valid_images, name=st.sampled_from(sorted(PREPROCESSORS)), size=st.sampled_from([32, 64]))
def test_preprocessing_valid_images_give_finite_square_tensors(
    image: np.ndarray, name: str, size: int
) -> None:
    x, meta = PREPROCESSORS[name](image, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert meta.original_size == image.shape[:2] and meta.input_size == size
    assert 1 <= min(meta.resized_size) and max(meta.resized_size) <= size


@FUZZ
@given(image=_invalid_images, name=st.sampled_from(sorted(PREPROCESSORS)))
def test_preprocessing_invalid_images_raise_data_error(image: object, name: str) -> None:
    with pytest.raises(DataError):
        PREPROCESSORS[name](image, 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        pytest.param(name, shape, id=f"{name}-{shape}")
        for name in sorted(PREPROCESSORS)
        for shape in ((0, 5), (5, 0, 3))
    ]
    + [
        pytest.param("sam", (2, 1000), id="sam-thin"),
        pytest.param("medsam", (2, 1000), id="medsam-thin"),
        pytest.param("sam2", (2, 1000), id="sam2-thin"),
    ],
)
def test_preprocessing_degenerate_arrays_are_processed_or_data_error(
    name: str, shape: tuple[int, ...]
) -> None:
    try:
        x, _ = PREPROCESSORS[name](np.zeros(shape, np.uint8), 64)
    except DataError:
        return
    assert x.shape == (3, 64, 64) and bool(torch.isfinite(x).all())


# ---- CSV manifests ---------------------------------------------------------------------------------------------

_cells = st.one_of(
    st.sampled_from(["a.png", "b.png", "missing.png", "", "../a.png", "/abs/x.png", " a.png "]),
    st.sampled_from(["0", "1", "-1", "benign", "x" * 3, "", "1.5"]),
    st.sampled_from(["train", "val", "test", "TRAIN", "validation", "holdout", ""]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6),
)
_headers = st.lists(st.sampled_from(["path", "label", "split", "PATH", " label ", "extra", ""]), max_size=4)


@FUZZ
@given(header=_headers, rows=st.lists(st.lists(_cells, max_size=4), max_size=5), quote=st.booleans())
def test_csv_manifests_read_or_raise_data_error(
    header: list[str], rows: list[list[str]], quote: bool
) -> None:
    folder = _scratch / "manifest"
    folder.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(VALID_PNG)

    def line(cells: list[str]) -> str:
        return ",".join(f'"{c}"' if quote else c for c in cells)

    rows = [(r + [""] * len(header))[: len(header)] for r in rows]  # extra cells: see the test below
    path = folder / "list.csv"
    path.write_text("\n".join([line(header), *(line(r) for r in rows)]) + "\n", encoding="utf-8")
    try:
        dataset = read_dataset(path)
    except SamadaptError:
        return
    assert len(dataset) == len(dataset.ids) >= 1
    for i in range(len(dataset)):
        _check_image(dataset.image(i))


def test_csv_row_with_more_cells_than_the_header_is_a_data_error() -> None:
    folder = _scratch / "wide"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(VALID_PNG)
    (folder / "list.csv").write_text("path,label\na.png,benign\n,,\n")  # Excel writes blank rows as ",,"
    with pytest.raises(DataError, match="list.csv"):
        read_dataset(folder / "list.csv")


# ---- YAML configs ----------------------------------------------------------------------------------------------

# Scalars and mappings; null and lists are the known gap tested below.
_yaml_values = st.one_of(
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_config_keys = st.sampled_from(
    [
        "epochs",
        "batch-size",
        "lr",
        "label_fraction",
        "seed",
        "method",
        "slca-window",
        "image_size",
        "data",
        "bogus",
    ]
)


def _train_config(task: str, config: Path, *flags: str):
    """The config `samadapt train --task T --config FILE` builds before any work starts (the real CLI path; the
    run itself is replaced by a stub that hands the config back)."""
    from unittest import mock

    from samadapt.engine import cli
    from samadapt.engine.registry import get_task

    seen = {}

    def stop(task, cfg, **kwargs):
        seen["cfg"] = cfg
        return {}

    with mock.patch("samadapt.engine.lifecycle.execute_run", stop):
        cli.train(get_task(task), ["--config", str(config), *flags])
    return seen["cfg"]


def _assert_names_the_file_and_a_key(exc: ConfigError, path: Path, values: dict) -> None:
    """A refusal is one line that says where (the file) and what (one of the keys given, or the task)."""
    message = str(exc)
    assert "\n" not in message and str(path) in message, message
    keys = [str(k).replace("-", "_") for k in values] + ["out", "data"]
    assert any(k in message.replace("-", "_") for k in keys), message


@FUZZ
@given(text=st.text(max_size=80))
def test_arbitrary_yaml_text_raises_only_config_error(text: str) -> None:
    from samadapt.engine.config import read_yaml_mapping

    path = _scratch / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(read_yaml_mapping(path), dict)
    except ConfigError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_yaml_mappings_are_read_and_other_documents_refused() -> None:
    """Control for the property above: it is not passing because everything is refused."""
    from samadapt.engine.config import read_yaml_mapping

    path = _scratch / "raw.yaml"
    path.write_text("lr: 0.5\nbatch-size: 4\n")
    assert read_yaml_mapping(path) == {"lr": 0.5, "batch_size": 4}
    path.write_text("")
    assert read_yaml_mapping(path) == {}
    for text in ("- a\n- b\n", "just text", "a: [1\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="raw.yaml"):
            read_yaml_mapping(path)


@FUZZ
@given(values=st.dictionaries(_config_keys, _yaml_values, max_size=4))
def test_classify_config_values_of_any_type_raise_only_config_error(values: dict) -> None:
    path = _scratch / "classify.yaml"
    path.write_text(
        yaml.safe_dump({"task": "classify", "data": "x.npz", "out": str(_scratch / "run"), **values})
    )
    try:
        cfg = _train_config("classify", path)
    except ConfigError as exc:
        _assert_names_the_file_and_a_key(exc, path, values)
        return
    assert cfg.epochs >= 1 and 0 < cfg.label_fraction <= 1


@FUZZ
@given(
    values=st.fixed_dictionaries(
        {},
        optional={
            "epochs": st.integers(1, 500),
            "batch-size": st.integers(1, 64),
            "lr": st.floats(1e-6, 1.0),
            "label_fraction": st.floats(0.01, 1.0),
            "seed": st.integers(0, 10**6),
            "method": st.sampled_from(["slca", "baseline", "linear-probe"]),
            "slca-window": st.integers(1, 8),
        },
    )
)
def test_valid_classify_config_values_are_taken_as_given(values: dict) -> None:
    """The other half: well-formed files are accepted, every value where it was written."""
    path = _scratch / "classify_ok.yaml"
    path.write_text(
        yaml.safe_dump({"task": "classify", "data": "x.npz", "out": str(_scratch / "run"), **values})
    )
    cfg = _train_config("classify", path)
    for key, value in values.items():
        assert getattr(cfg, key.replace("-", "_")) == value, key


def test_a_flag_overrides_the_fuzzed_file() -> None:
    path = _scratch / "classify_flag.yaml"
    path.write_text(yaml.safe_dump({"task": "classify", "data": "x.npz", "out": "run", "epochs": 7}))
    assert _train_config("classify", path, "--epochs", "3").epochs == 3


@pytest.mark.parametrize(
    "value",
    [
        [1, 2],
        None,
        {"a": 1},
        "many",
    ],
)
def test_classify_config_epochs_of_the_wrong_type(value) -> None:
    path = _scratch / "epochs.yaml"
    path.write_text(yaml.safe_dump({"task": "classify", "data": "x.npz", "out": "run", "epochs": value}))
    with pytest.raises(ConfigError, match=r"epochs\.yaml: key 'epochs'"):
        _train_config("classify", path)


_fewshot_keys = st.sampled_from(
    ["epochs", "batch-size", "lr", "coop-lr", "data-fraction", "seed", "method", "points-per-side",
     "attn-layers", "class-names", "overlay-alpha", "weight-decay", "tip-epochs", "bogus"]
)  # fmt: skip
_list_values = st.lists(
    st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=4)), max_size=3
)


@FUZZ
@given(values=st.dictionaries(_fewshot_keys, st.one_of(_yaml_values, _list_values), max_size=4))
def test_fewshot_config_values_of_any_type_raise_only_config_error(values: dict) -> None:
    """What `samadapt train --task fewshot --config FILE` does with the file before anything loads."""
    import math

    path = _scratch / "fewshot.yaml"
    path.write_text(yaml.safe_dump({"task": "fewshot", "data": "x.npz", "out": "run", **values}))
    try:
        cfg = _train_config("fewshot", path)
    except ConfigError as exc:
        _assert_names_the_file_and_a_key(exc, path, values)
        return
    opts = cfg.options
    assert cfg.method and opts.epochs >= 1 and opts.batch_size >= 1 and math.isfinite(opts.lr) and opts.lr > 0
    assert cfg.masker_settings.points_per_side >= 1 and 0 < cfg.data_fraction <= 1 and cfg.seed >= 0


def test_valid_fewshot_config_values_are_taken_as_given() -> None:
    path = _scratch / "fewshot_ok.yaml"
    values = {"epochs": 3, "batch-size": 2, "coop-lr": 0.01, "data-fraction": 0.25, "seed": 4,
              "method": "coop", "points-per-side": 8, "overlay-alpha": 0.3, "class-names": ["a", "b"]}  # fmt: skip
    path.write_text(yaml.safe_dump({"task": "fewshot", "data": "x.npz", "out": "run", **values}))
    cfg = _train_config("fewshot", path)
    for key, value in values.items():
        assert getattr(cfg, key.replace("-", "_")) == value, key
    assert cfg.options.coop_lr == 0.01 and cfg.masker_settings.points_per_side == 8
