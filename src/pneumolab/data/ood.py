"""Out-of-distribution inputs for measuring the input gate, built at run time from what the machine has.

Nothing here is committed as an image: the far corpus is drawn from pictures that ship inside installed packages
(scikit-image's ``skimage.data``, matplotlib's sample data, pydicom's test files) and from synthetic pictures
(noise, flat and gradient images, rendered text, charts, checkerboards); the near corpus is made from real films
handed in by the caller (rotated, negated, cropped), so a test or benchmark makes it from the dataset it reads.

Sources: scikit-image data (BSD-3 and public-domain pictures, `skimage/data/README.txt`), pydicom's test files
(`pydicom/data/test_files`, MIT and public test data), matplotlib's sample data.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["NEAR_KINDS", "dicom_test_files", "far_ood_pictures", "near_ood", "write_far_ood_corpus"]

NEAR_KINDS = ("rot90", "negated", "corner_zoom", "lateral_crop")
"""The near out-of-distribution variants `near_ood` makes of a film."""

_SKIMAGE_SKIP = {"lbpcascade_frontalface_opencv.xml", "motorcycle_disp.npz", "README.txt"}
_TEXT = (
    "patient consent form radiology department please sign below the examination was explained to me "
    "invoice total amount due within thirty days quarterly report revenue growth chest pain follow up "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore"
)


def _skimage_pictures() -> Iterator[tuple[str, np.ndarray]]:
    try:
        import skimage.data
    except ImportError:
        return
    folder = Path(skimage.data.__file__).parent
    for path in sorted(folder.iterdir()):
        if path.name in _SKIMAGE_SKIP or path.suffix.lower() not in {".png", ".jpg", ".gif", ".tif"}:
            continue
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError:  # a format this Pillow build cannot read (scikit-image's multi-page TIFFs)
            continue
        yield f"skimage-{path.stem}", pixels
    faces = folder / "lfw_subset.npy"
    if faces.is_file():  # 25 x 25 grey faces in [0, 1]; a few, tiled and alone
        stack = np.load(faces)
        for i in range(0, min(len(stack), 40), 8):
            yield f"skimage-face{i}", (stack[i] * 255).astype(np.uint8)
        tiles = np.concatenate([np.concatenate(list(stack[r * 8 : r * 8 + 8]), 1) for r in range(8)], 0)
        yield "skimage-faces-tiled", (tiles * 255).astype(np.uint8)


def _text_page(rng: np.random.Generator, side: int = 512, dark: bool = False) -> np.ndarray:
    page = Image.new("L", (side, side), 20 if dark else 245)
    draw = ImageDraw.Draw(page)
    y = 12
    while y < side - 16:
        line = " ".join(rng.choice(_TEXT.split(), size=int(rng.integers(4, 9))))
        draw.text((12, y), line, fill=230 if dark else 15)
        y += int(rng.integers(12, 22))
    return np.asarray(page)


def _chart(rng: np.random.Generator, kind: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(4, 4), dpi=80)
    x = np.arange(12)
    if kind == "bars":
        axes.bar(x, rng.uniform(1, 10, 12))
    elif kind == "lines":
        axes.plot(x, np.cumsum(rng.normal(size=12)), x, np.cumsum(rng.normal(size=12)))
    else:
        axes.scatter(rng.normal(size=200), rng.normal(size=200), s=6)
    axes.set_title(f"quarterly {kind}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("RGB"))


def _synthetic(seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    side = 256
    for i in range(4):
        yield f"noise-uniform{i}", rng.integers(0, 256, (side, side), dtype=np.uint8)
        yield f"noise-gauss{i}", np.clip(rng.normal(128, 40 + 10 * i, (side, side)), 0, 255).astype(np.uint8)
        yield f"noise-colour{i}", rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        coarse = rng.integers(0, 256, (8 * (i + 1), 8 * (i + 1)), dtype=np.uint8)
        yield f"noise-blocks{i}", np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.NEAREST))
    for level in (0, 60, 128, 200, 255):
        yield f"flat{level}", np.full((side, side), level, np.uint8)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    yield "gradient-horizontal", np.tile(ramp, (side, 1)).astype(np.uint8)
    yield "gradient-vertical", np.tile(ramp[:, None], (1, side)).astype(np.uint8)
    yy, xx = np.mgrid[-1 : 1 : side * 1j, -1 : 1 : side * 1j]
    yield "gradient-radial", np.clip(255 * (1 - np.hypot(xx, yy) / np.sqrt(2)), 0, 255).astype(np.uint8)
    yield "gradient-radial-dark", np.clip(255 * np.hypot(xx, yy) / np.sqrt(2), 0, 255).astype(np.uint8)
    for cells in (2, 8, 32):
        board = (np.indices((side, side)) // (side // cells)).sum(0) % 2
        yield f"checkerboard{cells}", (board * 255).astype(np.uint8)
    for i in range(4):
        yield f"text-page{i}", _text_page(rng, dark=i % 2 == 1)
    for kind in ("bars", "lines", "scatter"):
        yield f"chart-{kind}", _chart(rng, kind)


def far_ood_pictures(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Pictures that are plainly not chest X-rays: ``(name, uint8 H x W or H x W x 3 array)``.

    Photos and scientific pictures from scikit-image (when installed), documents, charts, noise, flat and gradient
    images and checkerboards made here.
    """
    return [*_skimage_pictures(), *_synthetic(seed)]


def write_far_ood_corpus(dest: str | os.PathLike[str], seed: int = 0) -> list[Path]:
    """Write `far_ood_pictures` as PNG (photos also as JPEG) into `dest`; return the files in a stable order."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for name, pixels in far_ood_pictures(seed):
        image = Image.fromarray(pixels)
        path = dest / f"{name}.png"
        image.save(path)
        files.append(path)
        if name.startswith("skimage-") and pixels.ndim == 3:  # photos arrive as JPEG from phones and cameras
            jpeg = dest / f"{name}.jpg"
            image.save(jpeg, quality=90)
            files.append(jpeg)
    return files


@functools.lru_cache(maxsize=1)
def _dicom_test_files() -> tuple[tuple[Path, str], ...]:
    try:
        import pydicom
        import pydicom.data
    except ImportError:
        return ()
    import warnings

    # the files inside the package only: pydicom's get_testdata_files would also try to download more
    folder = Path(pydicom.data.__file__).parent / "test_files"
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about its own deliberately odd test files
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, force=True, defer_size="1 KB")  # pixel data left on disk
            except Exception:  # a deliberately broken test file, or not DICOM at all
                continue
            if "PixelData" in ds:
                found.append((path, str(ds.get("Modality") or "").strip().upper()))
    return tuple(found)


def dicom_test_files(modalities: set[str] | None = None) -> list[tuple[Path, str]]:
    """pydicom's bundled test files that hold pixel data: ``(path, Modality or "")``, optionally only `modalities`.

    Empty when pydicom is not installed. Only the files shipped in the package are listed (no download).
    """
    return [(path, modality) for path, modality in _dicom_test_files() if modalities is None or modality in modalities]


def near_ood(films: np.ndarray, kind: str) -> np.ndarray:
    """Near out-of-distribution versions of uint8 N x S x S films: one of `NEAR_KINDS`.

    ``rot90``: turned a quarter; ``negated``: polarity inverted (bone dark); ``corner_zoom``: the top-left quarter
    blown up to the full square; ``lateral_crop``: the middle third of the columns stretched to the full width,
    which keeps the spine and one heart border, as a lateral-looking film.
    """
    films = np.asarray(films)
    side = films.shape[-1]
    if kind == "rot90":
        return np.ascontiguousarray(np.rot90(films, k=1, axes=(1, 2)))
    if kind == "negated":
        return 255 - films
    if kind == "corner_zoom":
        return _resize_each(films[:, : side // 2, : side // 2], side)
    if kind == "lateral_crop":
        return _resize_each(films[:, :, side // 3 : 2 * side // 3], side)
    raise ValueError(f"unknown near out-of-distribution kind {kind!r} (known: {', '.join(NEAR_KINDS)})")


def _resize_each(crops: np.ndarray, side: int) -> np.ndarray:
    return np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((side, side), Image.Resampling.BILINEAR))
            for c in crops
        ]
    )
