"""Read one 2D image file as a uint8 array: ``HxW`` (grey) or ``HxWx3`` (RGB).

Every reader in samadapt goes through `read_image`, so one set of rules decides what the encoders see.
Supported: PNG, JPEG, TIFF, BMP (Pillow; TIFFs Pillow cannot decode go to tifffile) and DICOM (pydicom;
recognised by a ``.dcm``/``.dicom`` suffix or, whatever the file is called, by its ``DICM`` magic bytes).

Conversion rules
- 8-bit grey stays ``HxW`` and 8-bit colour stays ``HxWx3``: no resizing, no colour change.
  Grey is not replicated to 3 channels here; each encoder's preprocessing does that as its checkpoint did.
- 16-bit, 32-bit integer and float images become uint8 by per-image min-max:
  ``round(255 * (x - min) / (max - min))`` (a constant image becomes all zeros). Why: SAM and SAM 2 were
  trained on 8-bit photographs and MedSAM min-max normalises each image anyway, so the full dynamic range
  is spread over the 256 levels the checkpoints know. Pillow reads 16-bit-per-channel RGB PNG and TIFF
  as 8-bit RGB (high bytes), which is already a fixed rescale.
- RGBA / LA: composited on black (``rgb * alpha / 255``). Identical to dropping alpha for the usual fully
  opaque file; where pixels are transparent their stored colour is undefined, and black is what SAM's own
  zero padding means by "no signal".
- Palette (P, PA) -> RGB (then the alpha rule); 1-bit -> grey 0/255; CMYK, YCbCr, LAB, HSV -> RGB.
- EXIF orientation is not applied: pixels are returned as stored, as most training pipelines and mask
  files assume.
- DICOM: the modality LUT (Rescale Slope/Intercept) is applied, then the first VOI window (Window
  Center/Width, or a VOI LUT Sequence) mapped to 0..255 as a viewer shows it; without a window, min-max.
  MONOCHROME1 is inverted so that bright always means dense. Colour DICOM (RGB, YBR) becomes RGB.
  Multi-frame files are refused (a 2D reader cannot know which frame you mean; volumes have their own
  reader), as are multi-page TIFFs.

Refused with `DataError` naming the file: missing, empty, truncated or corrupt, not an image, above
Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 M pixels: its warning is
treated as an error; raise that value for larger images), DICOM without pixel data or with a codec that
is not installed, a side shorter than `MIN_SIDE` (2) pixels, or an aspect ratio above `MAX_ASPECT` (1000;
past about 1024 the longest-side resize to 1024 leaves less than one pixel).

Optional speed-up: ``size_hint`` decodes large JPEGs at a reduced DCT scale (longest side >= hint).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from samadapt.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
)
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
MIN_SIDE: int = 2
MAX_ASPECT: float = 1000.0

# Pillow decode failures of truncated / corrupt files come as any of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)


def to_uint8(array: np.ndarray, *, source: str | Path = "<array>") -> np.ndarray:
    """Convert a 2D or HxWx3 array to uint8 with the module's min-max rule (uint8 passes through)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{source}: pixel type {array.dtype} is not numeric")
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise DataError(f"{source}: image holds no finite pixel values")
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _scale_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255 (values outside are clipped)."""
    if high <= low:
        return to_uint8(values)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _check_shape(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise DataError(f"{path}: expected a 2D grey or HxWx3 colour image, found array shape {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise DataError(f"{path}: image is {height}x{width} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise DataError(f"{path}: image is {height}x{width} pixels, an aspect ratio above {MAX_ASPECT:g}")
    return np.ascontiguousarray(image)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    colour, alpha = rgba[..., :-1].astype(np.uint16), rgba[..., -1:].astype(np.uint16)
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _from_pil(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode in ("LA", "RGBA"):
        return _composite_on_black(np.asarray(image))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return _from_pil(image.convert("RGBA" if has_alpha else "RGB"), path)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I, F: high dynamic range grey
        return to_uint8(np.asarray(image), source=path)
    raise DataError(f"{path}: unsupported Pillow image mode {mode!r}")


def _read_pil(path: Path, size_hint: int | None) -> np.ndarray:
    is_tiff = path.suffix.lower() in (".tif", ".tiff")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its two limits; a dataset reader should refuse, not warn.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) > 1:
                    raise DataError(
                        f"{path}: file holds {image.n_frames} frames/pages; samadapt reads single 2D images"
                    )
                if size_hint is not None and image.format == "JPEG":
                    # Decode at the smallest DCT scale that keeps the longest side >= size_hint.
                    scale = max(image.size) / size_hint
                    image.draft(image.mode, (int(image.size[0] / scale), int(image.size[1] / scale)))
                image.load()
                return _from_pil(image, path)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: image too large (decompression-bomb guard): {error}") from error
    except Image.DecompressionBombWarning as error:
        raise DataError(f"{path}: image too large (decompression-bomb guard): {error}") from error
    except UnidentifiedImageError as error:
        if is_tiff:
            return _read_tifffile(path)
        raise DataError(f"{path}: not an image file Pillow can identify") from error
    except _DECODE_ERRORS as error:
        if is_tiff:  # tifffile decodes what Pillow's TIFF plugin cannot (16-bit RGB, float RGB)
            return _read_tifffile(path)
        raise DataError(f"{path}: cannot decode image (truncated or corrupt file): {error}") from error


def _read_tifffile(path: Path) -> np.ndarray:
    """TIFFs Pillow cannot decode (16-bit RGB, float RGB, odd compressions): tifffile's first series."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as error:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: cannot decode TIFF (truncated or corrupt file): {error}") from error
    if axes.startswith("S") and array.ndim == 3:  # planar configuration: channels first
        array, axes = np.moveaxis(array, 0, -1), axes[1:] + "S"
    if axes not in ("YX", "YXS"):
        raise DataError(f"{path}: TIFF axes {axes!r} shape {array.shape}; expected one 2D plane (YX or YXS)")
    if array.ndim == 3 and array.shape[2] in (2, 4):  # grey+alpha or RGBA
        array = _composite_on_black(to_uint8(array, source=path))
    return to_uint8(array, source=path)


def has_dicom_magic(path: Path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble), whatever its name.

    DICOM exports often have no suffix (``IM0001``) or a UID-like one (``1.2.840...5``), so folder readers use
    this for files whose suffix is not an image suffix. Unreadable files are simply not DICOM here.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as error:
        raise DataError(f"{path}: cannot read DICOM (truncated or not DICOM): {error}") from error
    if len(ds) == 0:  # force=True parses any bytes; nothing parsed means it is not DICOM
        raise DataError(f"{path}: not a DICOM file (no DICOM elements found)")
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: DICOM file has no pixel data (a report, structured or header-only file?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(
            f"{path}: DICOM holds {frames} frames; samadapt reads single 2D images "
            "(extract one frame, or use the volume reader)"
        )
    try:
        pixels = ds.pixel_array
    except Exception as error:  # missing codec plugin, bad length, unsupported syntax
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and syntax.is_compressed:
            hint = f" ({syntax.name} needs a codec plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg`)"
        raise DataError(f"{path}: cannot decode DICOM pixel data{hint}: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        # pydicom already converted YBR to RGB; palette colour is expanded by its LUT.
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        return to_uint8(np.asarray(pixels), source=path)

    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        grey = _scale_range(apply_voi(values, ds, index=0), 0.0, float(2**bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # apply_windowing maps the window onto the stored bit range; windowing two extreme values
        # gives that range's ends, so the window lands exactly on 0..255 (as a viewer shows it).
        with np.errstate(over="ignore"):
            low, high = apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
        grey = _scale_range(apply_windowing(values, ds, index=0), float(low), float(high))
    else:
        grey = to_uint8(np.asarray(values), source=path)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey


def read_image(path: str | Path, *, size_hint: int | None = None) -> np.ndarray:
    """Read one image file as uint8 ``HxW`` or ``HxWx3`` with the rules in this module's docstring.

    ``size_hint``: optional longest side the caller will resize to; large JPEGs are then decoded at a
    reduced DCT scale that keeps the longest side >= size_hint (much faster, slightly different pixels).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    image = _read_dicom(path) if _is_dicom(path) else _read_pil(path, size_hint)
    return _check_shape(image, path)
