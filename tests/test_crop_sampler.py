"""The reference crop sampler against an independent port of TF's algorithm.

TF's ``sample_distorted_bounding_box`` (``sample_distorted_bounding_box_op.cc``) is written
out below as the C++ does it, one attempt at a time with Python's ``random``; simclrkit's
vectorised sampler must draw crops of the same distribution (two-sample Kolmogorov-Smirnov
tests over 100,000 draws of the area fraction and the aspect ratio), and both code paths of the
transform must crop alike.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from simclrkit.augment import SimCLRAugment


def _lrint(x: float) -> int:
    return int(np.rint(np.float32(x)))  # lrintf: round half to even


def _tf_crop(rng: random.Random, height: int, width: int, area_range, aspect_range,
             min_covered=0.1, attempts=100) -> tuple[int, int]:
    """One crop (height, width) as TF draws it, for the whole-image object box."""
    for _ in range(attempts):
        aspect = rng.random() * (aspect_range[1] - aspect_range[0]) + aspect_range[0]
        min_area = area_range[0] * width * height
        max_area = area_range[1] * width * height
        crop_h = _lrint(math.sqrt(min_area / aspect))
        max_h = _lrint(math.sqrt(max_area / aspect))
        if _lrint(max_h * aspect) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if _lrint(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        crop_h = min(crop_h, max_h)
        if crop_h < max_h:
            crop_h += rng.randrange(max_h - crop_h + 1)
        crop_w = _lrint(crop_h * aspect)
        area = crop_w * crop_h
        if area < min_area:
            crop_h += 1
            crop_w = _lrint(crop_h * aspect)
            area = crop_w * crop_h
        if area > max_area:
            crop_h -= 1
            crop_w = _lrint(crop_h * aspect)
            area = crop_w * crop_h
        if (area < min_area or area > max_area or crop_w > width or crop_h > height
                or crop_w <= 0 or crop_h <= 0):
            continue
        if area / (width * height) >= min_covered:
            return crop_h, crop_w
    return height, width


@pytest.mark.parametrize("size", [(32, 32), (224, 300)])
def test_reference_sampler_matches_tf_algorithm(size):
    height, width = size
    draws = 100_000
    rng = random.Random(0)
    expected = np.array([_tf_crop(rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
                         for _ in range(draws)], dtype=np.float64)
    augment = SimCLRAugment(output_size=32, crop_sampler="reference")
    boxes = []
    for start in range(0, draws, 10_000):
        params = augment.sample_params(7, 0, np.arange(start, start + 10_000), 0, height, width)
        boxes.append(torch.stack([params["height"], params["width"]], 1).numpy())
    got = np.concatenate(boxes).astype(np.float64)
    for name, a, b in (
        ("area", got.prod(1) / (height * width), expected.prod(1) / (height * width)),
        ("aspect", got[:, 1] / got[:, 0], expected[:, 1] / expected[:, 0]),
    ):
        result = stats.ks_2samp(a, b)
        assert result.pvalue > 1e-3, (name, result)
    # The property that sets it apart: smaller crops than torchvision's, never under 10%.
    torchvision = SimCLRAugment(output_size=32).sample_params(
        7, 0, np.arange(draws), 0, height, width
    )
    tv_area = (torchvision["height"] * torchvision["width"]).double().mean() / (height * width)
    ref_area = got.prod(1) / (height * width)
    assert ref_area.min() >= 0.1 - 1e-9
    assert ref_area.mean() < float(tv_area) - 0.03


def test_reference_crops_stay_inside_the_image():
    augment = SimCLRAugment(output_size=16, crop_sampler="reference")
    for height, width in ((5, 40), (40, 5), (1, 1), (17, 23)):
        p = augment.sample_params(0, 3, np.arange(5000), 1, height, width)
        assert (p["top"] >= 0).all() and (p["left"] >= 0).all()
        assert (p["top"] + p["height"] <= height).all()
        assert (p["left"] + p["width"] <= width).all()
        assert (p["height"] > 0).all() and (p["width"] > 0).all()


def test_reference_sampler_leaves_the_other_decisions_of_a_view_alone():
    reference = SimCLRAugment(output_size=32, crop_sampler="reference")
    torchvision = SimCLRAugment(output_size=32)
    a = reference.sample_params(1, 2, np.arange(64), 0, 40, 40)
    b = torchvision.sample_params(1, 2, np.arange(64), 0, 40, 40)
    for key in ("flip", "jitter", "brightness", "hue", "order", "grayscale", "blur", "sigma"):
        assert torch.equal(a[key], b[key]), key


def test_reference_sampler_per_sample_path_equals_batched_path():
    augment = SimCLRAugment(output_size=24, crop_sampler="reference", blur_prob=0.5)
    images = torch.randint(0, 256, (6, 3, 37, 45), dtype=torch.uint8)
    indices = torch.arange(100, 106)
    batched = augment.views(images, 5, 1, indices)
    for b in range(6):
        one = augment(images[b], 5, 1, int(indices[b]))
        for view in range(2):
            torch.testing.assert_close(one[view], batched[view][b], atol=1e-5, rtol=0)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="crop_sampler"):
        SimCLRAugment(output_size=32, crop_sampler="tf")
