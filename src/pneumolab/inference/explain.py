"""Grad-CAM heatmaps through the ``grad-cam`` library, for any registry architecture.

The target layer is the model's own `ModelSpec.gradcam_layer` (the module whose output is the last feature map;
for DenseNet a non-inplace ReLU after ``features``, since torchvision's in-place one breaks the hooks). The map is
computed in fp32 for the PNEUMONIA logit, on the same preprocessed image the model classifies, and drawn over the
X-ray beside the plain film (``panel="both"``), or alone, enlarged, for a page that already shows the film
(``panel="overlay"``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pneumolab.data.io import load_xray_with_meta
from pneumolab.errors import InputRefusedError, MissingExtraError, SettingError, did_you_mean
from pneumolab.inference.pytorch import TrainedModel
from pneumolab.inference.steps import Decision

__all__ = ["PANELS", "Explanation", "explain_image", "explain_pair", "grad_cam"]

PANELS = ("both", "overlay")
"""What `explain_image` draws: the film and the overlay side by side, or the overlay alone (enlarged)."""
_OVERLAY_SIDE = 512  # the overlay panel is enlarged by a whole factor towards this width, for a legible page


@dataclass(frozen=True)
class Explanation:
    """A heatmap (H x W in [0, 1]) for one image and the class it explains, its decision (answered or refer), and
    the rendered PNG."""

    heatmap: np.ndarray
    decision: Decision
    png: bytes
    target: str = "PNEUMONIA"

    @property
    def probability(self) -> float:
        return float(self.decision.probability)

    @property
    def label(self) -> str:
        return self.decision.label


def _module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


def grad_cam(trained: TrainedModel, image_u8: np.ndarray, target_class: int = 1) -> np.ndarray:
    """Grad-CAM map (image_size x image_size, [0, 1]) of a uint8 S x S image for the output `target_class`."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MissingExtraError('Grad-CAM needs the grad-cam package: pip install "pneumolab[explain]"') from None

    model = trained.model.float().eval()
    x = trained.preprocessing.transform(torch.as_tensor(image_u8)[None, None].to(trained.device)).contiguous()
    layer = _module(model, model.spec.gradcam_layer)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        heatmap = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)])[0]
    return np.clip(np.nan_to_num(heatmap), 0.0, 1.0).astype(np.float32)


def _blend(gray: np.ndarray, heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The film as RGB in [0, 1], and the film with the heatmap over it (jet colours, 40 %)."""
    from matplotlib import colormaps

    film = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255.0
    colours = colormaps["jet"](heatmap)[..., :3].astype(np.float32)
    return film, np.clip(0.6 * film + 0.4 * colours, 0.0, 1.0)


def _png(canvas: Image.Image) -> bytes:
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def _captioned(rgb: np.ndarray, caption: str) -> Image.Image:
    """An RGB picture in [0, 1] under a one-line caption on a white strip."""
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    canvas = Image.new("RGB", (picture.width, picture.height + 22), "white")
    canvas.paste(picture, (0, 22))
    ImageDraw.Draw(canvas).text((6, 5), caption, fill="black")
    return canvas


def _render(gray: np.ndarray, heatmap: np.ndarray, caption: str) -> bytes:
    """The film and the film with the heatmap (jet colours, 40 %) side by side, with a caption, as PNG."""
    film, overlay = _blend(gray, heatmap)
    return _png(_captioned(np.concatenate([film, overlay], axis=1), caption))


def _render_overlay(gray: np.ndarray, heatmap: np.ndarray, caption: str) -> bytes:
    """The overlay alone, enlarged by a whole factor to about 512 px, under its caption wrapped to that width."""
    _, overlay = _blend(gray, heatmap)
    picture = Image.fromarray((overlay * 255).round().astype(np.uint8))
    scale = max(1, _OVERLAY_SIDE // picture.width)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)
    font = ImageFont.load_default(size=15)
    measure = ImageDraw.Draw(picture)
    # the caption's parts are separated by two spaces: break between parts, never inside one
    lines: list[str] = []
    for part in caption.split("  "):
        joined = f"{lines[-1]}  {part}" if lines else part
        if lines and measure.textlength(joined, font=font) <= picture.width - 12:
            lines[-1] = joined
        else:
            lines.append(part)
    line_height = 20
    top = 8 + line_height * len(lines)
    canvas = Image.new("RGB", (picture.width, picture.height + top), "white")
    canvas.paste(picture, (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * line_height), line, fill="black", font=font)
    return _png(canvas)


def _as_shown(trained: TrainedModel, image_u8: np.ndarray) -> np.ndarray:
    """The film as the model sees it (the same crop and resize, normalised to nothing), uint8 for display."""
    as_shown = dataclasses.replace(trained.preprocessing, normalize=(0.0, 1.0 / 255.0))
    shown = as_shown.transform(torch.as_tensor(image_u8)[None, None])[0, 0]
    return shown.clamp(0, 255).round().to(torch.uint8).cpu().numpy()


def explain_pair(
    trained: TrainedModel, first_u8: np.ndarray, second_u8: np.ndarray, captions: tuple[str, str], target: str
) -> bytes:
    """Two films (uint8 S x S, e.g. a film and a perturbed copy) with their Grad-CAM of `target` side by side, each
    under its caption, as PNG: where the model looked before and after a change that moved its answer."""
    index = trained.classes.index(target)
    panels = []
    for image, caption in zip((first_u8, second_u8), captions, strict=True):
        _, overlay = _blend(_as_shown(trained, image), grad_cam(trained, image, index))
        panels.append(_captioned(overlay, caption))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8, panels[0].height), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + 8, 0))
    return _png(canvas)


def explain_image(
    trained: TrainedModel,
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    panel: str = "both",
    target: str | None = None,
) -> Explanation:
    """Read an X-ray file (or uploaded bytes), gate and classify it, and explain one class's score with Grad-CAM.

    Args:
        trained: The PyTorch model (Grad-CAM needs its graph).
        source: A path, or the file's bytes.
        name: The name used in messages (default: the path, or ``"<upload>"`` for bytes).
        panel: ``"both"``: the film and the overlay side by side; ``"overlay"``: the overlay alone, enlarged to about
            512 px wide, for a page that shows the film already.
        target: The class whose score is explained. Default: the predicted class of a K-class model, and for a
            binary model its second class (PNEUMONIA), whatever the prediction, as it always was.

    Raises:
        InputRefusedError: the input gate refused the file (no heatmap is drawn for what is not a chest X-ray).
        SettingError: `panel` is not one of `PANELS`.
        UnknownNameError: `target` is not one of the model's classes.
    """
    if panel not in PANELS:
        raise SettingError(f"panel: must be one of {', '.join(PANELS)}, got {panel!r}")
    if target is not None and target not in trained.classes:
        raise did_you_mean("class", target, trained.classes)
    image, meta = load_xray_with_meta(source, size=trained.cache_size, name=name)
    decision = trained.assess(image[None], [meta])[0]
    if decision.status == "refused":
        label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
        raise InputRefusedError(label, decision.reason, decision.gate_score)
    if target is None:
        target = trained.classes[1] if len(trained.classes) == 2 else decision.label
    heatmap = grad_cam(trained, image, trained.classes.index(target))
    gray = _as_shown(trained, image)
    verdict = decision.label if decision.status == "answered" else f"REFER ({decision.label}?)"
    if len(trained.classes) == 2:
        scores = f"P(pneumonia) = {decision.probability:.3f}  threshold {trained.threshold:.3f}"
    else:
        scores = "  ".join(f"P({c.lower()}) = {p:.3f}" for c, p in (decision.probabilities or {}).items())
    caption = f"{verdict}  {scores}  Grad-CAM of {target}: {trained.name}"
    render = _render_overlay if panel == "overlay" else _render
    return Explanation(heatmap, decision, render(gray, heatmap, caption), target)
