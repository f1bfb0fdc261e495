"""Tests for simclrkit.augment: counter-based randomness, parameter statistics, each op against
a naive or hand-computed reference, the per-sample path against the batched path, eval crops.

Statistical checks draw many parameters (cheap: no image work) and allow 5 binomial standard
errors, so a correct sampler fails about once in 3.5 million runs.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclrkit import augment, render
from simclrkit.augment import (
    NUM_SLOTS,
    EvalAugment,
    SimCLRAugment,
    apply_eval,
    cifar_augment,
    default_blur,
    imagenet_augment,
    uniforms,
)

from conftest import smooth_images

DRAWS = 20_000


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _binomial_ok(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - total * p) <= sigmas * math.sqrt(total * p * (1 - p))


def _params(batch: int, image_height: int, image_width: int, **overrides) -> augment.Params:
    """Identity parameters (full crop, nothing applied) with some fields replaced."""
    params = augment._fixed_params(batch, (0, 0, image_height, image_width))
    for key, value in overrides.items():
        params[key] = torch.as_tensor(value).expand_as(params[key]).clone()
    return params


def _jitter_only(batch: int, size: int, order=(0, 1, 2, 3), **factors) -> dict[str, torch.Tensor]:
    """Colour jitter on with neutral factors except those given."""
    params = _params(batch, size, size, jitter=True)
    params["order"] = torch.tensor(order).repeat(batch, 1)
    for key, value in factors.items():
        params[key] = torch.full((batch,), float(value), dtype=torch.float64)
    return params


@pytest.fixture(params=["kernel", "tensor ops"])
def cpu_path(request, monkeypatch):
    """Runs a rendering test on both CPU paths: the compiled kernels and the tensor ops."""
    monkeypatch.setattr(render, "_CPU_KERNEL", request.param == "kernel")
    return request.param


# ------------------------------------------------------------------------------------------
# Counter-based randomness
# ------------------------------------------------------------------------------------------


def test_uniforms_deterministic_in_range_and_shaped():
    first = uniforms(3, 1, torch.arange(50), 0, 7)
    assert first.shape == (50, 7) and first.dtype == torch.float64
    assert torch.equal(first, uniforms(3, 1, list(range(50)), 0, 7))
    assert bool((first >= 0).all()) and bool((first < 1).all())


@pytest.mark.parametrize(
    "changed", [dict(seed=4), dict(epoch=2), dict(view=1), dict(indices=torch.arange(1, 51))]
)
def test_uniforms_change_with_every_key(changed):
    key = dict(seed=3, epoch=1, indices=torch.arange(50), view=0, num_slots=7)
    base = uniforms(**key)
    other = uniforms(**{**key, **changed})
    assert bool((base != other).all())


def test_uniforms_differ_across_slots():
    u = uniforms(0, 0, torch.arange(100), 0, NUM_SLOTS)
    # Every pair of slots differs for every sample (equal doubles would betray a weak hash).
    assert all(len(set(row.tolist())) == NUM_SLOTS for row in u)


def test_uniforms_do_not_depend_on_batch_composition():
    alone = uniforms(11, 5, [7], 1, 9)
    inside = uniforms(11, 5, [3, 7, 123456789], 1, 9)
    assert torch.equal(alone[0], inside[1])


def test_uniforms_accept_extreme_keys():
    u = uniforms(2**70 + 5, -1, [-3, 2**62], 2**40, 3)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    # The seed is taken modulo 2**64, as documented.
    assert torch.equal(uniforms(2**64 + 5, -1, [-3], 2**40, 3), uniforms(5, -1, [-3], 2**40, 3))


def test_uniforms_moments_and_correlations():
    u = uniforms(1, 0, torch.arange(DRAWS), 0, 4)
    values = u.flatten()
    count = values.numel()
    # Mean: sd sqrt(1/12/n); variance estimator: sd sqrt((1/80 - 1/144)/n).
    assert abs(values.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / count)
    assert abs(values.var().item() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / count)
    centred = u - 0.5
    # Adjacent slots and adjacent indices are uncorrelated (sd of r is about 1/sqrt(n)).
    for a, b in ((centred[:, 0], centred[:, 1]), (centred[:-1, 2], centred[1:, 2])):
        r = (a * b).mean() / (a.std() * b.std())
        assert abs(r.item()) < 5 / math.sqrt(a.numel())
    # Histogram of 10 bins is flat.
    counts = torch.histc(values.float(), bins=10, min=0, max=1)
    assert all(_binomial_ok(int(c), count, 0.1) for c in counts)


# ------------------------------------------------------------------------------------------
# Parameter sampling
# ------------------------------------------------------------------------------------------


def _torchvision_crop(u: list[float], height: int, width: int, scale, ratio):
    """torchvision RandomResizedCrop.get_params written as a loop, fed our uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        a, r, t, l = u[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(t * (height - h + 1)), int(l * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(256, 256), (100, 300), (300, 90), (31, 32)])
def test_crop_sampler_matches_torchvision_algorithm(height, width):
    aug = SimCLRAugment(output_size=32)
    indices = torch.arange(300)
    params = aug.sample_params(9, 2, indices, 1, height, width)
    u = uniforms(9, 2, indices, 1, NUM_SLOTS)
    for b in range(300):
        expected = _torchvision_crop(u[b, :40].tolist(), height, width, (0.08, 1.0), (3 / 4, 4 / 3))
        got = tuple(int(params[k][b]) for k in ("top", "left", "height", "width"))
        assert got == expected


def test_crop_area_and_aspect_ranges_and_area_distribution():
    params = imagenet_augment().sample_params(0, 0, torch.arange(DRAWS), 0, 256, 256)
    h, w = params["height"].double(), params["width"].double()
    assert bool((params["top"] >= 0).all()) and bool((params["left"] >= 0).all())
    assert bool((params["top"] + params["height"] <= 256).all())
    assert bool((params["left"] + params["width"] <= 256).all())
    fraction = h * w / 256**2
    # Rounding h and w to pixels moves the area by about one part in sqrt(area).
    assert fraction.min() >= 0.08 * 0.97 and fraction.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    # Below 0.75 of the area no attempt can fail (0.75 * 4/3 = 1), so accepted areas are
    # uniform there: six equal bins get equal shares.
    low = fraction[fraction < 0.74]
    counts = torch.histc(low.float(), bins=6, min=0.08, max=0.74)
    assert all(_binomial_ok(int(c), low.numel(), 1 / 6) for c in counts)


def test_probabilities_of_the_decisions():
    aug = imagenet_augment()
    params = aug.sample_params(5, 3, torch.arange(DRAWS), 0, 64, 64)
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        assert _binomial_ok(int(params[name].sum()), DRAWS, p), name


@pytest.mark.parametrize("strength", [1.0, 0.5, 1.5])
def test_colour_factor_ranges(strength):
    aug = SimCLRAugment(output_size=32, color_jitter_strength=strength)
    params = aug.sample_params(0, 0, torch.arange(DRAWS), 1, 40, 40)
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    for name in ("brightness", "contrast", "saturation"):
        values = params[name]
        assert values.min() >= low and values.max() <= high, name
        # Uniform: the mean is the midpoint within 5 standard errors.
        assert abs(values.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * DRAWS)
        # And the range is covered: extremes within 0.1% of the ends.
        margin = 1e-3 * (high - low)
        assert values.min() < low + margin and values.max() > high - margin
    hue = params["hue"]
    assert hue.min() >= -0.2 * strength and hue.max() <= 0.2 * strength
    assert abs(hue.mean()) < 5 * 0.4 * strength / math.sqrt(12 * DRAWS)


def test_additive_brightness_range():
    aug = SimCLRAugment(output_size=32, brightness="additive", color_jitter_strength=0.5)
    delta = aug.sample_params(0, 0, torch.arange(DRAWS), 0, 40, 40)["brightness"]
    assert delta.min() >= -0.4 and delta.max() <= 0.4 and delta.min() < -0.39


def test_sigma_range():
    sigma = imagenet_augment().sample_params(0, 0, torch.arange(DRAWS), 0, 64, 64)["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert abs(sigma.mean() - 1.05) < 5 * 1.9 / math.sqrt(12 * DRAWS)


def test_every_order_of_the_four_ops_is_equally_likely():
    order = imagenet_augment().sample_params(2, 0, torch.arange(DRAWS), 0, 64, 64)["order"]
    assert bool((order.sort(dim=1).values == torch.arange(4)).all())  # permutations
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert counts.numel() == 24
    assert all(_binomial_ok(int(c), DRAWS, 1 / 24) for c in counts)


def test_per_sample_views_in_one_call_equal_separate_calls():
    aug = imagenet_augment()
    both = aug.sample_params(4, 1, [9, 9, 2], [0, 1, 1], 80, 90)
    first = aug.sample_params(4, 1, [9], 0, 80, 90)
    second = aug.sample_params(4, 1, [9, 2], 1, 80, 90)
    for key in both:
        assert torch.equal(both[key][0], first[key][0]), key
        assert torch.equal(both[key][1:], second[key]), key


def test_params_independent_of_batch_and_differ_between_views():
    aug = imagenet_augment()
    alone = aug.sample_params(1, 2, [7], 0, 100, 120)
    inside = aug.sample_params(1, 2, [3, 7, 8], 0, 100, 120)
    for key in alone:
        assert torch.equal(alone[key][0], inside[key][1]), key
    other_view = aug.sample_params(1, 2, [7], 1, 100, 120)
    assert not torch.equal(alone["sigma"], other_view["sigma"])


# ------------------------------------------------------------------------------------------
# Rendering: each op against a naive or hand-computed reference
# ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cpu_path")
def test_identity_params_reproduce_the_input():
    images = smooth_images(3, 20)
    out = SimCLRAugment(output_size=20).apply(images, _params(3, 20, 20))
    assert out.dtype == torch.float32 and out.shape == (3, 3, 20, 20)
    _close(out, images.float() / 255)
    floats = images.float() / 255
    _close(SimCLRAugment(output_size=20).apply(floats, _params(3, 20, 20)), floats)


@pytest.mark.usefixtures("cpu_path")
def test_flip_matches_torch_flip():
    images = smooth_images(2, 16)
    aug = SimCLRAugment(output_size=16)
    flipped = aug.apply(images, _params(2, 16, 16, flip=True))
    _close(flipped, torch.flip(images.float() / 255, dims=[-1]))


@pytest.mark.usefixtures("cpu_path")
def test_crop_and_resize_match_grid_sample_bicubic():
    images = smooth_images(6, 48, seed=1)
    aug = SimCLRAugment(output_size=24)
    params = aug.sample_params(4, 0, torch.arange(6), 0, 48, 48)
    geometry = {k: params[k] for k in ("top", "left", "height", "width", "flip")}
    out = aug.apply(images, _params(6, 48, 48, **geometry))
    # The same crop as an affine grid (pixel-centre convention, align_corners=False).
    theta = torch.zeros(6, 2, 3, dtype=torch.float64)
    scale_x = params["width"].double() / 48
    theta[:, 0, 0] = torch.where(params["flip"], -scale_x, scale_x)
    theta[:, 0, 2] = (2 * params["left"] + params["width"]).double() / 48 - 1
    theta[:, 1, 1] = params["height"].double() / 48
    theta[:, 1, 2] = (2 * params["top"] + params["height"]).double() / 48 - 1
    grid = F.affine_grid(theta, (6, 3, 24, 24), align_corners=False)
    expected = F.grid_sample(
        images.double() / 255, grid, mode="bicubic", padding_mode="border", align_corners=False
    ).clamp(0, 1)
    _close(out.double(), expected)


@pytest.mark.usefixtures("cpu_path")
def test_grayscale_weights_and_channels():
    images = smooth_images(2, 8)
    out = SimCLRAugment(output_size=8).apply(images, _params(2, 8, 8, grayscale=True))
    x = images.double() / 255
    expected = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    for channel in range(3):
        _close(out[:, channel].double(), expected)


@pytest.mark.usefixtures("cpu_path")
def test_brightness_multiplicative_and_additive_with_clipping():
    images = smooth_images(2, 8)
    x = images.float() / 255
    out = SimCLRAugment(output_size=8).apply(images, _jitter_only(2, 8, brightness=1.5))
    _close(out, (x * 1.5).clamp(0, 1))
    additive = SimCLRAugment(output_size=8, brightness="additive")
    out = additive.apply(images, _jitter_only(2, 8, brightness=-0.3))
    _close(out, (x - 0.3).clamp(0, 1))


@pytest.mark.usefixtures("cpu_path")
def test_contrast_uses_each_channels_mean():
    images = smooth_images(2, 8)
    x = images.double() / 255
    out = SimCLRAugment(output_size=8).apply(images, _jitter_only(2, 8, contrast=1.7))
    mean = x.mean(dim=(2, 3), keepdim=True)
    _close(out.double(), ((x - mean) * 1.7 + mean).clamp(0, 1))


@pytest.mark.usefixtures("cpu_path")
def test_random_order_is_applied_in_order_with_clipping():
    images = smooth_images(1, 8)
    x = images.double() / 255
    aug = SimCLRAugment(output_size=8)

    def contrast(v, f):
        mean = v.mean(dim=(2, 3), keepdim=True)
        return ((v - mean) * f + mean).clamp(0, 1)

    factors = dict(brightness=1.6, contrast=0.4)
    bright_first = aug.apply(images, _jitter_only(1, 8, (0, 1, 2, 3), **factors))
    contrast_first = aug.apply(images, _jitter_only(1, 8, (1, 3, 0, 2), **factors))
    _close(bright_first.double(), contrast((x * 1.6).clamp(0, 1), 0.4))
    _close(contrast_first.double(), (contrast(x, 0.4) * 1.6).clamp(0, 1))
    assert (bright_first - contrast_first).abs().max() > 0.01


def _colorsys_map(images: torch.Tensor, function) -> torch.Tensor:
    out = images.double().clone()
    for b in range(images.shape[0]):
        for i in range(images.shape[2]):
            for j in range(images.shape[3]):
                out[b, :, i, j] = torch.tensor(function(b, *images[b, :, i, j].tolist()))
    return out


@pytest.mark.usefixtures("cpu_path")
def test_hue_and_saturation_match_colorsys():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 6, 6, generator=generator)
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.2])  # ties for the max
    x[0, :, 0, 1] = 0.3  # gray
    x[0, :, 0, 2] = 0.0  # black
    shifts = [0.0, 0.13, -0.37, 0.5]
    factors = [0.0, 0.5, 1.7, 3.0]
    aug = SimCLRAugment(output_size=6)
    hue_params = _jitter_only(4, 6)
    hue_params["hue"] = torch.tensor(shifts, dtype=torch.float64)
    saturation_params = _jitter_only(4, 6)
    saturation_params["saturation"] = torch.tensor(factors, dtype=torch.float64)

    def rotate(b, r, g, bl):
        h, s, v = colorsys.rgb_to_hsv(r, g, bl)
        return colorsys.hsv_to_rgb((h + shifts[b]) % 1.0, s, v)

    def saturate(b, r, g, bl):
        h, s, v = colorsys.rgb_to_hsv(r, g, bl)
        return colorsys.hsv_to_rgb(h, min(1.0, s * factors[b]), v)

    _close(aug.apply(x, hue_params).double(), _colorsys_map(x, rotate))
    _close(aug.apply(x, saturation_params).double(), _colorsys_map(x, saturate))


@pytest.mark.usefixtures("cpu_path")
def test_hue_special_shifts():
    images = smooth_images(2, 8)
    x = images.float() / 255
    aug = SimCLRAugment(output_size=8)
    for shift in (0.0, 1.0, -1.0):
        _close(aug.apply(images, _jitter_only(2, 8, hue=shift)), x)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    green = SimCLRAugment(output_size=4).apply(red, _jitter_only(1, 4, hue=1 / 3))
    _close(green, torch.roll(red, 1, dims=1))


@pytest.mark.usefixtures("cpu_path")
def test_saturation_zero_gives_equal_channels_at_the_max():
    images = smooth_images(2, 8)
    out = SimCLRAugment(output_size=8).apply(images, _jitter_only(2, 8, saturation=0.0))
    expected = (images.float() / 255).amax(dim=1)  # TF: S = 0 keeps V = max
    for channel in range(3):
        _close(out[:, channel], expected)


def _naive_blur(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian written as a full 2-D sum, zero outside the image."""
    offsets = np.arange(-radius, radius + 1)
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    g /= g.sum()
    channels, height, width = image.shape
    out = np.zeros_like(image)
    for i in range(height):
        for j in range(width):
            total = np.zeros(channels)
            for di, gi in zip(offsets, g):
                for dj, gj in zip(offsets, g):
                    if 0 <= i + di < height and 0 <= j + dj < width:
                        total += gi * gj * image[:, i + di, j + dj]
            out[:, i, j] = total
    return out


@pytest.mark.usefixtures("cpu_path")
def test_blur_matches_naive_gaussian_with_zero_padding():
    images = smooth_images(3, 40, seed=2)
    aug = SimCLRAugment(output_size=40)
    params = _params(3, 40, 40, blur=torch.tensor([True, False, True]))
    params["sigma"] = torch.tensor([1.3, 1.0, 0.4], dtype=torch.float64)
    out = aug.apply(images, params).double().numpy()
    x = images.double().numpy() / 255
    radius = (40 // 10) // 2  # reference: kernel_size = side // 10, radius = kernel_size // 2
    np.testing.assert_allclose(out[0], _naive_blur(x[0], 1.3, radius), atol=1e-6)
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)  # no blur for this sample
    np.testing.assert_allclose(out[2], _naive_blur(x[2], 0.4, radius), atol=1e-6)


@pytest.mark.usefixtures("cpu_path")
def test_blur_keeps_a_constant_interior_and_darkens_the_border():
    constant = torch.full((1, 3, 64, 64), 0.6)
    params = _params(1, 64, 64, blur=True)
    params["sigma"] = torch.tensor([2.0], dtype=torch.float64)
    out = SimCLRAugment(output_size=64).apply(constant, params)
    radius = 3  # 64 // 10 = 6 -> radius 3
    _close(out[..., radius:-radius, radius:-radius], constant[..., radius:-radius, radius:-radius])
    g = np.exp(-(np.arange(-3, 4) ** 2) / 8.0)
    g /= g.sum()
    corner = 0.6 * g[3:].sum() ** 2  # half the kernel (and the centre) along each axis
    assert abs(out[0, 0, 0, 0].item() - corner) < 1e-6


@pytest.mark.usefixtures("cpu_path")
def test_blur_size_rule():
    images = smooth_images(1, 19)
    params = _params(1, 19, 19, blur=True)
    # 19 // 10 = 1, radius int(1 / 2) = 0: a one-tap kernel, the blur is a no-op below 20 px.
    _close(SimCLRAugment(output_size=19).apply(images, params), images.float() / 255)
    images = smooth_images(1, 32)
    blurred = SimCLRAugment(output_size=32).apply(images, _params(1, 32, 32, blur=True))
    assert (blurred - images.float() / 255).abs().max() > 1e-3  # 3 taps at 32 px


# ------------------------------------------------------------------------------------------
# Paths, shapes, channels, chunks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [imagenet_augment(48), cifar_augment(16)])
@pytest.mark.usefixtures("cpu_path")
def test_per_sample_path_equals_batched_path(preset):
    images = smooth_images(9, 56, seed=4)
    indices = torch.arange(100, 109)
    view1, view2 = preset.views(images, 7, 3, indices)
    for b in range(9):
        one, two = preset(images[b], 7, 3, int(indices[b]))
        _close(one, view1[b])
        _close(two, view2[b])


def test_chunked_rendering_equals_one_chunk(monkeypatch):
    images = smooth_images(7, 40, seed=5)
    monkeypatch.setattr(render, "_CPU_KERNEL", False)  # the tensor ops' chunking
    aug = imagenet_augment(32)
    whole = aug.views(images, 1, 0, torch.arange(7))
    monkeypatch.setattr(render, "_CPU_CHUNK_BYTES", 1)  # one sample per chunk
    chunked = aug.views(images, 1, 0, torch.arange(7))
    for a, b in zip(whole, chunked):
        _close(a, b)


def test_gather_scatter_colour_path_equals_slice_path(monkeypatch):
    # The path used on accelerators when a selection is fragmented, forced on the CPU.
    images = smooth_images(12, 40, seed=6)
    monkeypatch.setattr(render, "_CPU_KERNEL", False)  # the tensor ops' colour selection
    aug = imagenet_augment(32)
    sliced = aug.views(images, 2, 0, torch.arange(12))
    monkeypatch.setattr(render, "_prefers_slices", lambda device, runs: False)
    gathered = aug.views(images, 2, 0, torch.arange(12))
    for a, b in zip(sliced, gathered):
        _close(a, b)


@pytest.mark.usefixtures("cpu_path")
def test_outputs_shape_range_dtype_and_reproducibility():
    images = smooth_images(5, 50)
    aug = imagenet_augment(40)
    first = aug.views(images, 0, 0, torch.arange(5), num_views=3)
    assert len(first) == 3
    for view in first:
        assert view.shape == (5, 3, 40, 40) and view.dtype == torch.float32 and view.is_contiguous()
        assert view.min() >= 0 and view.max() <= 1
    again = aug.views(images, 0, 0, torch.arange(5), num_views=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch = aug.views(images, 0, 1, torch.arange(5), num_views=1)
    assert not torch.equal(first[0], other_epoch[0])
    assert not torch.equal(first[0], first[1])


@pytest.mark.usefixtures("cpu_path")
def test_apply_writes_into_out_buffer():
    images = smooth_images(5, 40)
    aug = imagenet_augment(32)
    params = aug.sample_params(0, 0, torch.arange(5), 0, 40, 40)
    buffer = torch.full((5, 3, 32, 32), -1.0)
    result = aug.apply(images, params, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    _close(buffer, aug.apply(images, params), atol=0)
    with pytest.raises(ValueError, match="out"):
        aug.apply(images, params, out=torch.empty(5, 3, 32, 31))


@pytest.mark.usefixtures("cpu_path")
def test_float_input_matches_uint8_input():
    images = smooth_images(4, 30)
    aug = imagenet_augment(24)
    params = aug.sample_params(0, 0, torch.arange(4), 0, 30, 30)
    # uint8 folds the 1/255 into the resampling weights: rounding differs by an ulp or two,
    # which the colour ops (factors up to 1.8) and the blur may amplify a little.
    _close(aug.apply(images.float() / 255, params), aug.apply(images, params), atol=1e-5)


@pytest.mark.usefixtures("cpu_path")
def test_single_channel_images():
    gray = smooth_images(4, 30, channels=1)
    aug = SimCLRAugment(output_size=24, grayscale_prob=0.0)
    params = aug.sample_params(0, 0, torch.arange(4), 0, 30, 30)
    params["jitter"][:] = True
    out = aug.apply(gray, params)
    assert out.shape == (4, 1, 24, 24)
    # Saturation and hue do nothing on gray pixels, so RGB copies of the image agree.
    rgb = aug.apply(gray.expand(-1, 3, -1, -1), params)
    for channel in range(3):
        _close(rgb[:, channel : channel + 1], out)
    view1, view2 = aug(gray[0], 0, 0, 0)
    assert view1.shape == (1, 24, 24) and view2.shape == (1, 24, 24)


@pytest.mark.usefixtures("cpu_path")
def test_per_sample_path_any_size_and_normalisation():
    aug = SimCLRAugment(output_size=16, normalize=((0.5, 0.4, 0.3), (0.2, 0.25, 0.5)))
    image = smooth_images(1, 37)[0, :, :, :29]
    plain = SimCLRAugment(output_size=16)
    normalised, _ = aug(image, 0, 0, 3)
    raw, _ = plain(image, 0, 0, 3)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    _close(normalised, (raw - mean) / std, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = smooth_images(6, 64)
    aug = imagenet_augment(48)
    params = aug.sample_params(0, 0, torch.arange(6), 0, 64, 64)
    cpu = aug.apply(images, params)
    gpu = aug.apply(images.cuda(), params)
    assert gpu.is_cuda
    _close(gpu.cpu(), cpu, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Evaluation transforms and presets
# ------------------------------------------------------------------------------------------


def test_eval_test_centre_crop_is_exact_at_matching_size():
    images = smooth_images(2, 64)
    out = apply_eval(images, 56, train=False)  # rint(0.875 * 64) = 56, offset (64-56+1)//2 = 4
    _close(out, images[:, :, 4:60, 4:60].float() / 255)


def test_eval_no_crop_at_cifar_size_and_reference_box_for_non_square():
    images = smooth_images(2, 32)
    _close(apply_eval(images, 32, train=False), images.float() / 255)
    params = EvalAugment(output_size=48).sample_params(False, 100, 60, indices=[0])
    # Side rint(0.875 * 60) = 52 (half to even), offsets ((100-52)+1)//2 and ((60-52)+1)//2.
    box = tuple(int(params[k][0]) for k in ("top", "left", "height", "width"))
    assert box == (24, 4, 52, 52)
    assert not params["jitter"].any() and not params["blur"].any()


def test_eval_train_is_crop_and_flip_only():
    images = smooth_images(6, 40)
    out = apply_eval(images, 32, train=True, seed=3, epoch=1, indices=torch.arange(6))
    reference = SimCLRAugment(output_size=32, color_jitter_prob=0, grayscale_prob=0, blur_prob=0)
    expected = reference.views(images, 3, 1, torch.arange(6), num_views=1)[0]
    _close(out, expected)
    single = EvalAugment(output_size=32)(images[2], True, 3, 1, 2)
    _close(single, expected[2])
    flips = EvalAugment(output_size=32).sample_params(True, 40, 40, 0, 0, torch.arange(DRAWS))
    flips = flips["flip"]
    assert _binomial_ok(int(flips.sum()), DRAWS, 0.5)


def test_presets_and_blur_rule():
    assert not default_blur(32) and default_blur(33) and default_blur(224)
    imagenet = imagenet_augment()
    assert imagenet.output_size == 224 and imagenet.color_jitter_strength == 1.0
    assert imagenet.blur_prob == 0.5 and imagenet.brightness == "multiplicative"
    cifar = cifar_augment()
    assert cifar.output_size == 32 and cifar.color_jitter_strength == 0.5 and cifar.blur_prob == 0.0
    assert imagenet_augment(32).blur_prob == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        imagenet.blur_prob = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(output_size=0), "output_size"),
        (dict(output_size=True), "output_size"),
        (dict(output_size=32, crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(output_size=32, crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(output_size=32, crop_ratio=(0.0, 1.0)), "crop_ratio"),
        (dict(output_size=32, flip_prob=1.5), "flip_prob"),
        (dict(output_size=32, color_jitter_prob=-0.1), "color_jitter_prob"),
        (dict(output_size=32, color_jitter_strength=-1.0), "color_jitter_strength"),
        (dict(output_size=32, blur_sigma=(2.0, 0.1)), "blur_sigma"),
        (dict(output_size=32, brightness="both"), "brightness"),
        (dict(output_size=32, normalize=((0.5,), (0.0,))), "normalize"),
        (dict(output_size=32, crop_ratio=0.5), "crop_ratio"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SimCLRAugment(**kwargs)


def test_apply_rejects_bad_inputs():
    aug = SimCLRAugment(output_size=8)
    images = smooth_images(2, 16)
    with pytest.raises(ValueError, match="inside"):
        aug.apply(images, _params(2, 17, 16))
    with pytest.raises(ValueError, match="channels"):
        aug.apply(torch.zeros(2, 2, 16, 16, dtype=torch.uint8), _params(2, 16, 16))
    with pytest.raises(ValueError, match="batch size"):
        aug.apply(images, _params(3, 16, 16))
    with pytest.raises(ValueError, match="normalize"):
        SimCLRAugment(output_size=8, normalize=((0.5,) * 3, (0.2,) * 3)).apply(
            torch.zeros(2, 1, 16, 16, dtype=torch.uint8), _params(2, 16, 16)
        )
    with pytest.raises(ValueError, match="crop_proportion"):
        EvalAugment(output_size=8, crop_proportion=0.0)
