"""Batched augmentation of uint8 image batches from the decode-once cache, with per-image randomness.

Why not ``torchvision.transforms.v2`` on the batch: a v2 transform samples ONE set of random parameters per call, so
applied to an ``N x 1 x S x S`` tensor every image gets the same flip, angle and crop. Looping over images restores
per-image randomness but costs six interpolations per image in Python. Instead:

* `BatchAugment` samples every image's parameters at once from its OWN seeded `torch.Generator` (never the global
  RNG), so a run is reproducible across DataLoader workers and resumes (`state_dict` / `load_state_dict`).
* The whole geometric chain of a preset (resize -> center crop -> random resized crop -> flips -> rotation ->
  translation) is composed into ONE 2x3 affine matrix per image, and the batch is resampled once with
  `torch.nn.functional.affine_grid` + `grid_sample` (bilinear): one interpolation instead of six, on whatever device
  the images are (GPU when training there).
* Photometric ops (brightness, contrast, optional gamma) follow torchvision's ``adjust_brightness`` /
  ``adjust_contrast`` / ``adjust_gamma`` for one channel (contrast blends with the image's mean), vectorised with
  ``N x 1 x 1 x 1`` factors, and run on the resampled ``H x H`` image (cheaper than at ``S x S``).

Measured on the 2-core development machine, batches of 64 cached 256 px images to 224 px: ``plan`` ~1,900 img/s,
``cxr`` ~1,550 img/s, `eval_transform` ~5,000 img/s; the research plan's torchvision pipeline on PIL images runs at
~250 img/s per file with JPEG decoding and ~400 img/s from already decoded arrays.

Fidelity to the torchvision pipeline it replaces (`PRESETS["plan"]`):

* Fill: torchvision pads rotation corners and translation edges with black (``fill=0``). A composed matrix would
  instead show real pixels from outside the crop there, so the output is masked where torchvision fills: the
  rotation fill before the photometric ops (it then gets the contrast blend, as in torchvision where ColorJitter
  comes after RandomRotation) and the translation fill after them (it stays black, as RandomAffine comes after
  ColorJitter). Inside the frame ``grid_sample`` uses ``padding_mode="border"``, so a crop box touching the image
  edge gets no dark half-pixel rim. The masks are hard-edged (torchvision blends the one boundary pixel).
* Parameters are continuous: torchvision rounds the crop box and the translation to whole pixels; here they are
  sub-pixel. The crop box is sampled as torchvision does (area fraction, log-uniform aspect ratio, up to 10 tries,
  then the central fallback), vectorised over the batch and the tries.
* One bilinear interpolation instead of torchvision's chain (bilinear resize + crop, nearest-neighbour rotation and
  affine by default), so the output is slightly sharper and never blocky.
* ColorJitter applies brightness and contrast in a random order; so does this (``contrast_first``); the order only
  matters where values clip at 0 or 1. Its saturation and hue do nothing to a one-channel image
  (torchvision returns a grayscale image unchanged), so they are not parameters here. Gamma, when on, comes last.
* The contrast mean is taken over the visible (not translation-filled) part of the image; torchvision takes it
  before translating, over pixels some of which the translation then pushes out of the frame.
* When the output is smaller than the cropped source (e.g. 300 px cache to 160 px), the batch is first resized as
  a whole with an antialiased bilinear filter so that the affine resampling runs near 1:1 and does not alias.

The evaluation preprocessing is `eval_transform` (center crop, resize, normalise): the one function that evaluate,
predict and serve call, and the exact output of `BatchAugment` when every random op is off.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pneumolab.data.geometry import (
    affine_grid,
    check_output_settings,
    normalise,
    pixel_centres,
    presize,
    resample,
    to_float,
)
from pneumolab.errors import SettingError, did_you_mean

__all__ = ["PRESETS", "AugmentConfig", "BatchAugment", "get_preset"]

_TRIES = 10  # RandomResizedCrop's attempts before its central fallback, as in torchvision


@dataclass(frozen=True)
class AugmentConfig:
    """One augmentation preset; every random op is off at its neutral value (0, or ``(1, 1)`` for ``scale``).

    Attributes:
        crop_fraction: share of the image side kept by the center crop before everything else (eval uses it too).
        scale: RandomResizedCrop's range of the box area as a share of the (center-cropped) image; ``(1, 1)`` = off.
        ratio: RandomResizedCrop's range of the box aspect ratio (width / height), sampled log-uniformly.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotation: maximum angle in degrees; the angle is uniform in ``[-rotation, rotation]``, positive = counter-
            clockwise as seen on screen (torchvision's convention).
        translate: maximum shift per axis as a share of the side, uniform in ``[-translate, translate]``.
        brightness: the brightness factor is uniform in ``[max(0, 1 - brightness), 1 + brightness]``.
        contrast: the contrast factor is uniform in ``[max(0, 1 - contrast), 1 + contrast]``.
        gamma: the gamma exponent is log-uniform in ``[1 / (1 + gamma), 1 + gamma]`` (exposure / display curve).
        zoom_out: the largest side of a looser frame, as a share of the film's side minus 1: with probability
            `zoom_out_p` the crop box is replaced by a square of side uniform in ``[1, 1 + zoom_out]`` placed at
            random around the film, so the film appears smaller inside a border (a bigger child, a wider
            collimation, a smaller film on the detector). 0 = off: the random crop can only frame tighter.
        zoom_out_p: probability of the looser frame for each image.
        black_border: probability that a looser frame's border is black (collimation, an unexposed detector)
            rather than the film's own edge pixels continued outwards.
    """

    crop_fraction: float
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    vflip: float
    rotation: float
    translate: float
    brightness: float
    contrast: float
    gamma: float = 0.0
    zoom_out: float = 0.0
    zoom_out_p: float = 0.0
    black_border: float = 0.5

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> SettingError:
            return SettingError(f"augmentation {name} must be {rule}, got {getattr(self, name)!r}")

        if not 0.0 < self.crop_fraction <= 1.0:
            raise bad("crop_fraction", "in (0, 1]")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise bad("scale", "a pair (low, high) with 0 < low <= high <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise bad("ratio", "a pair (low, high) with 0 < low <= high")
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "a probability in [0, 1]")
        if not 0.0 <= self.rotation <= 180.0:
            raise bad("rotation", "in [0, 180] degrees")
        if not 0.0 <= self.translate < 1.0:
            raise bad("translate", "in [0, 1)")
        for name in ("brightness", "contrast", "gamma", "zoom_out"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise bad(name, "finite and >= 0")
        for name in ("zoom_out_p", "black_border"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "a probability in [0, 1]")


_CXR = AugmentConfig(
    # No center crop: on tightly collimated films the apices and costophrenic angles lie near the border.
    crop_fraction=1.0,
    # Mild zoom (field of view, patient size, collimation) that keeps the lung fields in frame.
    scale=(0.85, 1.0),
    # Mild aspect jitter: the cache already squashes every film to a square; more would distort the
    # cardiothoracic ratio.
    ratio=(0.9, 1.1),
    # No horizontal flip: the heart, aortic knob and gastric bubble are on the patient's left on essentially
    # every film (dextrocardia is ~1 in 10,000); a mirrored film, with its L/R marker reversed, is an image
    # the model will never be shown at test time. The budget goes to what does vary: positioning and exposure.
    hflip=0.0,
    # Films are never upside down.
    vflip=0.0,
    # Patient rotation / tilt of a few degrees (common in children); 20 deg mostly adds black corners.
    rotation=10.0,
    # Off-centre positioning: 6 % of the side keeps the lungs in frame.
    translate=0.06,
    # Exposure (kVp, mAs) and detector/processing differences between sites.
    brightness=0.2,
    contrast=0.2,
    # A non-linear display/processing curve (window, LUT), which brightness and contrast cannot mimic.
    gamma=0.2,
)

PRESETS: dict[str, AugmentConfig] = {
    # The research plan's torchvision pipeline: Resize((256, 256)) -> CenterCrop(224) -> RandomResizedCrop(224,
    # scale=(0.8, 1)) -> RandomHorizontalFlip() -> RandomVerticalFlip(0.2) -> RandomRotation(20) ->
    # ColorJitter(0.2, 0.2, saturation=0.1, hue=0.1) -> RandomAffine(0, translate=(0.1, 0.1)) -> Normalize.
    # Saturation and hue are no-ops on grayscale, so they have no field.
    "plan": AugmentConfig(
        crop_fraction=224 / 256,
        scale=(0.8, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        vflip=0.2,
        rotation=20.0,
        translate=0.1,
        brightness=0.2,
        contrast=0.2,
    ),
    # What suits chest X-rays: only variations that real films show, so the training images stay in the test
    # distribution (EVALUATION.md: the test NORMALs are where models fail).
    "cxr": _CXR,
    # `cxr` that does not teach the framing (the framing issue): the models read how tightly a film is framed (a
    # NORMAL film cropped to its central 80 % became PNEUMONIA), because framing differs between the classes of this
    # release. Frames tighter down to 70 % of the side (scale 0.5 of the area) and, for a third of the films,
    # looser up to 1.5 x the side inside a black or an edge border, so that framing carries no label.
    "cxr-frame": dataclasses.replace(_CXR, scale=(0.5, 1.0), zoom_out=0.5, zoom_out_p=0.35, black_border=0.5),
    # No augmentation: exactly eval_transform's geometry (the whole image) plus normalisation.
    "none": AugmentConfig(
        crop_fraction=1.0,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0.0,
        vflip=0.0,
        rotation=0.0,
        translate=0.0,
        brightness=0.0,
        contrast=0.0,
    ),
}


def get_preset(name: str) -> AugmentConfig:
    """The augmentation preset called `name` (one of `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise did_you_mean("augmentation preset", name, PRESETS) from None


# ---------------------------------------------------------------------------------------------------- internals


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def _sample_box(u: Tensor, scale: tuple[float, float], ratio: tuple[float, float]) -> Tensor:
    """RandomResizedCrop's box for every row of ``u`` (N x 2*_TRIES+2 uniforms): ``(x0, y0, w, h)`` as fractions.

    The image is square, so its side is 1. Each row tries ``_TRIES`` (area, log-ratio) pairs and keeps the first box
    that fits; rows where none fits get torchvision's central fallback.
    """
    area = _uniform(u[:, :_TRIES], *scale)
    aspect = torch.exp(_uniform(u[:, _TRIES : 2 * _TRIES], math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    found = fits.any(dim=1)
    if ratio[0] > 1.0:  # the fallback for a square image (in_ratio = 1), as in torchvision
        fallback_w, fallback_h = 1.0, 1.0 / ratio[0]
    elif ratio[1] < 1.0:
        fallback_w, fallback_h = ratio[1], 1.0
    else:
        fallback_w, fallback_h = 1.0, 1.0
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    # Uniform position inside the image; the fallback is centred.
    x0 = torch.where(found, u[:, 2 * _TRIES] * (1.0 - w), (1.0 - w) / 2)
    y0 = torch.where(found, u[:, 2 * _TRIES + 1] * (1.0 - h), (1.0 - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1)


def _matrices(params: dict[str, Tensor], crop_fraction: float) -> tuple[Tensor, Tensor]:
    """Compose the geometric chain into ``theta`` (N x 2 x 3); also return the crop box in input coordinates.

    Coordinates are ``affine_grid``'s: x right, y down, [-1, 1] across every (square) image. Going backwards from
    an output pixel ``u5``: translation ``u4 = u5 - t``; rotation ``u3 = R^-1 u4``; flips ``u2 = diag(sx, sy) u3``;
    crop box ``u1 = centre + diag(w, h) u2``; center crop ``u0 = crop_fraction * u1``; the cache's resize to a
    square is the identity in these coordinates. So ``u0 = A u5 + b`` with ``A = crop * diag(w sx, h sy) R^-1``
    and ``b = crop * centre - A t``.

    The box (N x 4: centre x, centre y, half width, half height in ``u0``) is the frame of the image before the
    flips and the rotation, seen in the input: an output pixel whose sample point falls outside it is one that
    torchvision's rotation fills with black.
    """
    x0, y0, w, h = params["box"].unbind(1)
    sx = 1.0 - 2.0 * params["hflip"].to(w.dtype)
    sy = 1.0 - 2.0 * params["vflip"].to(w.dtype)
    angle = torch.deg2rad(params["angle"].to(w.dtype))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Positive angle = counter-clockwise on screen; with y down its inverse is [[cos, -sin], [sin, cos]].
    r_inv = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # N x 2 x 2
    t = 2.0 * params["translate"].to(w.dtype)  # fractions of the side -> normalised units
    scale = torch.stack([w * sx, h * sy], 1).unsqueeze(2) * crop_fraction  # N x 2 x 1 (row scaling)
    a = scale * r_inv
    centre = torch.stack([2.0 * x0 + w - 1.0, 2.0 * y0 + h - 1.0], 1) * crop_fraction
    b = centre - (a @ t.unsqueeze(2)).squeeze(2)
    theta = torch.cat([a, b.unsqueeze(2)], 2)
    return theta, torch.cat([centre, torch.stack([w, h], 1) * crop_fraction], 1)


def _visible_mean(x: Tensor, in_x: Tensor | None, in_y: Tensor | None) -> Tensor:
    """Per-image mean of ``x`` (N x 1 x H x W) over the pixels where both separable masks (N x W, N x H) are 1."""
    if in_x is None or in_y is None:
        return x.mean(dim=(1, 2, 3))
    rows = torch.bmm(x[:, 0], in_x.unsqueeze(2)).squeeze(2)  # N x H: one matrix-vector pass, no N x H x W mask
    return (rows * in_y).sum(1) / (in_x.sum(1) * in_y.sum(1)).clamp_min(1.0)


def _brightness_contrast(
    x: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    contrast_first: Tensor,
    in_x: Tensor | None,
    in_y: Tensor | None,
) -> Tensor:
    """torchvision's ``adjust_brightness`` and ``adjust_contrast``, in either order per image, in one affine pass.

    For ``x`` in [0, 1], factors ``b, c >= 0`` and ``m`` the mean the contrast blends with, both orders collapse to
    one clamped affine map ``clamp(a x + beta, 0, high)`` with ``a = b c`` (exactly, clipping included), so neither
    order is computed for the whole batch and then discarded:

    * contrast first, ``clamp(b clamp(c x + (1 - c) m0, 0, 1), 0, 1)``: ``beta = b (1 - c) m0``, ``high = min(b, 1)``;
    * brightness first, ``clamp(c min(b x, 1) + (1 - c) mb, 0, 1)`` with ``mb`` the mean of ``min(b x, 1)``:
      ``beta = (1 - c) mb``, ``high = min(c + (1 - c) mb, 1)`` (the inner clip caps the monotone map at ``x = 1/b``).

    Args:
        x: N x 1 x H x W in [0, 1].
        brightness, contrast: N factors (1 = off).
        contrast_first: N bools.
        in_x, in_y: separable masks of the pixels the means are taken over (None = all).
    """
    m0 = _visible_mean(x, in_x, in_y)
    mb = _visible_mean((x * brightness.view(-1, 1, 1, 1)).clamp_(max=1.0), in_x, in_y)
    keep = 1.0 - contrast
    beta = torch.where(contrast_first, brightness * keep * m0, keep * mb)
    high = torch.where(contrast_first, brightness, contrast + keep * mb).clamp(max=1.0)
    y = torch.addcmul(beta.view(-1, 1, 1, 1), x, (brightness * contrast).view(-1, 1, 1, 1))
    return y.clamp_(min=torch.zeros_like(high).view(-1, 1, 1, 1), max=high.view(-1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------------- public API


class BatchAugment:
    """Random per-image augmentation of a uint8 batch, with its own seeded generator.

    Args:
        config: the preset (`get_preset` or an `AugmentConfig`).
        image_size: output side ``H``; any size (e.g. 160, 224, 260), independent of the cache's ``S``.
        normalize: the model's single-channel ``(mean, std)`` for [0, 1] intensities, e.g. ``(0.449, 0.226)``.
        seed: seeds the generator; the same seed gives the same augmentations.
        device: where the generator lives and the parameters are drawn. The default, CPU, gives the same parameters
            for a seed on every machine (a few numbers per image, moved to the images' device with one copy); a
            CUDA device draws them there (a different stream from CPU's). The images can be on any device.

    Example:
        >>> augment = BatchAugment(get_preset("plan"), image_size=224, normalize=(0.449, 0.226), seed=1)
        >>> batch = augment(images_u8)  # float32 N x 1 x 224 x 224, on images_u8's device
    """

    def __init__(
        self,
        config: AugmentConfig,
        *,
        image_size: int,
        normalize: tuple[float, float],
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        check_output_settings(image_size, normalize)
        self.config = config
        self.image_size = image_size
        self.normalize = (float(normalize[0]), float(normalize[1]))
        self.seed = seed
        self.generator = torch.Generator(device=torch.device(device or "cpu"))
        self.generator.manual_seed(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.config}, image_size={self.image_size}, normalize={self.normalize}, "
            f"seed={self.seed})"
        )

    def sample_params(self, n: int) -> dict[str, Tensor]:
        """Draw the parameters of `n` images (advances the generator exactly as a call on `n` images does).

        Returns:
            ``box`` (N x 4: x0, y0, w, h of the crop box as fractions of the center-cropped side), ``hflip`` and
            ``vflip`` (N, bool), ``angle`` (N, degrees), ``translate`` (N x 2: x, y as fractions of the side),
            ``brightness``, ``contrast``, ``gamma`` (N, factors), ``contrast_first`` (N, bool: ColorJitter's
            random order) and ``black_border`` (N, bool: a looser frame's border is black, not the film's edge).
            Ops that are off get their neutral value. A box larger than 1 is a looser frame (``zoom_out``).
        """
        c = self.config
        # One draw with a fixed layout: the stream advances by the same amount whatever the values.
        u = torch.rand(n, 2 * _TRIES + 11, generator=self.generator, device=self.generator.device)
        k = 2 * _TRIES + 2
        box = _sample_box(u[:, :k], c.scale, c.ratio)
        black = torch.zeros(n, dtype=torch.bool, device=u.device)
        if c.zoom_out_p > 0:  # a second draw, so that presets without it keep their random stream
            v = torch.rand(n, 4, generator=self.generator, device=self.generator.device)
            looser = v[:, 0] < c.zoom_out_p
            side = _uniform(v[:, 1], 1.0, 1.0 + c.zoom_out)
            frame = torch.stack([v[:, 2] * (1.0 - side), v[:, 3] * (1.0 - side), side, side], 1)
            box = torch.where(looser.unsqueeze(1), frame, box)
            black = looser & (v[:, 0] < c.zoom_out_p * c.black_border)  # v0 again: uniform below zoom_out_p
        return {
            "box": box,
            "black_border": black,
            "hflip": u[:, k] < c.hflip,
            "vflip": u[:, k + 1] < c.vflip,
            "angle": _uniform(u[:, k + 2], -c.rotation, c.rotation),
            "translate": _uniform(u[:, k + 3 : k + 5], -c.translate, c.translate),
            "brightness": _uniform(u[:, k + 5], max(0.0, 1.0 - c.brightness), 1.0 + c.brightness),
            "contrast": _uniform(u[:, k + 6], max(0.0, 1.0 - c.contrast), 1.0 + c.contrast),
            "gamma": torch.exp(_uniform(u[:, k + 7], -1.0, 1.0) * math.log1p(c.gamma)),
            "contrast_first": u[:, k + 8] < 0.5,
        }

    def apply(self, images_u8: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Augment `images_u8` with given parameters (from `sample_params`); the generator is not used.

        Args:
            images_u8: uint8 ``N x 1 x S x S`` (or ``N x S x S``) on any device.
            params: as returned by `sample_params(N)`, on any device.

        Returns:
            float32 ``N x 1 x H x H`` on the images' device, normalised.
        """
        c = self.config
        x = presize(to_float(images_u8), self.image_size, c.crop_fraction)
        n, device, size = x.shape[0], x.device, self.image_size
        theta, box = _matrices(params, c.crop_fraction)
        # One host-to-device copy for everything the batch needs.
        packed = torch.cat(
            [
                theta.reshape(n, 6),
                box,
                params["translate"].to(theta.dtype),
                torch.stack([params[key].to(theta.dtype) for key in ("brightness", "contrast", "gamma")], 1),
                params["contrast_first"].to(theta.dtype).unsqueeze(1),
            ],
            1,
        ).to(device=device, dtype=torch.float32)
        theta, box, shift = packed[:, :6].view(n, 2, 3), packed[:, 6:10], packed[:, 10:12]
        brightness, contrast, gamma, contrast_first = packed[:, 12], packed[:, 13], packed[:, 14], packed[:, 15] > 0.5
        grid = affine_grid(theta, size)
        x = resample(x, grid)

        if c.rotation > 0:  # rotation fill: black before the photometric ops, as in torchvision
            outside = (grid[..., 0] - box[:, 0, None, None]).abs_() > box[:, 2, None, None]
            outside |= (grid[..., 1] - box[:, 1, None, None]).abs_() > box[:, 3, None, None]
            x.masked_fill_(outside.unsqueeze(1), 0.0)
        in_x = in_y = None
        if c.translate > 0:  # translation fill, separable: is the pixel centre minus the shift still in frame?
            centres = pixel_centres(size, device)
            in_x = ((centres - 2 * shift[:, :1]).abs() <= 1.0).to(x.dtype)  # N x W
            in_y = ((centres - 2 * shift[:, 1:]).abs() <= 1.0).to(x.dtype)  # N x H
        if c.brightness > 0 or c.contrast > 0:
            x = _brightness_contrast(x, brightness, contrast, contrast_first, in_x, in_y)
        if c.gamma > 0:
            x = x.clamp_min_(0.0).pow_(gamma.view(n, 1, 1, 1))
        if in_x is not None and in_y is not None:
            x = x.mul_(in_x.view(n, 1, 1, size)).mul_(in_y.view(n, 1, size, 1))
        black = params.get("black_border")
        if black is not None and bool(black.any()):  # outside the film (|u0| > 1 on either axis) -> black
            off_film = (grid.abs() > 1.0).any(dim=-1) & black.to(device).view(n, 1, 1)
            x.masked_fill_(off_film.unsqueeze(1), 0.0)
        return normalise(x, self.normalize)

    def __call__(self, images_u8: Tensor) -> Tensor:
        """Augment a batch with fresh random parameters per image (see `apply`)."""
        n = images_u8.shape[0] if isinstance(images_u8, Tensor) else 0
        return self.apply(images_u8, self.sample_params(n))

    def reseed(self, seed: int) -> None:
        """Restart the random stream from `seed` (e.g. one seed per epoch, so a resumed epoch redraws the same)."""
        self.seed = seed
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, for checkpoints: a resumed run continues the same random stream."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict`."""
        self.generator.set_state(state["generator"].cpu())
