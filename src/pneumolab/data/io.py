"""Read any X-ray file (JPEG, PNG or DICOM) into one grayscale array.

`read_xray` is the only door through which image files enter pneumolab. It returns a 2-D ``np.float32`` array
of shape ``(H, W)`` with values in ``[0, 1]``, where 0 is black *as the image is meant to be displayed*.
`to_square_uint8` turns that into the ``uint8`` square that the cache, `predict` and the web service use, and
`load_xray` chains the two: it is the one preprocessing step they all share, so they cannot drift apart.

Decisions:

* **Format by content, not by name.** PNG and JPEG are recognised by their magic bytes, DICOM by the
  ``DICM`` marker at byte 128 (so an upload with no name works) or, for legacy files without the 128-byte
  preamble, by a ``.dcm`` / ``.dicom`` suffix. Anything else that Pillow can open (GIF, TIFF, BMP, WebP ...)
  is refused by name.
* **Colour becomes luma** (ITU-R 601, as Pillow's ``convert("L")``); alpha is ignored; palette images are
  expanded first. **Bit depth is kept**: 8-bit values are divided by 255, 16-bit (``I;16*``) by 65535,
  32-bit integer (``I``) by 65535 when it fits in 16 bits, else by its maximum; float (``F``) is kept when
  already in ``[0, 1]``, else min-max scaled. Pillow stores 16-bit colour PNGs as 8-bit RGB, so those lose
  precision.
* **EXIF orientation is applied** (``ImageOps.exif_transpose``), so ``(H, W)`` is the upright shape.
* **DICOM** goes through pydicom: the first frame is decoded (compressed transfer syntaxes through the
  pylibjpeg / pyjpegls plugins), then the modality LUT (rescale slope / intercept), then the VOI LUT or else
  the window (centre / width), as ``apply_voi_lut`` chooses; the output range of that LUT or window, or the
  min-max of the pixel data when the file names neither, maps to ``[0, 1]``. MONOCHROME1 is inverted so that
  it displays like MONOCHROME2. RGB (and YCbCr, which pydicom converts to RGB) becomes luma.
* **Guards before work.** Every failure is an `ImageReadError` naming the file and a short reason: missing,
  empty, not an image, unsupported format, truncated or corrupt, no pixel data, missing DICOM decoder, and
  too many pixels, which is checked from the header *before* decoding (a decompression-bomb guard with its
  own limit, `MAX_PIXELS`; Pillow's global ``Image.MAX_IMAGE_PIXELS`` is neither used nor changed).
* **Odd but readable inputs warn** (`warnings.warn`, one ``UserWarning`` per call naming the file): values
  spanning under 1/8 of their bit depth's range (a flat or mis-exported X-ray, 12-bit data in a 16-bit PNG),
  a multi-frame DICOM, an unusable DICOM window, an unreadable EXIF orientation, non-finite float values.
* **Resampling** in `to_square_uint8` squashes to a square without keeping the aspect ratio (as the
  research plan's ``Resize((256, 256))``) with Pillow's antialiased bilinear filter in float, then rounds to
  ``uint8``. For JPEG, `load_xray` lets libjpeg decode at a reduced DCT scale (``Image.draft``) that never
  falls below the target size: on 2000 x 1700 originals it halved the time of `load_xray` (2 cores, 20 -> 9
  ms), and the 256 x 256 result differs from full decoding by under 2 grey levels on average.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin

from pneumolab.errors import ImageReadError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "XrayMeta",
    "load_xray",
    "load_xray_with_meta",
    "read_xray",
    "to_square_uint8",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
"""File suffixes (lower-case) that dataset discovery treats as X-ray images."""

MAX_PIXELS: int = 60_000_000
"""Default pixel limit of `read_xray`, checked from the header before decoding (decompression-bomb guard)."""

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_AT = 128  # 128-byte preamble, then b"DICM"
_HEAD_BYTES = _DICOM_MAGIC_AT + 4
_NOT_AN_IMAGE = "not a JPEG, PNG or DICOM image"
_DICOM_EXTRA = 'pip install "pneumolab[dicom]"'
_LOW_SPAN = 1 / 8  # warn when values span less than this fraction of their range
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L")
# A DICOM header value quoted by pydicom in a warning or an error (a patient's name, an id): never repeated
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
# JPEG frame headers (SOF0-15 but DHT, JPG and DAC) and JPEG-LS's SOF55: where the declared size is
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# catch_warnings swaps process-wide state: DICOM reads that record pydicom's warnings take turns
_DICOM_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True)
class XrayMeta:
    """What a file says about itself, beside its pixels: the gate's metadata check reads it.

    Attributes:
        format: ``"JPEG"``, ``"PNG"`` or ``"DICOM"``.
        modality: DICOM Modality (upper case; empty when absent or not DICOM).
        body_part: DICOM BodyPartExamined (upper case; empty when absent).
        view_position: DICOM ViewPosition (upper case; empty when absent).
        frames: Number of frames (1 for JPEG and PNG).
        notes: Odd but readable things about the file (a flat range, an unusable window ...), for the file's line.
    """

    format: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    frames: int = 1
    notes: tuple[str, ...] = ()


def read_xray(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> np.ndarray:
    """Read a JPEG, PNG or DICOM X-ray into one grayscale array.

    Args:
        source: A path, or the file's bytes (as the web service receives an upload).
        name: The name used in error messages and to read the suffix; defaults to the path, or ``"<upload>"``
            for bytes.
        max_pixels: Refuse images with more pixels than this, checked from the header before decoding.
        draft_size: A hint that the caller will downscale to about this many pixels a side. JPEGs are then
            decoded at a reduced DCT scale that keeps both sides at least ``draft_size``.

    Returns:
        A 2-D ``np.float32`` array of shape ``(H, W)`` (after EXIF orientation) with values in ``[0, 1]``,
        0 = black as displayed (MONOCHROME1 already inverted).

    Raises:
        ImageReadError: The file is missing, empty, not a JPEG / PNG / DICOM image, truncated or corrupt,
            has no pixel data, needs a DICOM decoder that is not installed, or has over ``max_pixels`` pixels.
    """
    image, meta, label = _read(source, name, max_pixels, draft_size)
    if meta.notes:
        warnings.warn(f"{label}: {'; '.join(meta.notes)}", UserWarning, stacklevel=2)
    return image


def _read(
    source: str | os.PathLike[str] | bytes, name: str | None, max_pixels: int, draft_size: int | None
) -> tuple[np.ndarray, XrayMeta, str]:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be positive or None, got {draft_size}")
    src = _Source.resolve(source, name)
    issues: list[str] = []
    if src.is_dicom:
        image, tags = _read_dicom(src, max_pixels, issues)
        return image, XrayMeta("DICOM", **tags, notes=tuple(issues)), src.label
    image, fmt = _read_pil(src, max_pixels, draft_size, issues)
    return image, XrayMeta(fmt, notes=tuple(issues)), src.label


def to_square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a `read_xray` array to a ``size`` x ``size`` ``uint8`` square.

    The aspect ratio is not kept (the image is squashed, as ``Resize((size, size))`` does); resampling is
    Pillow's antialiased bilinear filter on 32-bit floats, and the result is rounded.

    Args:
        image: 2-D float array with values in ``[0, 1]``.
        size: Side of the output square, in pixels.

    Returns:
        A ``(size, size)`` ``np.uint8`` array.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = np.ascontiguousarray(image, dtype=np.float32)
    if arr.shape != (size, size):
        resized = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(resized)
    return np.clip(np.rint(arr * np.float32(255)), 0, 255).astype(np.uint8)


def load_xray(
    source: str | os.PathLike[str] | bytes,
    *,
    size: int,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read an X-ray and resize it to the model's square: the one preprocessing step shared by all callers.

    Equivalent to ``to_square_uint8(read_xray(source, draft_size=size, ...), size)``.

    Args:
        source: A path, or the file's bytes.
        size: Side of the output square, in pixels.
        name: The name used in error messages (see `read_xray`).
        max_pixels: Pixel limit checked before decoding (see `read_xray`).

    Returns:
        A ``(size, size)`` ``np.uint8`` array.

    Raises:
        ImageReadError: As `read_xray`.
    """
    image = read_xray(source, name=name, max_pixels=max_pixels, draft_size=size)
    return to_square_uint8(image, size)


def load_xray_with_meta(
    source: str | os.PathLike[str] | bytes,
    *,
    size: int,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, XrayMeta]:
    """`load_xray` that also returns what the file says about itself, and warns nothing.

    The odd-but-readable notes that `read_xray` would warn about (and pydicom's own warnings) are in
    ``meta.notes`` instead, so `predict` and the service can put them on the file's one line.
    """
    image, meta, _ = _read(source, name, max_pixels, size)
    return to_square_uint8(image, size), meta


# --- the source: a path or bytes, with its first bytes for sniffing ---------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str
    suffix: str
    head: bytes
    data: bytes | None = None
    path: Path | None = None

    @classmethod
    def resolve(cls, source: str | os.PathLike[str] | bytes, name: str | None) -> _Source:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            label = name or "<upload>"
            src = cls(label, _suffix(name), data[:_HEAD_BYTES], data=data)
            size = len(data)
        elif isinstance(source, str | os.PathLike):
            path = Path(source)
            label = name or str(path)
            try:
                if path.is_dir():
                    raise ImageReadError(label, "is a directory, not a file")
                size = path.stat().st_size
                with path.open("rb") as fp:
                    head = fp.read(_HEAD_BYTES)
            except FileNotFoundError as e:
                raise ImageReadError(label, "no such file") from e
            except PermissionError as e:
                raise ImageReadError(label, "permission denied") from e
            except OSError as e:
                raise ImageReadError(label, f"cannot read file: {e.strerror or e}") from e
            src = cls(label, _suffix(name or path.name), head, path=path)
        else:
            raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
        if size == 0:
            raise ImageReadError(label, "empty file (0 bytes)")
        return src

    @property
    def is_dicom(self) -> bool:
        if self.head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            return False
        return self.has_dicom_magic or self.suffix in _DICOM_SUFFIXES

    @property
    def has_dicom_magic(self) -> bool:
        return self.head[_DICOM_MAGIC_AT:_HEAD_BYTES] == b"DICM"

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None  # one of data / path is always set by resolve()
        try:
            return self.path.open("rb")
        except OSError as e:  # gone or locked since resolve()
            raise ImageReadError(self.label, f"cannot read file: {e.strerror or e}") from e


def _suffix(name: str | None) -> str:
    return Path(name).suffix.lower() if name else ""


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redacted(text: str) -> str:
    """`text` with every quoted value replaced: pydicom quotes header values (names, ids) in its messages."""
    return _QUOTED.sub("<value>", text)


def _corrupt(label: str, error: BaseException) -> ImageReadError:
    return ImageReadError(label, f"truncated or corrupt image data: {_redacted(_one_line(error))}")


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageReadError(
            label,
            f"image is {width} x {height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard)",
        )
    if pixels == 0:
        raise ImageReadError(label, f"image has no pixels ({width} x {height})")


def _note_low_span(values: np.ndarray, full: float, what: str, issues: list[str]) -> None:
    low, high = values.min(), values.max()
    if high - low < full * _LOW_SPAN:
        issues.append(
            f"{what} values span only {low:g}..{high:g} of 0..{full:g} (under 1/8 of the range), "
            "so the image will look flat; is it a mis-exported X-ray?"
        )


# --- JPEG and PNG through Pillow --------------------------------------------------------------------------


def _read_pil(src: _Source, max_pixels: int, draft_size: int | None, issues: list[str]) -> tuple[np.ndarray, str]:
    with src.open() as fp, _open_pil(fp, src) as im:
        _check_pixels(src.label, im.width, im.height, max_pixels)
        if draft_size is not None and im.format == "JPEG":
            im.draft("L", (draft_size, draft_size))  # DCT scaling: both sides stay >= draft_size
        try:
            im.load()
        except Exception as e:  # the decoders raise OSError, SyntaxError, ValueError ... on bad data
            raise _corrupt(src.label, e) from e
        _exif_transpose(im, issues)
        return _pil_to_float(im, src.label, issues), str(im.format or "PNG")


def _open_pil(fp: IO[bytes], src: _Source) -> Image.Image:
    """Open a PNG or JPEG (header only), or raise an `ImageReadError` that says what the file is instead.

    PNG and JPEG are opened with their plugin classes rather than `Image.open`, so that Pillow's global
    decompression-bomb limit does not apply: `max_pixels` is this module's one limit.
    """
    opener: type[Image.Image] | None = None
    if src.head.startswith(_PNG_MAGIC):
        opener = PngImagePlugin.PngImageFile
    elif src.head.startswith(_JPEG_MAGIC):
        opener = JpegImagePlugin.JpegImageFile
    if opener is None:
        raise ImageReadError(src.label, _what_else(fp))
    try:
        return opener(fp)
    except Exception as e:  # a broken header: SyntaxError, OSError, ValueError ...
        raise _corrupt(src.label, e) from e


def _what_else(fp: IO[bytes]) -> str:
    """The reason to refuse a file that is neither PNG nor JPEG: the format Pillow knows it by, if any."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                fmt = im.format
    except Image.DecompressionBombError:
        return "unsupported image format (also over Pillow's size limit); expected JPEG, PNG or DICOM"
    except Exception:  # UnidentifiedImageError, or a plugin that chokes on random bytes
        return _NOT_AN_IMAGE
    return f"unsupported format {fmt}; expected JPEG, PNG or DICOM"


def _exif_transpose(im: Image.Image, issues: list[str]) -> None:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:  # a malformed EXIF block should not cost the image
        issues.append(f"could not apply the EXIF orientation ({_one_line(e)}); used the image as stored")


def _pil_to_float(im: Image.Image, label: str, issues: list[str]) -> np.ndarray:
    """A loaded Pillow image -> 2-D float32 in [0, 1], keeping 16-bit precision where there is any."""
    if im.mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N
        return _scale(np.asarray(im), 65535, "16-bit", issues)
    if im.mode == "I":
        return _int_to_float(np.asarray(im), issues)
    if im.mode == "F":
        return _float_to_unit(np.asarray(im), issues)
    if im.mode != "L":
        im = _to_luma8(im, label)
    return _scale(np.asarray(im), 255, "8-bit", issues)


def _to_luma8(im: Image.Image, label: str) -> Image.Image:
    try:
        if im.mode in ("P", "PA"):  # via RGBA: a palette's transparency is then plain alpha, ignored below
            im = im.convert("RGBA")
        return im.convert("L")  # 1, LA, RGB, RGBA, CMYK, YCbCr ...: luma (ITU-R 601), alpha dropped
    except ValueError as e:
        raise ImageReadError(label, f"unsupported pixel mode {im.mode}") from e


def _scale(values: np.ndarray, full: float, what: str, issues: list[str]) -> np.ndarray:
    _note_low_span(values, full, what, issues)
    return values.astype(np.float32) / np.float32(full)


def _int_to_float(values: np.ndarray, issues: list[str]) -> np.ndarray:
    if values.min() < 0:
        issues.append("negative pixel values were clipped to 0")
        values = np.clip(values, 0, None)
    high = int(values.max())
    return _scale(values, 65535 if high <= 65535 else high, "32-bit integer", issues)


def _float_to_unit(values: np.ndarray, issues: list[str]) -> np.ndarray:
    values = values.astype(np.float32)  # a copy: the input may be read-only
    finite = np.isfinite(values)
    if not finite.all():
        issues.append("NaN or infinite pixel values were replaced by the lowest finite value")
        values[~finite] = values[finite].min() if finite.any() else 0.0
    low, high = values.min(), values.max()
    if low >= 0 and high <= 1:
        return values
    if high > low:
        return (values - low) / (high - low)
    return np.zeros_like(values)


# --- DICOM through pydicom --------------------------------------------------------------------------------


def _read_dicom(src: _Source, max_pixels: int, issues: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The first frame as [0, 1] gray, and the tags the input gate reads; pydicom's warnings become notes."""
    pydicom = _import_pydicom(src.label)
    with _DICOM_WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image, ds = _decode_dicom(pydicom, src, max_pixels, issues)
            tags = {  # read inside: pydicom validates a value when it is first read, and warns quoting it
                "modality": _tag(ds, "Modality"),
                "body_part": _tag(ds, "BodyPartExamined"),
                "view_position": _tag(ds, "ViewPosition"),
                "frames": _frame_count(ds),
            }
        finally:
            issues.extend(dict.fromkeys(_redacted(_one_line(w.message)) for w in caught))  # each message once
    return image, tags


def _tag(ds: Any, keyword: str) -> str:
    return " ".join(str(ds.get(keyword) or "").split()).upper()


def _decode_dicom(pydicom: ModuleType, src: _Source, max_pixels: int, issues: list[str]) -> tuple[np.ndarray, Any]:
    ds = _dcmread(pydicom, src)
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows is None or columns is None:
        raise ImageReadError(src.label, "truncated or corrupt image data: DICOM header has no Rows / Columns")
    _check_pixels(src.label, int(columns), int(rows), max_pixels)
    frames = _frame_count(ds)
    if frames > 1:
        issues.append(f"multi-frame DICOM ({frames} frames): using the first")
    pixels = _decode_first_frame(pydicom, ds, src.label, max_pixels)

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            image = _dicom_gray(pydicom, pixels, ds, issues)
            return (1 - image if photometric == "MONOCHROME1" else image), ds
        if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB; pydicom already converted YBR_* to RGB
            full = 2 ** int(ds.get("BitsStored", 8)) - 1
            return np.clip(pixels @ _LUMA / full, 0, 1).astype(np.float32), ds
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as e:
        raise ImageReadError(src.label, f"invalid DICOM image attributes: {_one_line(e)}") from e
    raise ImageReadError(src.label, f"unsupported DICOM photometric interpretation {photometric}")


def _import_pydicom(label: str) -> ModuleType:
    try:
        import pydicom
        import pydicom.encaps
        import pydicom.pixels
    except ImportError as e:
        raise ImageReadError(label, f"reading DICOM needs pydicom: {_DICOM_EXTRA}") from e
    return pydicom


def _dcmread(pydicom: ModuleType, src: _Source) -> Any:
    """Parse the DICOM file; without the ``DICM`` marker (a legacy file by its suffix) read it by force."""
    with src.open() as fp:
        try:
            ds = pydicom.dcmread(fp, force=not src.has_dicom_magic)
        except Exception as e:  # InvalidDicomError, EOFError, struct.error, ValueError ...
            if not src.has_dicom_magic:
                raise ImageReadError(src.label, _NOT_AN_IMAGE) from e
            raise _corrupt(src.label, e) from e
    if "PixelData" not in ds:
        if not src.has_dicom_magic:  # forced parsing of a file with no marker and no pixels: not DICOM at all
            raise ImageReadError(src.label, _NOT_AN_IMAGE)
        raise ImageReadError(src.label, "DICOM file has no pixel data (not an image object, or truncated)")
    _ensure_transfer_syntax(pydicom, ds)
    return ds


def _ensure_transfer_syntax(pydicom: ModuleType, ds: Any) -> None:
    """Legacy files without file meta: name the transfer syntax they were parsed with, which pydicom needs."""
    if ds.get("file_meta") is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    uid = pydicom.uid
    if implicit:
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian


def _frame_count(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _check_codestream(pydicom: ModuleType, ds: Any, label: str, max_pixels: int) -> None:
    """Check the size the compressed first frame declares before a decoder allocates for it.

    The header's Rows x Columns is checked first (`_decode_dicom`), but a JPEG or JPEG 2000 decoder allocates what
    its own codestream says: a 5 KB file whose header says 512 x 512 and whose J2K data says 50000 x 50000 made
    openjpeg allocate 3.7 GB. A frame that declares another size than the header is refused as corrupt; RLE carries
    no size of its own (its decoder uses the header's).
    """
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=_frame_count(ds)))
    except Exception as e:  # no item tag, a fragment that overruns the data ...
        raise _corrupt(label, e) from e
    declared = _declared_size(frame)
    if declared is None:
        if ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless:
            return
        raise ImageReadError(label, "truncated or corrupt image data: the compressed frame has no readable header")
    width, height = declared
    _check_pixels(label, width, height, max_pixels)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if (width, height) != (columns, rows):
        raise ImageReadError(
            label,
            f"corrupt DICOM: the compressed frame declares {width} x {height} pixels but the header {columns} x {rows}",
        )


def _declared_size(codestream: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 SIZ segment (bare or in a JP2 box) or a JPEG / JPEG-LS frame header."""
    start = codestream.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ
    if start >= 0 and len(codestream) >= start + 24:
        x, y, x0, y0 = struct.unpack(">4I", codestream[start + 8 : start + 24])  # after Lsiz and Rsiz
        return max(0, x - x0), max(0, y - y0)
    if codestream[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 9 <= len(codestream):
        if codestream[offset] != 0xFF:
            return None
        marker = codestream[offset + 1]
        if marker == 0xFF:  # a fill byte before a marker
            offset += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", codestream[offset + 5 : offset + 9])
            return width, height
        offset += 2 + struct.unpack(">H", codestream[offset + 2 : offset + 4])[0]
    return None


def _decode_first_frame(pydicom: ModuleType, ds: Any, label: str, max_pixels: int) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as e:
        raise ImageReadError(label, f"unsupported DICOM transfer syntax {syntax.name} ({syntax})") from e
    if not decoder.is_available:
        raise ImageReadError(
            label,
            f"no decoder installed for DICOM transfer syntax {syntax.name}; install one: {_DICOM_EXTRA}",
        )
    if syntax.is_encapsulated:
        _check_codestream(pydicom, ds, label, max_pixels)
    try:
        return pydicom.pixels.pixel_array(ds, index=0)
    except Exception as e:  # short pixel data, a broken codestream, bad attributes ...
        raise _corrupt(label, e) from e


def _dicom_gray(pydicom: ModuleType, pixels: np.ndarray, ds: Any, issues: list[str]) -> np.ndarray:
    """Modality LUT, then VOI LUT or window (else the data's min-max), mapped to [0, 1] as MONOCHROME2."""
    values = pydicom.pixels.apply_modality_lut(pixels, ds)
    voi = _apply_voi(pydicom.pixels, values, ds, issues)
    if voi is None:
        low, high = values.min(), values.max()
    else:
        values, low, high = voi
    if high == low:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - low) / (high - low), 0, 1).astype(np.float32)


def _apply_voi(
    processing: ModuleType, values: np.ndarray, ds: Any, issues: list[str]
) -> tuple[np.ndarray, float, float] | None:
    """Apply the file's VOI LUT, else its window, as ``apply_voi_lut`` would; also return the output range.

    Returns ``None`` when the file has neither, or an unusable window (then noted in ``issues``).
    """
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        first, entries = sequence[0].LUTDescriptor[1], sequence[0].LUTDescriptor[0] or 2**16
        lut = processing.apply_voi(np.arange(first, first + entries), ds)
        mapped = processing.apply_voi(np.rint(values).astype(np.int64), ds)  # LUT indices are integers
        return mapped, float(lut.min()), float(lut.max())
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        mapped = processing.apply_windowing(values, ds)
        # A window sends all below it to its lowest output, all above to its highest: ask pydicom for both.
        low, high = processing.apply_windowing(np.array([-np.inf, np.inf]), ds)
    except ValueError as e:  # a width under 1, an unknown VOI LUT function ...
        issues.append(f"unusable DICOM window ({_one_line(e)}); scaled the pixel range instead")
        return None
    return mapped, float(low), float(high)
