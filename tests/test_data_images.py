"""read_image: formats, conversion rules and the errors users get for broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from samadapt.data.images import read_image, to_uint8
from samadapt.errors import DataError


def minmax(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    return np.rint((values - values.min()) * 255.0 / (values.max() - values.min())).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", **elements) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if pixels is not None:
        bits = 8 if pixels.dtype == np.uint8 else 12
        ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_8bit_grey_and_rgb_pass_through_unchanged(tmp_path: Path) -> None:
    grey, rgb = skimage.data.cell()[:96, :80], skimage.data.retina()[600:664, 600:700]
    for suffix in (".png", ".bmp", ".tif"):
        Image.fromarray(grey).save(tmp_path / f"grey{suffix}")
        Image.fromarray(rgb).save(tmp_path / f"rgb{suffix}")
        np.testing.assert_array_equal(read_image(tmp_path / f"grey{suffix}"), grey)
        np.testing.assert_array_equal(read_image(tmp_path / f"rgb{suffix}"), rgb)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    jpeg = read_image(tmp_path / "rgb.jpg")
    assert jpeg.dtype == np.uint8 and jpeg.shape == rgb.shape
    assert np.abs(jpeg.astype(int) - rgb).mean() < 4  # lossy, but the same picture


def test_16bit_and_float_become_uint8_by_per_image_minmax(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    deep = (skimage.data.camera()[:64, :48].astype(np.uint16) * 40 + 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), minmax(deep))

    floats = rng.normal(size=(20, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "float.tif", floats)
    np.testing.assert_array_equal(read_image(tmp_path / "float.tif"), minmax(floats))

    rgb16 = rng.integers(0, 65535, size=(16, 16, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    out = read_image(tmp_path / "rgb16.tif")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # Monotone in the input whichever decoder ran (Pillow's high byte or tifffile's min-max).
    flat_in, flat_out = rgb16[..., 0].ravel(), out[..., 0].ravel()
    assert np.all(np.diff(flat_out[np.argsort(flat_in)].astype(int)) >= 0)

    assert not to_uint8(np.full((4, 4), 7.5)).any()  # constant image -> zeros, no division by zero


def test_alpha_is_composited_on_black_and_palette_becomes_rgb(tmp_path: Path) -> None:
    rgb = skimage.data.astronaut()[:32, :40]
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (32, 1))
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    expected = np.rint(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    assert np.abs(read_image(tmp_path / "rgba.png").astype(int) - expected).max() <= 1

    Image.fromarray(np.dstack([rgb, np.full((32, 40), 255, np.uint8)])).save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.png"), rgb)

    grey = skimage.data.camera()[:16, :16]
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), grey)

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))

    Image.fromarray(grey > 128).save(tmp_path / "bits.png")
    assert set(np.unique(read_image(tmp_path / "bits.png"))) <= {0, 255}

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").shape == (32, 40, 3)


def test_dicom_applies_rescale_window_and_monochrome1(tmp_path: Path) -> None:
    stored = (np.arange(40 * 30).reshape(40, 30) * 3).astype(np.uint16)
    ct = write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    hu = stored.astype(np.float64) - 1024
    # DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..255.
    expected = np.clip(((hu - 39.5) / 399 + 0.5) * 255, 0, 255)
    out = read_image(ct)
    assert out.dtype == np.uint8 and out.shape == (40, 30)
    assert np.abs(out - expected).max() <= 0.5 + 1e-6

    plain = write_dicom(tmp_path / "plain.dcm", stored)
    np.testing.assert_array_equal(read_image(plain), minmax(stored))
    inverted = write_dicom(tmp_path / "inverted", stored, photometric="MONOCHROME1")  # no suffix: magic
    np.testing.assert_array_equal(read_image(inverted), 255 - minmax(stored))

    ramp = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    lut = Dataset()  # a VOI LUT Sequence mapping 0..255 onto an inverted 8-bit ramp
    lut.add_new(0x00283002, "US", [256, 0, 8])
    lut.add_new(0x00283006, "US", list(range(255, -1, -1)))
    with_lut = write_dicom(tmp_path / "lut.dcm", ramp, VOILUTSequence=[lut])
    np.testing.assert_array_equal(read_image(with_lut), (255 - ramp).astype(np.uint8))

    rgb = skimage.data.astronaut()[:24, :20].copy()
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")), rgb)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("missing.png", None, "no such file"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("notes.png", lambda p: p.write_text("patient notes, not pixels\n"), "not an image"),
        ("tiny.png", lambda p: Image.fromarray(np.zeros((1, 1), np.uint8)).save(p), "1x1"),
        ("strip.png", lambda p: Image.fromarray(np.zeros((2, 3000), np.uint8)).save(p), "aspect"),
        (
            "pages.tif",
            lambda p: tifffile.imwrite(p, np.zeros((3, 8, 8), np.uint8), photometric="minisblack"),
            "frames",
        ),
        ("nopixels.dcm", lambda p: write_dicom(p, None, PatientName="Anon"), "no pixel data"),
        ("frames.dcm", lambda p: write_dicom(p, np.zeros((3, 8, 8), np.uint16)), "3 frames"),
        ("text.dcm", lambda p: p.write_text("not dicom"), "DICOM"),
    ],
)
def test_unusable_files_raise_data_error_naming_the_file(tmp_path: Path, name, make, message) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(DataError, match=message) as caught:
        read_image(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_raise_data_error(tmp_path: Path, suffix: str) -> None:
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    Image.fromarray(skimage.data.retina()[::4, ::4]).save(whole)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as caught:
        read_image(cut)
    assert str(cut) in str(caught.value)


def test_decompression_bomb_is_an_error_not_a_warning(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # 64x64 is now above Pillow's warning level
    with pytest.raises(DataError, match="too large"):
        read_image(path)


def test_size_hint_decodes_large_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    retina = skimage.data.retina()  # 1411 x 1411
    Image.fromarray(retina).save(tmp_path / "retina.jpg", quality=90)
    full = read_image(tmp_path / "retina.jpg")
    reduced = read_image(tmp_path / "retina.jpg", size_hint=300)
    assert full.shape == retina.shape
    assert 300 <= max(reduced.shape[:2]) < 2 * 300 + 16 and reduced.shape[2] == 3
