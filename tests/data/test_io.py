"""Tests of `pneumolab.data.io`: every image is generated here, in memory or under tmp_path."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pneumolab.data import io as xio
from pneumolab.data.io import IMAGE_SUFFIXES, MAX_PIXELS, load_xray, read_xray, to_square_uint8
from pneumolab.errors import ImageReadError

LUMA = np.array([0.299, 0.587, 0.114])


# --- builders ---------------------------------------------------------------------------------------------


def smooth_xray(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 chest-like picture: bright body, two dark lungs, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    image = 60 + 140 * np.exp(-(((xx - 0.5) / 0.45) ** 2))
    for cx in (0.3, 0.7):
        image -= 80 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.28) ** 2))
    image += 6 * rng.standard_normal((height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a scrap of IDAT: only a header check can be fast on it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def huge_jpeg_header(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 header claiming width x height (one component), SOS: a header and no data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x00" * 64


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """An uncompressed Explicit VR Little Endian secondary-capture dataset around 12-bit grayscale pixels.

    ``pixels`` is (rows, columns) or (frames, rows, columns); ``attrs`` set or override any element.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # 128-byte preamble + "DICM" + file meta
    return buffer.getvalue()


def pixels12(rows: int = 48, columns: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (rows, columns), dtype=np.uint16)


def dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, mapped to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def read_quietly(source: bytes | Path, **kwargs: object) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return read_xray(source, **kwargs)


# --- public constants -------------------------------------------------------------------------------------


def test_constants() -> None:
    assert {".jpeg", ".jpg", ".png", ".dcm", ".dicom"} == IMAGE_SUFFIXES
    assert all(suffix == suffix.lower() for suffix in IMAGE_SUFFIXES)
    assert MAX_PIXELS == 60_000_000


# --- JPEG and PNG: properties over modes and sizes --------------------------------------------------------

# mode -> formats it can be saved as
MODE_FORMATS = {
    "L": ("PNG", "JPEG"),
    "RGB": ("PNG", "JPEG"),
    "RGBA": ("PNG",),
    "P": ("PNG",),
    "CMYK": ("JPEG",),
    "I;16": ("PNG",),
    "LA": ("PNG",),
    "1": ("PNG",),
}


@st.composite
def pil_images(draw: st.DrawFn) -> tuple[Image.Image, str, np.ndarray]:
    """(image, format, the raw pixels it was built from) of random mode, size and content."""
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    fmt = draw(st.sampled_from(MODE_FORMATS[mode]))
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2}.get(mode)
    if mode == "I;16":
        pixels = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        return Image.fromarray(pixels), fmt, pixels
    shape = (height, width) if channels is None else (height, width, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(pixels > 127).convert("1"), fmt, pixels > 127
    if mode == "P":
        image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if draw(st.booleans()):
            image.info["transparency"] = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
        return image, fmt, pixels
    return Image.frombytes(mode, (width, height), pixels.tobytes()), fmt, pixels


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pil_images(), as_path=st.booleans())
def test_any_mode_and_size_reads_to_unit_float(
    case: tuple[Image.Image, str, np.ndarray], as_path: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image, fmt, pixels = case
    data = encode(image, fmt)
    if as_path:
        path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
        path.write_bytes(data)
        out = read_quietly(path)
    else:
        out = read_quietly(data)

    assert out.dtype == np.float32
    assert out.shape == (image.height, image.width)
    assert out.min() >= 0 and out.max() <= 1
    if fmt != "PNG":
        return
    if image.mode == "I;16":
        np.testing.assert_array_equal(out, pixels.astype(np.float32) / np.float32(65535))
    elif image.mode == "L":
        np.testing.assert_array_equal(out, pixels.astype(np.float32) / np.float32(255))
    elif image.mode == "1":
        np.testing.assert_array_equal(out, pixels.astype(np.float32))
    elif image.mode == "LA":  # alpha ignored
        np.testing.assert_array_equal(out, pixels[..., 0].astype(np.float32) / np.float32(255))
    elif image.mode in ("RGB", "RGBA"):  # luma, alpha ignored
        np.testing.assert_allclose(out, pixels[..., :3] @ LUMA / 255, atol=1 / 255 + 1e-6)


def test_palette_with_transparency_is_luma_of_its_colours() -> None:
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * 759)
    palette.putdata([0, 1, 2, 1, 0, 1, 2, 1])
    palette.info["transparency"] = bytes([0, 255, 128] + [255] * 253)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's palette-transparency warning
        out = read_xray(encode(palette, "PNG"))
    expected = np.array([[0, 255, 76, 255], [0, 255, 76, 255]], np.float32) / np.float32(255)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_16bit_png_keeps_precision() -> None:
    pixels = np.array([[30000, 30001, 0, 65535]], np.uint16)
    out = read_quietly(encode(Image.fromarray(pixels), "PNG"))
    assert out[0, 0] < out[0, 1]
    assert out[0, 1] - out[0, 0] == pytest.approx(1 / 65535, rel=1e-3)
    assert (out[0, 2], out[0, 3]) == (0.0, 1.0)


def test_modes_i_and_f_are_scaled() -> None:
    # Pillow 13 opens every 16-bit PNG as I;16, so modes I and F never come out of a PNG or JPEG here: test
    # the converter itself, since other Pillow versions may hand them over.
    issues: list[str] = []
    wide = Image.fromarray(np.array([[0, 1000, 131070]], np.int32))  # over 16 bits: divided by its max
    np.testing.assert_allclose(xio._pil_to_float(wide, "i", issues), [[0, 1000 / 131070, 1]], rtol=1e-6)
    narrow = Image.fromarray(np.array([[0, 65535]], np.int32))
    np.testing.assert_array_equal(xio._pil_to_float(narrow, "i", issues), [[0, 1]])
    in_range = Image.fromarray(np.array([[0.25, 0.5]], np.float32))
    np.testing.assert_array_equal(xio._pil_to_float(in_range, "f", issues), [[0.25, 0.5]])
    out_of_range = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(xio._pil_to_float(out_of_range, "f", issues), [[0, 0.5, 1]])
    with_nan = Image.fromarray(np.array([[np.nan, 0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(xio._pil_to_float(with_nan, "f", issues), [[0.5, 0.5, 1]])
    assert any("NaN" in issue for issue in issues)


def test_constant_image_is_returned_with_a_warning() -> None:
    grey = Image.new("L", (20, 10), 128)
    with pytest.warns(UserWarning, match=r"flat\.png: 8-bit values span only 128\.\.128") as record:
        out = read_xray(encode(grey, "PNG"), name="flat.png")
    assert len(record) == 1
    np.testing.assert_array_equal(out, np.full((10, 20), 128 / 255, np.float32))


def test_low_contrast_8bit_warns_once_and_normal_image_does_not() -> None:
    dim = Image.fromarray(np.tile(np.arange(100, 120, dtype=np.uint8), (8, 1)))
    with pytest.warns(UserWarning, match="under 1/8 of the range") as record:
        read_xray(encode(dim, "PNG"), name="dim.png")
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_xray(encode(Image.fromarray(smooth_xray(64, 64)), "PNG"))


def test_12bit_data_in_16bit_png_warns() -> None:
    pixels = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    with pytest.warns(UserWarning, match=r"16-bit values span only 0\.\.4080 of 0\.\.65535"):
        read_xray(encode(Image.fromarray(pixels), "PNG"))


def test_jpeg_exif_orientation_6_is_applied() -> None:
    stored = np.zeros((20, 40), np.uint8)  # 40 wide, 20 high as stored
    stored[:6, :6] = 255  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)

    out = read_xray(data)

    assert out.shape == (40, 20)  # upright: 20 wide, 40 high
    assert out[:6, -6:].mean() > 0.9  # stored top-left is now the top-right
    assert out[:6, :6].mean() < 0.1 and out[-6:, -6:].mean() < 0.1


# --- DICOM ------------------------------------------------------------------------------------------------


def test_dicom_monochrome2_is_min_max_scaled() -> None:
    pixels = pixels12()
    out = read_xray(dicom_bytes(dicom_dataset(pixels)), name="a.dcm")
    low, high = pixels.min(), pixels.max()
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, (pixels - low) / (high - low), atol=1e-6)


def test_dicom_monochrome1_is_inverted() -> None:
    pixels = pixels12()
    mono2 = read_xray(dicom_bytes(dicom_dataset(pixels)))
    mono1 = read_xray(dicom_bytes(dicom_dataset(pixels, "MONOCHROME1")))
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)


def test_dicom_window_clips_as_the_standard_says() -> None:
    pixels = pixels12()
    out = read_xray(dicom_bytes(dicom_dataset(pixels, WindowCenter=2048, WindowWidth=1024)))
    np.testing.assert_allclose(out, dicom_window(pixels, 2048, 1024), atol=1e-6)
    assert (out == 0).any() and (out == 1).any()


def test_dicom_rescale_is_applied_before_the_window() -> None:
    pixels = pixels12()
    ds = dicom_dataset(pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2000)
    out = read_xray(dicom_bytes(ds))
    np.testing.assert_allclose(out, dicom_window(2.0 * pixels - 1000, 3000, 2000), atol=1e-6)


def test_dicom_rescale_without_window_keeps_the_picture() -> None:
    pixels = pixels12()
    plain = read_xray(dicom_bytes(dicom_dataset(pixels)))
    rescaled = read_xray(dicom_bytes(dicom_dataset(pixels, RescaleSlope=0.5, RescaleIntercept=-1024)))
    np.testing.assert_allclose(rescaled, plain, atol=1e-6)


def test_dicom_unusable_window_warns_and_falls_back_to_min_max() -> None:
    pixels = pixels12()
    plain = read_xray(dicom_bytes(dicom_dataset(pixels)))
    with pytest.warns(UserWarning, match="unusable DICOM window"):
        out = read_xray(dicom_bytes(dicom_dataset(pixels, WindowCenter=100, WindowWidth=0)))
    np.testing.assert_array_equal(out, plain)


COMPRESSED = {"rle": RLELossless, "jpeg2000": JPEG2000Lossless, "jpegls": JPEGLSLossless}


@pytest.mark.parametrize("syntax", COMPRESSED.values(), ids=list(COMPRESSED))
def test_compressed_dicom_decodes_like_uncompressed(syntax: pydicom.uid.UID) -> None:
    pixels = pixels12(64, 48, seed=1)
    reference = read_xray(dicom_bytes(dicom_dataset(pixels, "MONOCHROME1")))
    ds = dicom_dataset(pixels, "MONOCHROME1")
    ds.compress(syntax)  # RLE: pydicom; JPEG 2000: pylibjpeg-openjpeg; JPEG-LS: pyjpegls
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_xray(dicom_bytes(ds), name="c.dcm"), reference)


def test_dicom_bytes_without_a_name_are_found_by_magic(tmp_path: Path) -> None:
    pixels = pixels12()
    data = dicom_bytes(dicom_dataset(pixels))
    assert data[128:132] == b"DICM"
    from_bytes = read_xray(data)  # no name, no suffix
    odd_name = tmp_path / "scan.bin"
    odd_name.write_bytes(data)
    np.testing.assert_array_equal(from_bytes, read_xray(odd_name))
    np.testing.assert_array_equal(from_bytes, read_xray(data, name="scan.png"))  # content wins over name


def test_legacy_dicom_without_preamble_is_read_by_suffix() -> None:
    pixels = pixels12()
    ds = dicom_dataset(pixels)
    del ds.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    data = buffer.getvalue()
    expected = read_xray(dicom_bytes(dicom_dataset(pixels)))
    np.testing.assert_array_equal(read_xray(data, name="old.dcm"), expected)
    with pytest.raises(ImageReadError, match="not a JPEG, PNG or DICOM image"):
        read_xray(data)  # without the suffix nothing says it is DICOM


def test_multiframe_dicom_uses_the_first_frame_and_warns() -> None:
    first, second = pixels12(seed=2), pixels12(seed=3)
    single = read_xray(dicom_bytes(dicom_dataset(first)))
    with pytest.warns(UserWarning, match=r"multi-frame DICOM \(2 frames\): using the first"):
        out = read_xray(dicom_bytes(dicom_dataset(np.stack([first, second]))))
    np.testing.assert_array_equal(out, single)


def test_rgb_dicom_becomes_luma() -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ds = dicom_dataset(pixels12(24, 32), "RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    out = read_xray(dicom_bytes(ds))
    assert out.shape == (24, 32)
    np.testing.assert_allclose(out, rgb @ LUMA / 255, atol=1e-6)


def test_dicom_missing_decoder_names_the_syntax_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = dicom_dataset(pixels12(64, 48))
    ds.compress(JPEG2000Lossless)
    # Simulate an environment without pylibjpeg-openjpeg (and Pillow's JPEG 2000): the decoder has no plugins.
    monkeypatch.setattr(pydicom.pixels.get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(ImageReadError) as error:
        read_xray(dicom_bytes(ds), name="j2k.dcm")
    assert "JPEG 2000 Image Compression (Lossless Only)" in str(error.value)
    assert 'pip install "pneumolab[dicom]"' in str(error.value)


def test_dicom_unsupported_transfer_syntax() -> None:
    ds = dicom_dataset(pixels12())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(ImageReadError, match="unsupported DICOM transfer syntax MPEG2"):
        read_xray(dicom_bytes(ds), name="video.dcm")


# --- the bad corpus ---------------------------------------------------------------------------------------


def _valid_jpeg() -> bytes:
    return encode(Image.fromarray(smooth_xray(120, 100)), "JPEG", quality=90)


def _gif() -> bytes:
    return encode(Image.fromarray(smooth_xray(16, 16)), "GIF")


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("lung.png", encode(Image.fromarray(smooth_xray(16, 16)), "PNG"))
    return buffer.getvalue()


def _dicom_without_pixels() -> bytes:
    ds = dicom_dataset(pixels12())
    del ds.PixelData
    return dicom_bytes(ds)


def _truncated_dicom() -> bytes:
    return dicom_bytes(dicom_dataset(pixels12()))[:-100]


BAD_CORPUS = [
    # (file name, bytes builder or None for a missing file, reason fragment)
    ("empty.jpeg", lambda: b"", "empty file (0 bytes)"),
    ("half.jpeg", lambda: _valid_jpeg()[: len(_valid_jpeg()) // 2], "truncated or corrupt image data"),
    ("notes.jpeg", lambda: b"Patient notes: nothing to see here.\n" * 20, "not a JPEG, PNG or DICOM image"),
    ("notes.dcm", lambda: b"Patient notes: nothing to see here.\n" * 20, "not a JPEG, PNG or DICOM image"),
    (
        "huge.png",
        lambda: huge_png_header(30000, 30000),
        "image is 30000 x 30000 = 900,000,000 pixels, over the limit of 60,000,000 (decompression-bomb guard)",
    ),
    ("huge.jpeg", lambda: huge_jpeg_header(65000, 1000), "65000 x 1000 = 65,000,000 pixels, over the limit"),
    ("anim.gif", _gif, "unsupported format GIF; expected JPEG, PNG or DICOM"),
    ("scan.tif", lambda: encode(Image.new("L", (8, 8)), "TIFF"), "unsupported format TIFF"),
    ("scan.bmp", lambda: encode(Image.new("L", (8, 8)), "BMP"), "unsupported format BMP"),
    ("archive.png", _zip, "not a JPEG, PNG or DICOM image"),
    ("missing.png", None, "no such file"),
    ("report.dcm", _dicom_without_pixels, "DICOM file has no pixel data"),
    ("cut.dcm", _truncated_dicom, "truncated or corrupt image data"),
    ("header-only.png", lambda: huge_png_header(64, 64)[:40], "truncated or corrupt image data"),
]


@pytest.mark.parametrize(("name", "build", "reason"), BAD_CORPUS, ids=[case[0] for case in BAD_CORPUS])
def test_bad_files_raise_image_read_error(name: str, build, reason: str, tmp_path: Path) -> None:
    path = tmp_path / name
    if build is not None:
        path.write_bytes(build())
    with pytest.raises(ImageReadError) as error:
        read_xray(path)
    assert error.value.path == str(path)
    assert name in str(error.value)
    assert reason in str(error.value)
    assert "\n" not in str(error.value)
    if build is not None:  # the same bytes as an upload name the upload
        with pytest.raises(ImageReadError) as upload:
            read_xray(path.read_bytes(), name=f"upload-{name}")
        assert str(upload.value) == f"upload-{name}: {error.value.reason}"


def test_directory_and_default_upload_name(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="is a directory"):
        read_xray(tmp_path)
    with pytest.raises(ImageReadError, match=r"^<upload>: empty file \(0 bytes\)$"):
        read_xray(b"")


def test_pixel_limit_is_the_callers_and_pil_global_is_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.fromarray(smooth_xray(100, 100)), "PNG")
    with pytest.raises(ImageReadError, match="100 x 100 = 10,000 pixels, over the limit of 9,999"):
        read_xray(data, max_pixels=9_999)
    assert read_xray(data, max_pixels=10_000).shape == (100, 100)
    assert before == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError, match="over the limit of 1,000"):
        read_xray(dicom_bytes(dicom_dataset(pixels12())), max_pixels=1_000)


# --- to_square_uint8 and load_xray ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 120), width=st.integers(1, 120), size=st.integers(1, 64))
def test_to_square_uint8_shape_dtype_and_range(height: int, width: int, size: int) -> None:
    image = np.random.default_rng(height * width).random((height, width), dtype=np.float32)
    out = to_square_uint8(image, size)
    assert out.shape == (size, size) and out.dtype == np.uint8


def test_to_square_uint8_rounds_and_squashes() -> None:
    assert to_square_uint8(np.full((3, 3), 0.5, np.float32), 3).tolist() == [[128] * 3] * 3
    assert (to_square_uint8(np.ones((10, 40), np.float32), 8) == 255).all()
    assert (to_square_uint8(np.zeros((40, 10), np.float32), 8) == 0).all()
    left_dark = np.zeros((20, 80), np.float32)
    left_dark[:, 40:] = 1
    out = to_square_uint8(left_dark, 16)  # squashed, not cropped: the halves stay halves
    assert (out[:, :7] == 0).all() and (out[:, 9:] == 255).all()
    with pytest.raises(ValueError, match="2-D"):
        to_square_uint8(np.zeros((4, 4, 3), np.float32), 4)


def test_load_xray_is_read_then_square(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(smooth_xray(90, 70)).save(path)
    out = load_xray(path, size=32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, to_square_uint8(read_xray(path), 32))
    dicom = load_xray(dicom_bytes(dicom_dataset(pixels12())), size=16)
    assert dicom.shape == (16, 16) and dicom.dtype == np.uint8


def test_draft_decoding_of_a_large_jpeg_matches_full_decoding() -> None:
    big = Image.fromarray(smooth_xray(1700, 2000, seed=5))  # 2000 wide x 1700 high, like the originals
    rgb_jpeg = encode(big.convert("RGB"), "JPEG", quality=90)
    gray_jpeg = encode(big, "JPEG", quality=90)
    for data in (gray_jpeg, rgb_jpeg):
        drafted = read_xray(data, draft_size=256)
        assert min(drafted.shape) >= 256 and drafted.shape[0] < 1700  # a reduced DCT scale was used
        full = to_square_uint8(read_xray(data), 256)
        fast = load_xray(data, size=256)
        assert fast.shape == (256, 256)
        assert np.abs(fast.astype(np.int16) - full).mean() < 2
