"""Named, seeded perturbations of a film that a real acquisition produces: what the stress evaluation applies.

Each perturbation takes one uint8 ``S x S`` film (the cache's square rendition) and a strength, and returns a film of
the same shape. Randomness (a marker's corner, the sign of a rotation, the direction of a shift) comes from a
generator seeded by ``(seed, film index, perturbation)``, so a film gets the same perturbed copy on every machine and
in every order (MONAI's convention: each transform its own generator, never the global one).

| name          | strength                                   | what it stands for                                |
|---------------|--------------------------------------------|---------------------------------------------------|
| `crop`        | share of the side kept around the centre   | tighter collimation, a smaller child              |
| `frame_black` | film side / frame side (> 1: looser)       | a looser frame, collimated (black border)         |
| `frame_edge`  | film side / frame side (> 1: looser)       | a looser frame, the film's edge continued         |
| `gamma`       | the exponent on [0, 1] intensities         | a display / processing curve                      |
| `contrast`    | factor around the film's mean              | kVp, processing                                   |
| `brightness`  | factor                                     | mAs, processing                                   |
| `lowres`      | share of the side it is sampled down to    | a coarser detector, a downsized export            |
| `blur`        | Gaussian radius in pixels at 256 px        | motion, a soft detector                           |
| `jpeg`        | JPEG quality                               | re-compression on the way from the PACS           |
| `rotate`      | degrees (sign drawn per film)              | a tilted patient                                  |
| `shift`       | share of the side (direction per film)     | off-centre positioning                            |
| `markers`     | number of burnt-in text markers in corners | L / R / AP / PORTABLE annotations                 |
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pneumolab.errors import SettingError, did_you_mean

__all__ = ["PERTURBATIONS", "Perturbation", "perturb_batch", "perturb_film"]

_MARKER_TEXTS = ("L", "R", "AP", "PORTABLE", "SUPINE", "ERECT")


def _resized(film: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(film).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None))


def _crop(film: np.ndarray, keep: float, _rng: np.random.Generator) -> np.ndarray:
    size = film.shape[0]
    side = max(1, round(size * keep))
    start = (size - side) // 2
    return _resized(film[start : start + side, start : start + side], size)


def _frame(film: np.ndarray, looser: float, mode: str) -> np.ndarray:
    size = film.shape[0]
    side = max(1, round(size / looser))
    small = _resized(film, side)
    before = (size - side) // 2
    pad = ((before, size - side - before),) * 2
    if mode == "black":
        return np.pad(small, pad, mode="constant", constant_values=0)
    return np.pad(small, pad, mode="edge")


def _intensity(film: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    x = film.astype(np.float32) / 255.0
    return (np.clip(fn(x), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _contrast(film: np.ndarray, factor: float, _rng: np.random.Generator) -> np.ndarray:
    return _intensity(film, lambda x: x.mean() + factor * (x - x.mean()))


def _lowres(film: np.ndarray, share: float, _rng: np.random.Generator) -> np.ndarray:
    size = film.shape[0]
    small = Image.fromarray(film).resize(
        (max(2, round(size * share)),) * 2, Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))


def _blur(film: np.ndarray, radius: float, _rng: np.random.Generator) -> np.ndarray:
    scaled = radius * film.shape[0] / 256  # the strength is in pixels of a 256 px film
    return np.asarray(Image.fromarray(film).filter(ImageFilter.GaussianBlur(scaled)))


def _jpeg(film: np.ndarray, quality: float, _rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(film).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def _rotate(film: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    angle = degrees if rng.random() < 0.5 else -degrees
    return np.asarray(Image.fromarray(film).rotate(angle, Image.Resampling.BILINEAR, fillcolor=0))


def _shift(film: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    size = film.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = (round(share * size * np.cos(angle)), round(share * size * np.sin(angle)))
    out = np.zeros_like(film)
    src = film[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _markers(film: np.ndarray, count: float, rng: np.random.Generator) -> np.ndarray:
    size = film.shape[0]
    image = Image.fromarray(film)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, size // 14))
    margin = size // 24
    corners = rng.permutation(4)[: int(count)]
    for corner in corners:
        text = _MARKER_TEXTS[int(rng.integers(len(_MARKER_TEXTS)))]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = margin if corner % 2 == 0 else size - margin - (right - left)
        y = margin if corner < 2 else size - margin - (bottom - top)
        draw.text((x - left, y - top), text, fill=255, font=font)
    return np.asarray(image)


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation: the function of one film, its neutral strength and the strengths the table shows."""

    name: str
    apply: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
    neutral: float
    strengths: tuple[float, ...]
    describes: str


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("crop", _crop, 1.0, (0.9, 0.8, 0.75), "tighter framing: the central share of the side"),
        Perturbation(
            "frame_black", lambda f, s, _r: _frame(f, s, "black"), 1.0, (1.1, 1.2, 1.3), "looser frame, black border"
        ),
        Perturbation(
            "frame_edge", lambda f, s, _r: _frame(f, s, "edge"), 1.0, (1.1, 1.2, 1.3), "looser frame, edge border"
        ),
        Perturbation("gamma", lambda f, g, _r: _intensity(f, lambda x: x**g), 1.0, (0.7, 1.4), "display curve"),
        Perturbation("contrast", _contrast, 1.0, (0.7, 1.3), "contrast around the mean"),
        Perturbation("brightness", lambda f, b, _r: _intensity(f, lambda x: x * b), 1.0, (0.8, 1.2), "exposure"),
        Perturbation("lowres", _lowres, 1.0, (0.5, 0.25), "detector resolution: down and up again"),
        Perturbation("blur", _blur, 0.0, (1.0, 2.0), "Gaussian blur (radius at 256 px)"),
        Perturbation("jpeg", _jpeg, 100.0, (30.0, 20.0, 10.0), "JPEG re-compression (quality)"),
        Perturbation("rotate", _rotate, 0.0, (5.0, 10.0), "rotation (degrees, sign per film)"),
        Perturbation("shift", _shift, 0.0, (0.05, 0.1), "off-centre shift (share of the side)"),
        Perturbation("markers", _markers, 0.0, (1.0, 2.0), "burnt-in text markers in the corners"),
    )
}


def _lookup(name: str) -> Perturbation:
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise did_you_mean("perturbation", name, PERTURBATIONS) from None


def perturb_film(film: np.ndarray, name: str, strength: float, *, seed: int = 0, index: int = 0) -> np.ndarray:
    """One film (uint8 ``S x S``) perturbed by `name` at `strength`, seeded by ``(seed, index, name)``."""
    perturbation = _lookup(name)
    if film.ndim != 2 or film.dtype != np.uint8:
        raise SettingError(f"a film to perturb must be uint8 S x S, got {film.dtype} {film.shape}")
    rng = np.random.default_rng([seed, index, zlib.crc32(name.encode())])
    out = perturbation.apply(film, float(strength), rng)
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(film.shape)


def perturb_batch(films: np.ndarray, name: str, strength: float, *, seed: int = 0, first_index: int = 0) -> np.ndarray:
    """Every film of a uint8 ``N x S x S`` batch perturbed (film ``i`` seeded as index ``first_index + i``)."""
    return (
        np.stack([perturb_film(f, name, strength, seed=seed, index=first_index + i) for i, f in enumerate(films)])
        if len(films)
        else films.copy()
    )
