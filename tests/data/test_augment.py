"""Batched augmentation: seeding, per-image randomness, and that pixels change exactly as the parameters say."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumolab.data.augment import PRESETS, AugmentConfig, BatchAugment, get_preset
from pneumolab.data.preprocess import eval_transform
from pneumolab.errors import SettingError, UnknownNameError
from tests.conftest import synthetic_xray

RAW = (0.0, 1.0)  # normalisation that leaves [0, 1] intensities as they are, so tests read pixels directly


def only(**changes: object) -> AugmentConfig:
    """A config with every op off except `changes`."""
    return dataclasses.replace(PRESETS["none"], **changes)


def random_images(n: int, size: int, seed: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def xray_batch(n: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([synthetic_xray(rng, (size, size), i % 2) for i in range(n)])).unsqueeze(1)


def dot_image(n: int, size: int, row: int, col: int) -> torch.Tensor:
    """`n` copies of a black image with a bright 3 x 3 dot centred on (row, col)."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, :, row - 1 : row + 2, col - 1 : col + 2] = 255
    return images


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (x, y) of a 2-D image, in pixel indices."""
    weights = image.clamp_min(0).double()
    ys, xs = torch.meshgrid(torch.arange(image.shape[0]), torch.arange(image.shape[1]), indexing="ij")
    total = weights.sum()
    return float((weights * xs).sum() / total), float((weights * ys).sum() / total)


def with_params(augment: BatchAugment, images: torch.Tensor, **fixed: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Sample parameters, override some of them, apply them; return the output and the parameters used."""
    params = augment.sample_params(images.shape[0])
    params.update(fixed)
    return augment.apply(images, params), params


# --- seeding -----------------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output():
    images = xray_batch(4, 64)
    make = lambda seed: BatchAugment(get_preset("plan"), image_size=56, normalize=(0.449, 0.226), seed=seed)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    first = a(images)
    assert torch.equal(first, b(images))
    assert not torch.equal(first, c(images))
    assert not torch.equal(first, a(images))  # the stream moves on


def test_state_dict_resumes_the_same_stream():
    images = xray_batch(4, 64)
    augment = BatchAugment(get_preset("cxr"), image_size=64, normalize=RAW, seed=3)
    augment(images)
    buffer = io.BytesIO()
    torch.save(augment.state_dict(), buffer)  # as a checkpoint would hold it
    expected = [augment(images) for _ in range(2)]
    resumed = BatchAugment(get_preset("cxr"), image_size=64, normalize=RAW, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in expected:
        assert torch.equal(resumed(images), want)


def test_reseed_restarts_the_stream():
    images = xray_batch(2, 48)
    augment = BatchAugment(get_preset("plan"), image_size=48, normalize=RAW, seed=0)
    augment.reseed(5)
    first = augment(images)
    augment(images)
    augment.reseed(5)
    assert torch.equal(augment(images), first)


def test_call_draws_what_sample_params_draws():
    images = xray_batch(3, 48)
    augment = BatchAugment(get_preset("plan"), image_size=40, normalize=RAW, seed=1)
    state = augment.state_dict()
    params = augment.sample_params(3)
    augment.load_state_dict(state)
    assert torch.equal(augment(images), augment.apply(images, params))


def test_own_generator_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    BatchAugment(get_preset("plan"), image_size=32, normalize=RAW, seed=0)(xray_batch(2, 32))
    assert torch.equal(torch.rand(3), expected)


def test_each_image_gets_its_own_parameters():
    images = xray_batch(1, 64).expand(8, -1, -1, -1).contiguous()
    out = BatchAugment(get_preset("plan"), image_size=56, normalize=RAW, seed=0)(images)
    flat = out.flatten(1)
    for i in range(8):
        for j in range(i):
            assert not torch.allclose(flat[i], flat[j])


# --- parameters as specified -----------------------------------------------------------------------------------


def test_plan_parameters_follow_the_plan():
    params = BatchAugment(get_preset("plan"), image_size=224, normalize=RAW, seed=0).sample_params(20_000)
    assert abs(params["hflip"].float().mean().item() - 0.5) < 0.02
    assert abs(params["vflip"].float().mean().item() - 0.2) < 0.015
    assert abs(params["contrast_first"].float().mean().item() - 0.5) < 0.02
    angle = params["angle"]
    assert angle.abs().max() <= 20 and angle.min() < -19.5 and angle.max() > 19.5
    assert params["translate"].abs().max() <= 0.1 and params["translate"].abs().max() > 0.099
    for key in ("brightness", "contrast"):
        assert params[key].min() >= 0.8 and params[key].max() <= 1.2
        assert abs(params[key].mean().item() - 1.0) < 0.01
    assert torch.all(params["gamma"] == 1.0)
    x0, y0, w, h = params["box"].unbind(1)
    eps = 1e-6
    assert torch.all((x0 >= 0) & (y0 >= 0) & (x0 + w <= 1 + eps) & (y0 + h <= 1 + eps))
    assert torch.all((w * h >= 0.8 - eps) & (w * h <= 1 + eps))
    assert torch.all((w / h >= 3 / 4 - eps) & (w / h <= 4 / 3 + eps))
    # Boxes wider than tall and taller than wide both occur (an area >= 0.8 that fits keeps w / h in [0.8, 1.25]).
    assert (w / h > 1.15).any() and (w / h < 0.87).any() and x0.max() > 0.1 and y0.max() > 0.1


def test_cxr_gamma_is_log_uniform():
    gamma = BatchAugment(get_preset("cxr"), image_size=224, normalize=RAW, seed=0).sample_params(20_000)["gamma"]
    assert gamma.min() >= 1 / 1.2 - 1e-6 and gamma.max() <= 1.2 + 1e-6
    assert abs(gamma.log().mean().item()) < 0.005


def test_crop_box_falls_back_to_the_centre_when_nothing_fits():
    # Area 1 with ratio 2..3 never fits; torchvision's fallback for a square is then w = 1, h = 1 / 2, centred.
    config = only(scale=(1.0, 1.0), ratio=(2.0, 3.0))
    box = BatchAugment(config, image_size=32, normalize=RAW).sample_params(5)["box"]
    assert torch.allclose(box, torch.tensor([0.0, 0.25, 1.0, 0.5]).expand(5, 4))


def test_scale_one_is_the_whole_image():
    box = BatchAugment(only(scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3)), image_size=32, normalize=RAW).sample_params(50)
    assert torch.equal(box["box"], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(50, 4))


# --- pixels change as specified --------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "dim"), [("hflip", 3), ("vflip", 2)])
def test_flip_is_torch_flip(field, dim):
    images = xray_batch(3, 48)
    out = BatchAugment(only(**{field: 1.0}), image_size=48, normalize=(0.449, 0.226))(images)
    reference = eval_transform(images, image_size=48, crop_fraction=1.0, normalize=(0.449, 0.226))
    assert torch.allclose(out, torch.flip(reference, dims=[dim]), atol=1e-5)


def test_identity_geometry_keeps_every_pixel():
    images = random_images(2, 40)
    out = eval_transform(images, image_size=40, crop_fraction=1.0, normalize=RAW)
    assert torch.allclose(out, images.float() / 255, atol=1e-5)


def test_rotation_moves_a_dot_by_the_sampled_angle():
    size, row, col = 64, 14, 46
    images = dot_image(16, size, row, col)
    augment = BatchAugment(only(rotation=45.0), image_size=size, normalize=RAW, seed=2)
    out, params = with_params(augment, images)
    centre = (size - 1) / 2
    dx, dy = col - centre, row - centre
    for image, angle in zip(out[:, 0], params["angle"].tolist(), strict=True):
        a = math.radians(angle)
        # Counter-clockwise on screen with y pointing down (torchvision's convention).
        want = (centre + dx * math.cos(a) + dy * math.sin(a), centre - dx * math.sin(a) + dy * math.cos(a))
        got = centroid(image)
        assert math.dist(got, want) < 1.5, (angle, got, want)
    assert params["angle"].abs().max() <= 45


def test_rotation_matches_torchvision_rotate():
    images = xray_batch(4, 64)
    augment = BatchAugment(only(rotation=30.0), image_size=64, normalize=RAW, seed=0)
    out, params = with_params(augment, images)
    for image, angle, got in zip(images, params["angle"].tolist(), out, strict=True):
        want = TF.rotate(image.float() / 255, angle, interpolation=TF.InterpolationMode.BILINEAR)
        # Same geometry; only the pixels on the frame's edge differ (torchvision blends its fill, the mask is hard).
        assert ((got - want).abs() > 1e-4).float().mean() < 0.06
        assert torch.allclose(got[:, 24:40, 24:40], want[:, 24:40, 24:40], atol=1e-4)


def test_rotation_fill_is_black():
    images = torch.full((1, 1, 64, 64), 200, dtype=torch.uint8)
    out, _ = with_params(
        BatchAugment(only(rotation=45.0), image_size=64, normalize=RAW), images, angle=torch.tensor([45.0])
    )
    assert out[0, 0, :3, :3].abs().max() == 0 and out[0, 0, -3:, -3:].abs().max() == 0
    assert torch.allclose(out[0, 0, 24:40, 24:40], torch.tensor(200 / 255))


def test_translation_moves_a_dot_by_the_sampled_offset():
    size = 64
    images = dot_image(16, size, 30, 34)
    out, params = with_params(BatchAugment(only(translate=0.2), image_size=size, normalize=RAW, seed=4), images)
    assert params["translate"].abs().max() <= 0.2
    for image, (tx, ty) in zip(out[:, 0], params["translate"].tolist(), strict=True):
        assert math.dist(centroid(image), (34 + tx * size, 30 + ty * size)) < 0.5


def test_translation_fill_is_black():
    images = torch.full((1, 1, 64, 64), 200, dtype=torch.uint8)
    augment = BatchAugment(only(translate=0.3, contrast=0.5), image_size=64, normalize=RAW)
    # 16 px right, 8 px up: exactly whole pixels, so the frame edge falls between pixels.
    out, _ = with_params(augment, images, translate=torch.tensor([[0.25, -0.125]]), contrast=torch.tensor([0.5]))
    image = out[0, 0]
    assert image[:, :16].abs().max() == 0 and image[56:, :].abs().max() == 0  # filled after the jitter: black
    # The contrast mean is over the visible part (a constant), so the contrast leaves it unchanged.
    assert torch.allclose(image[:56, 16:], torch.tensor(200 / 255), atol=1e-6)


def test_brightness_multiplies_the_mean_by_the_sampled_factor():
    images = random_images(8, 48, high=150)  # 1.5 * 150 / 255 < 1: no clipping
    augment = BatchAugment(only(brightness=0.5), image_size=48, normalize=RAW, seed=0)
    out, params = with_params(augment, images)
    base = eval_transform(images, image_size=48, crop_fraction=1.0, normalize=RAW)
    ratio = out.mean(dim=(1, 2, 3)) / base.mean(dim=(1, 2, 3))
    assert torch.allclose(ratio, params["brightness"], rtol=1e-5)
    assert params["brightness"].min() >= 0.5 and params["brightness"].max() <= 1.5


def test_brightness_and_contrast_match_torchvision_in_either_order():
    images = xray_batch(16, 40)
    images[:, :, :8] = 250  # bright regions, so the clipping (where the order matters) is exercised
    augment = BatchAugment(only(brightness=0.6, contrast=0.6), image_size=40, normalize=RAW, seed=0)
    out, params = with_params(augment, images)
    assert params["contrast_first"].any() and not params["contrast_first"].all()
    base = eval_transform(images, image_size=40, crop_fraction=1.0, normalize=RAW)
    for i in range(16):
        b, c = params["brightness"][i].item(), params["contrast"][i].item()
        if params["contrast_first"][i]:
            want = TF.adjust_brightness(TF.adjust_contrast(base[i], c), b)
        else:
            want = TF.adjust_contrast(TF.adjust_brightness(base[i], b), c)
        assert torch.allclose(out[i], want, atol=1e-5), i


def test_gamma_matches_torchvision():
    images = xray_batch(6, 40)
    out, params = with_params(BatchAugment(only(gamma=0.5), image_size=40, normalize=RAW, seed=0), images)
    base = eval_transform(images, image_size=40, crop_fraction=1.0, normalize=RAW)
    for i in range(6):
        assert torch.allclose(out[i], TF.adjust_gamma(base[i], params["gamma"][i].item()), atol=1e-5)


def test_crop_box_matches_torchvision_resized_crop():
    images = xray_batch(2, 64)
    box = torch.tensor([[8 / 64, 4 / 64, 32 / 64, 48 / 64]]).expand(2, 4)  # whole pixels: left 8, top 4, 32 x 48
    out, _ = with_params(BatchAugment(only(scale=(0.2, 1.0)), image_size=64, normalize=RAW), images, box=box)
    want = TF.resized_crop(
        images.float() / 255, 4, 8, 48, 32, [64, 64], interpolation=TF.InterpolationMode.BILINEAR, antialias=False
    )
    # Inside, the same samples; at the box edge torchvision clamps to the crop, we read the real neighbour.
    assert torch.allclose(out[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2], atol=1e-5)


# --- presets, shapes, eval ---------------------------------------------------------------------------------------


def test_plan_preset_output():
    images = xray_batch(8, 256)
    base = eval_transform(images, image_size=224, crop_fraction=224 / 256, normalize=(0.0, 1.0))
    normalize = (base.mean().item(), base.std().item())  # the evaluation images' own statistics
    out = BatchAugment(get_preset("plan"), image_size=224, normalize=normalize, seed=0)(images)
    assert out.shape == (8, 1, 224, 224) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.max() <= (1 - normalize[0]) / normalize[1] + 1e-5 and out.min() >= -normalize[0] / normalize[1] - 1e-5
    # The black fill of RandomRotation(20) + translate 0.1 (~13 % of the pixels) pulls the mean down ...
    dark = out * normalize[1] + normalize[0] < 0.2
    assert 0.05 < dark.float().mean() < 0.25
    assert -0.8 < out.mean() < 0.0 and 0.9 < out.std() < 1.4
    # ... and outside it the crop and jitter change the statistics only a little.
    assert abs(out[~dark].mean().item()) < 0.3 and 0.75 < out[~dark].std().item() < 1.2


def test_eval_transform_is_a_deterministic_center_crop():
    images = random_images(3, 256)
    out = eval_transform(images, image_size=224, crop_fraction=224 / 256, normalize=RAW)
    assert out.shape == (3, 1, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, eval_transform(images, image_size=224, crop_fraction=224 / 256, normalize=RAW))
    # 224/256 of 256 px at 224 px lands on whole pixels: exactly torchvision's CenterCrop(224).
    assert torch.allclose(out, images[:, :, 16:240, 16:240].float() / 255, atol=1e-5)


@pytest.mark.parametrize("crop_fraction", [1.0, 224 / 256])
def test_eval_transform_is_batch_augment_with_everything_off(crop_fraction):
    images = xray_batch(4, 256)
    augment = BatchAugment(only(crop_fraction=crop_fraction), image_size=224, normalize=(0.449, 0.226), seed=0)
    want = eval_transform(images, image_size=224, crop_fraction=crop_fraction, normalize=(0.449, 0.226))
    assert torch.equal(augment(images), want)
    if crop_fraction == get_preset("none").crop_fraction:
        assert torch.equal(BatchAugment(get_preset("none"), image_size=224, normalize=(0.449, 0.226))(images), want)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_other_cache_and_output_sizes(preset):
    images = xray_batch(4, 300)
    out = BatchAugment(get_preset(preset), image_size=160, normalize=(0.5, 0.5), seed=0)(images)
    assert out.shape == (4, 1, 160, 160) and torch.isfinite(out).all()
    flat = torch.full((2, 1, 300, 300), 128, dtype=torch.uint8)
    crop = get_preset(preset).crop_fraction
    assert torch.allclose(
        eval_transform(flat, image_size=160, crop_fraction=crop, normalize=RAW), torch.tensor(128 / 255)
    )


def test_downscaling_is_antialiased():
    # A one-pixel checkerboard shrunk 300 -> 150 must become flat grey, not an aliased pattern.
    board = ((torch.arange(300)[:, None] + torch.arange(300)) % 2 * 255).to(torch.uint8).expand(1, 1, 300, 300)
    out = eval_transform(board, image_size=150, crop_fraction=1.0, normalize=RAW)
    assert (out - 0.5).abs().max() < 0.02


def test_three_dimensional_batches_are_accepted():
    images = xray_batch(2, 48)
    augment = lambda: BatchAugment(get_preset("cxr"), image_size=48, normalize=RAW, seed=0)  # noqa: E731
    assert torch.equal(augment()(images[:, 0]), augment()(images))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(PRESETS)),
    size=st.integers(16, 80),
    image_size=st.integers(8, 64),
    seed=st.integers(0, 2**31),
)
def test_any_preset_and_size_stays_in_range(name, size, image_size, seed):
    out = BatchAugment(get_preset(name), image_size=image_size, normalize=(0.25, 0.5), seed=seed)(
        random_images(3, size, seed=seed % 1000)
    )
    assert out.shape == (3, 1, image_size, image_size)
    assert out.min() >= (0 - 0.25) / 0.5 - 1e-5 and out.max() <= (1 - 0.25) / 0.5 + 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_the_input_device_and_matches_cpu():
    images = xray_batch(4, 256)
    make = lambda: BatchAugment(get_preset("plan"), image_size=224, normalize=(0.449, 0.226), seed=0)  # noqa: E731
    out = make()(images.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), make()(images), atol=1e-4)


# --- errors ------------------------------------------------------------------------------------------------------


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean plan"):
        get_preset("pln")


@pytest.mark.parametrize(
    "changes",
    [
        {"crop_fraction": 0.0},
        {"crop_fraction": 1.5},
        {"scale": (0.9, 0.8)},
        {"scale": (0.0, 1.0)},
        {"ratio": (0.0, 1.0)},
        {"hflip": 1.5},
        {"vflip": -0.1},
        {"rotation": -1.0},
        {"translate": 1.0},
        {"brightness": -0.1},
        {"gamma": math.inf},
    ],
)
def test_bad_config_values_are_setting_errors(changes):
    with pytest.raises(SettingError, match=next(iter(changes))):
        only(**changes)


def test_bad_arguments():
    with pytest.raises(SettingError, match="image_size"):
        BatchAugment(get_preset("plan"), image_size=0, normalize=RAW)
    with pytest.raises(SettingError, match="normalize"):
        eval_transform(random_images(1, 8), image_size=8, crop_fraction=1.0, normalize=(0.5, 0.0))
    with pytest.raises(SettingError, match="crop_fraction"):
        eval_transform(random_images(1, 8), image_size=8, crop_fraction=0.0, normalize=RAW)
    augment = BatchAugment(get_preset("plan"), image_size=8, normalize=RAW)
    with pytest.raises(TypeError, match="uint8"):
        augment(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="square"):
        augment(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        augment(torch.zeros(1, 1, 8, 9, dtype=torch.uint8))
