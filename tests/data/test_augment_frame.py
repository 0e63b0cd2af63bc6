"""`cxr-frame`: looser frames (the film smaller inside a black or edge border) besides tighter ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pneumolab.data.augment import _TRIES, BatchAugment, _sample_box, get_preset
from pneumolab.errors import SettingError

NORMALIZE = (0.5, 0.25)


def _films(n: int = 16, side: int = 64) -> torch.Tensor:
    return torch.full((n, 1, side, side), 200, dtype=torch.uint8)  # a bright film edge to edge


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * NORMALIZE[1] + NORMALIZE[0]


def test_looser_frames_put_the_film_inside_a_black_or_an_edge_border() -> None:
    black = dataclasses.replace(get_preset("cxr-frame"), zoom_out_p=1.0, black_border=1.0, rotation=0.0,
                                translate=0.0, brightness=0.0, contrast=0.0, gamma=0.0)  # fmt: skip
    out = _unit(BatchAugment(black, image_size=48, normalize=NORMALIZE, seed=0)(_films()))
    dark = (out < 0.05).float().mean(dim=(1, 2, 3))
    boxes = BatchAugment(black, image_size=48, normalize=NORMALIZE, seed=0).sample_params(16)["box"]
    expected = 1 - 1 / boxes[:, 2] ** 2  # the share of the frame outside a film of side 1 / box side
    assert torch.allclose(dark, expected, atol=0.08)
    assert (dark > 0).all()

    edge = dataclasses.replace(black, black_border=0.0)
    out = _unit(BatchAugment(edge, image_size=48, normalize=NORMALIZE, seed=0)(_films()))
    assert out.min() > 0.7  # the border continues the film's (bright) edge


def test_a_third_of_the_frames_are_looser_and_half_of_those_black() -> None:
    params = BatchAugment(get_preset("cxr-frame"), image_size=32, normalize=NORMALIZE, seed=1).sample_params(4000)
    looser = params["box"][:, 2] > 1.0
    assert looser.float().mean().item() == pytest.approx(0.35, abs=0.03)
    assert params["black_border"][looser].float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert not params["black_border"][~looser].any()
    assert params["box"][looser, 2].max() <= 1.5 and params["box"][~looser, 2].min() >= np.sqrt(0.5 * 0.9) - 1e-6


def test_presets_without_looser_frames_keep_their_random_stream() -> None:
    augment = BatchAugment(get_preset("cxr"), image_size=32, normalize=NORMALIZE, seed=7)
    box = augment.sample_params(8)["box"]
    generator = torch.Generator().manual_seed(7)
    u = torch.rand(8, 2 * _TRIES + 11, generator=generator)
    assert torch.equal(box, _sample_box(u[:, : 2 * _TRIES + 2], (0.85, 1.0), (0.9, 1.1)))


def test_bad_looser_frame_settings_are_refused() -> None:
    with pytest.raises(SettingError, match="zoom_out_p"):
        dataclasses.replace(get_preset("cxr-frame"), zoom_out_p=1.5)
    with pytest.raises(SettingError, match="zoom_out"):
        dataclasses.replace(get_preset("cxr-frame"), zoom_out=-0.1)
