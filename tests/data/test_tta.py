"""The named test-time views: presets, names, and what each view does to a normalised batch."""

from __future__ import annotations

import pytest
import torch

from pneumolab.data.tta import TTA_PRESETS, TTA_VIEWS, apply_view, resolve_views
from pneumolab.errors import UnknownNameError

NORMALIZE = (0.449, 0.226)
BLACK = (0.0 - NORMALIZE[0]) / NORMALIZE[1]


def _batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 1, 32, 32)


def test_presets_and_lists_resolve_to_known_views():
    assert resolve_views("plan") == ("identity", "hflip", "vflip", "rot90")
    assert resolve_views("cxr") == ("identity", "rot+5", "rot-5", "zoom1.1", "zoom0.9")
    assert resolve_views(" identity, hflip ") == ("identity", "hflip")
    assert resolve_views(["rot90"]) == ("rot90",)
    assert all(set(views) <= set(TTA_VIEWS) for views in TTA_PRESETS.values())
    with pytest.raises(UnknownNameError, match="unknown TTA view 'hfilp'; did you mean hflip"):
        resolve_views("identity,hfilp")


def test_exact_views_are_exact():
    x = _batch()
    assert apply_view("identity", x, NORMALIZE) is x
    assert torch.equal(apply_view("hflip", apply_view("hflip", x, NORMALIZE), NORMALIZE), x)
    assert torch.equal(apply_view("hflip", x, NORMALIZE)[..., 0], x[..., -1])
    assert torch.equal(apply_view("vflip", x, NORMALIZE)[..., 0, :], x[..., -1, :])
    four = x
    for _ in range(4):
        four = apply_view("rot90", four, NORMALIZE)
    assert torch.equal(four, x)


@pytest.mark.parametrize("view", ["rot+5", "rot-5", "zoom1.1", "zoom0.9"])
def test_resampling_views_keep_shape_and_dtype_and_fill_with_black(view):
    x = _batch()
    out = apply_view(view, x, NORMALIZE)
    assert out.shape == x.shape and out.dtype == torch.float32 and not torch.equal(out, x)
    # the centre moves least; a zoom-out or rotation uncovers corners, filled with the normalised black
    assert torch.allclose(out[..., 16, 16], x[..., 16, 16], atol=2.0)
    if view != "zoom1.1":
        assert torch.isclose(out[..., 0, 0], torch.tensor(BLACK), atol=1e-5).all()


def test_a_constant_film_stays_constant_under_zoom_in():
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert torch.allclose(apply_view("zoom1.1", flat, NORMALIZE), flat, atol=1e-6)
