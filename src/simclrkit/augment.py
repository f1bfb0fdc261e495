"""The SimCLR view transform: per-sample and batched tensor augmentation (paper §3, App. A).

Each view is made by, in this order (reference ``data_util.preprocess_for_train`` followed by
``batch_random_blur``):

1. a random resized crop (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``)
   resampled to ``output_size`` x ``output_size`` with bicubic interpolation;
2. a horizontal flip with probability ``flip_prob``;
3. colour jitter with probability ``color_jitter_prob``: brightness, contrast, saturation and
   hue with strengths 0.8s, 0.8s, 0.8s, 0.2s, in a random order, clipping to [0, 1] after each;
4. grayscale with probability ``grayscale_prob``;
5. Gaussian blur with probability ``blur_prob`` (sigma in ``blur_sigma``).

Randomness is counter-based: every random number of a view is a pure function of
``(seed, epoch, sample_index, view, slot)`` (see :func:`uniforms`). Nothing reads a global or a
worker RNG, so a run is reproducible, can resume in the middle of an epoch, and gives the same
views for any number of DataLoader workers and for both code paths: the batched tensor path
(:meth:`SimCLRAugment.views`, CPU or GPU, no Python loop over samples) and the per-sample path
(:meth:`SimCLRAugment.__call__`, for DataLoader workers), which is the batched path run on one
image. The two paths agree to float rounding (~1e-7; reductions may add in another order).

How this differs from the reference (google-research/simclr, ``data_util.py``), and why:

* Crop sampler, two to choose from (``crop_sampler``):

  - ``"torchvision"``: ``RandomResizedCrop``'s algorithm: 10 attempts of an area drawn
    uniformly from ``crop_scale`` and a log-uniform aspect ratio, the first that fits, else a
    centre crop with the ratio clamped.
  - ``"reference"``: the reference's, TF's ``sample_distorted_bounding_box`` with the whole
    image as the object box, ``min_object_covered=0.1``, ``area_range=crop_scale`` and
    ``aspect_ratio_range=crop_ratio``: up to 100 attempts, each an aspect ratio drawn
    uniformly (not log-uniformly), a HEIGHT drawn uniformly between the heights whose area is
    in range (so the area is not uniform: small crops are likelier), rejected under 10% of
    the image; the whole image when all attempts fail. Its crops are smaller on average
    (mean area fraction 0.43 against 0.49 at 32 px: ``benchmarks/crops.py``). Ported from TF's
    ``sample_distorted_bounding_box_op.cc`` (``GenerateRandomCrop``), with its integer
    rounding and its offsets drawn from [0, side - crop) (never the last position).
* Resampling: PyTorch's bicubic kernel (Keys, a = -0.75) with half-pixel centres, no
  antialiasing and clamped-to-edge taps (identical to ``F.grid_sample(mode="bicubic",
  padding_mode="border", align_corners=False)``, which the tests check). TF1's
  ``resize_bicubic`` uses a = -0.75 with legacy (not half-pixel) coordinates; TF2's
  ``tf.image.resize`` uses a = -0.5. Crop and resize are one step from the source to the
  output size.
* The resampled view is clipped to [0, 1] at once (the reference clips only after each colour
  op and at the end): the bicubic overshoot would otherwise leak into the contrast mean and
  the HSV conversions.
* Contrast, saturation and hue follow TF, not torchvision: contrast uses the mean of each
  channel; saturation scales S in HSV and clips it to [0, 1] (so factor 0 gives r = g = b =
  max, not luma); hue rotates H in HSV. All are exact closed forms, no colour-space round trip.
* Blur sigma per view: each view draws its own sigma. The reference's ``batch_random_blur``
  calls ``random_blur`` on the whole per-device batch of one view, whose
  ``tf.random.uniform([], 0.1, 2.0)`` is ONE scalar: every blurred image of that batch shares
  a sigma (only whether to blur is drawn per image). Per-view draws give the distribution of
  a single image's views that the paper describes, independent of the batch split.
* Blur as the reference: ``kernel_size = output_size // 10``, radius ``kernel_size // 2``,
  ``2 * radius + 1`` taps (23 at 224 px, 3 at 32 px, none below 20 px), separable, with ZERO
  padding (TF ``padding='SAME'``; torchvision reflects), so the border darkens slightly.
* Grayscale inputs (C == 1): brightness and contrast apply; saturation, hue and grayscale are
  no-ops (a one-channel image has no hue and is already gray).

Speed (benchmarks/augment.py): on the CPU, compiled kernels (``cpurender.py``, numba) render
each image in one pass that stays in the core's cache, from the crop to the normalised output,
in parallel over the images of a batch (the result does not depend on the thread count). On
accelerators, the batched tensor ops of ``render.py`` run instead: both resampling and blur are
separable, and each 1-D pass is a weighted gather of whole rows, which
``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes in one fused kernel. The
per-sample bookkeeping (parameters, taps) is small numpy arithmetic, so nothing waits on the
device. On CPU, page faults from fresh output memory are a large share of the time at 224 px:
``apply(..., out=buffer)`` avoids them, and ``THP_MEM_ALLOC_ENABLE=1`` (a PyTorch setting)
makes them cheaper.

This module draws the parameters of each view and holds the public transforms; the image work
that renders a view from its parameters (crop and resize, colour, blur) is in ``render.py``
and, for CPU batches, ``cpurender.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from simclrkit.render import Params, _apply

if TYPE_CHECKING:
    from simclrkit.config import Config

__all__ = [
    "NUM_SLOTS",
    "EvalAugment",
    "SimCLRAugment",
    "apply_eval",
    "cifar_augment",
    "default_blur",
    "imagenet_augment",
    "uniforms",
]

Indices = torch.Tensor | Sequence[int] | np.ndarray

# --------------------------------------------------------------------------------------------
# Counter-based randomness
# --------------------------------------------------------------------------------------------

# splitmix64 (Steele, Lea, Flood 2014): a Weyl increment followed by a bijective finaliser with
# full avalanche. numpy uint64 arithmetic wraps modulo 2**64, which is what the hash needs.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _as_int64(values: Indices | int, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64).reshape(-1)


def _uniforms(
    seed: int, epoch: Indices | int, indices: Indices, view: Indices | int, num_slots: int
) -> np.ndarray:
    index = _as_int64(indices, "indices")
    views = np.broadcast_to(_as_int64(view, "view"), index.shape)
    # int64 viewed as uint64 is the value modulo 2**64, as ``int(epoch) & _MASK64`` was.
    epochs = np.broadcast_to(_as_int64(epoch, "epoch"), index.shape)
    key = _mix64(np.full(index.shape, int(seed) & _MASK64, dtype=np.uint64))
    key = _mix64(key ^ epochs.view(np.uint64))
    key = _mix64(key ^ index.view(np.uint64))
    key = _mix64(key ^ views.view(np.uint64))
    bits = _mix64(key[:, None] ^ np.arange(num_slots, dtype=np.uint64)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def uniforms(
    seed: int, epoch: int | Indices, indices: Indices, view: int | Indices, num_slots: int
) -> torch.Tensor:
    """Counter-based uniform random numbers for a batch of views.

    Entry ``[b, s]`` is a pure function of ``(seed, epoch, indices[b], view, s)``: it does not
    depend on the other samples of the batch, on call order or on any global RNG state.

    Args:
        seed: run seed (any Python int; taken modulo 2**64).
        epoch: epoch number, one for all samples or (B,) one per sample (a step of the
            reference's step counting may straddle two epochs: ``pipeline.StepOrder``).
        indices: (B,) dataset indices of the samples.
        view: which view (0, 1, ...), one for all samples or (B,) one per sample.
        num_slots: how many numbers per sample.

    Returns:
        (B, num_slots) float64 tensor in [0, 1), on the CPU; the top 53 bits of a 64-bit hash.
    """
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    return torch.from_numpy(_uniforms(seed, epoch, indices, view, num_slots))


# Slot layout of one view: which uniform feeds which decision. Fixed, so that changing one
# probability never reshuffles the other decisions of the same view.
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop
_SLOT_CROP = 0  # 4 per attempt: area, log-aspect, top, left
_SLOT_FLIP = 4 * _CROP_ATTEMPTS
_SLOT_JITTER = _SLOT_FLIP + 1
_SLOT_BRIGHTNESS = _SLOT_JITTER + 1
_SLOT_CONTRAST = _SLOT_BRIGHTNESS + 1
_SLOT_SATURATION = _SLOT_CONTRAST + 1
_SLOT_HUE = _SLOT_SATURATION + 1
_SLOT_ORDER = _SLOT_HUE + 1  # 4 slots, argsorted into a permutation
_SLOT_GRAYSCALE = _SLOT_ORDER + 4
_SLOT_BLUR = _SLOT_GRAYSCALE + 1
_SLOT_SIGMA = _SLOT_BLUR + 1
NUM_SLOTS = _SLOT_SIGMA + 1
"""Uniforms drawn per view by :meth:`SimCLRAugment.sample_params`."""
# The reference sampler's 100 attempts: its first 10 use the crop slots above, the other 90
# the slots after NUM_SLOTS, so the torchvision sampler's draws (and every other decision of a
# view) are the same whichever sampler exists.
_REFERENCE_ATTEMPTS = 100
NUM_REFERENCE_SLOTS = NUM_SLOTS + 4 * (_REFERENCE_ATTEMPTS - _CROP_ATTEMPTS)
CROP_SAMPLERS = ("torchvision", "reference")


# --------------------------------------------------------------------------------------------
# Parameter sampling (numpy: per-sample bookkeeping on tiny arrays)
# --------------------------------------------------------------------------------------------


def _sample_crop_boxes(
    u: np.ndarray, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised over the batch.

    Args:
        u: (B, 4 * _CROP_ATTEMPTS) uniforms.

    Returns:
        (B, 4) int64: top, left, crop height, crop width in source pixels.
    """
    u = u.reshape(u.shape[0], _CROP_ATTEMPTS, 4)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # np.rint halves to even, like Python's round() in torchvision.
    crop_w = np.rint(np.sqrt(area * aspect))
    crop_h = np.rint(np.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    top = np.floor(u[..., 2] * (height - crop_h + 1))
    left = np.floor(u[..., 3] * (width - crop_w + 1))
    first = np.argmax(fits, axis=1)  # the first attempt that fits
    rows = np.arange(u.shape[0])
    chosen = np.stack([v[rows, first] for v in (top, left, crop_h, crop_w)], axis=1)
    # Fallback: the whole image, or a centre crop with the aspect ratio clamped to the range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fb_w, fb_h = int(round(height * ratio[1])), height
    else:
        fb_w, fb_h = width, height
    fallback = np.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w])
    return np.where(fits.any(axis=1)[:, None], chosen, fallback).astype(np.int64)


def _sample_reference_boxes(
    u: np.ndarray,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    min_covered: float = 0.1,
) -> np.ndarray:
    """TF's ``sample_distorted_bounding_box`` (whole-image object box), vectorised over the
    batch and the attempts; the first attempt that succeeds wins, else the whole image.

    Args:
        u: (B, 4 * _REFERENCE_ATTEMPTS) uniforms: aspect, height offset, top, left per attempt.

    Returns:
        (B, 4) int64: top, left, crop height, crop width in source pixels.
    """
    u = u.reshape(u.shape[0], _REFERENCE_ATTEMPTS, 4)
    # TF computes in float32; float64 here differs only where a rint lands on a half.
    min_area = scale[0] * width * height
    max_area = scale[1] * width * height
    aspect = ratio[0] + (ratio[1] - ratio[0]) * u[..., 0]
    low = np.rint(np.sqrt(min_area / aspect))
    high = np.rint(np.sqrt(max_area / aspect))
    # The largest height whose width rint(h * aspect) still fits the image.
    too_wide = np.rint(high * aspect) > width
    capped = np.floor((width + 0.5 - 1e-7) / aspect)
    capped = np.where(np.rint(capped * aspect) > width, capped - 1, capped)
    high = np.minimum(np.where(too_wide, capped, high), height)
    low = np.minimum(low, high)
    # random->Uniform(n) is an integer in [0, n): floor(u * n).
    crop_h = low + np.floor(u[..., 1] * (high - low + 1))
    crop_w = np.rint(crop_h * aspect)
    area = crop_w * crop_h
    grow = area < min_area
    crop_h = np.where(grow, crop_h + 1, crop_h)
    crop_w = np.where(grow, np.rint(crop_h * aspect), crop_w)
    area = crop_w * crop_h
    shrink = area > max_area
    crop_h = np.where(shrink, crop_h - 1, crop_h)
    crop_w = np.where(shrink, np.rint(crop_h * aspect), crop_w)
    area = crop_w * crop_h
    valid = (
        (area >= min_area) & (area <= max_area) & (crop_w <= width) & (crop_h <= height)
        & (crop_w > 0) & (crop_h > 0)
        & (area >= min_covered * width * height)  # the overlap with the whole-image box
    )
    top = np.where(crop_h < height, np.floor(u[..., 2] * (height - crop_h)), 0)
    left = np.where(crop_w < width, np.floor(u[..., 3] * (width - crop_w)), 0)
    first = np.argmax(valid, axis=1)
    rows = np.arange(u.shape[0])
    chosen = np.stack([v[rows, first] for v in (top, left, crop_h, crop_w)], axis=1)
    whole = np.array([0, 0, height, width])
    return np.where(valid.any(axis=1)[:, None], chosen, whole).astype(np.int64)


def _uniform(u: np.ndarray, low: float, high: float) -> np.ndarray:
    return low + (high - low) * u


def _center_crop_box(height: int, width: int, proportion: float) -> tuple[int, int, int, int]:
    """The reference center_crop for a square output: side rint(proportion * shorter side)."""
    side = int(np.rint(proportion * min(height, width)))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def _fixed_params(batch: int, box: tuple[int, int, int, int]) -> Params:
    """Parameters that crop ``box`` and do nothing else (for evaluation)."""
    top, left, crop_h, crop_w = (torch.full((batch,), v, dtype=torch.int64) for v in box)
    off = torch.zeros(batch, dtype=torch.bool)
    one = torch.ones(batch, dtype=torch.float64)
    return {
        "top": top, "left": left, "height": crop_h, "width": crop_w,
        "flip": off, "jitter": off.clone(),
        "brightness": one, "contrast": one.clone(), "saturation": one.clone(),
        "hue": torch.zeros(batch, dtype=torch.float64),
        "order": torch.arange(4).repeat(batch, 1),
        "grayscale": off.clone(), "blur": off.clone(), "sigma": one.clone(),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(
            f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {value}"
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_output_size(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"output_size must be an int >= 1, got {value!r}")


def _check_normalize(value) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if value is None:
        return None
    try:
        mean, std = (tuple(float(v) for v in part) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be None or (mean, std), got {value!r}") from None
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise ValueError(f"normalize must be (mean, std) of 1 or 3 values, std > 0: {value!r}")
    return mean, std


@dataclass(frozen=True, kw_only=True)
class SimCLRAugment:
    """The SimCLR view transform (paper §3 and App. A; reference ``data_util.py``).

    Attributes:
        output_size: side S of the square views.
        crop_scale: (min, max) area fraction of the crop, within (0, 1].
        crop_ratio: (min, max) aspect ratio width / height of the crop.
        flip_prob: probability of a horizontal flip.
        color_jitter_strength: s; brightness, contrast and saturation factors are drawn from
            U[max(0, 1 - 0.8 s), 1 + 0.8 s] and the hue shift from U[-0.2 s, 0.2 s] turns.
            1.0 for ImageNet, 0.5 for CIFAR-10 (paper App. B.9).
        color_jitter_prob: probability of the colour jitter (0.8).
        grayscale_prob: probability of grayscale (0.2), drawn whether or not jitter applied.
        blur_prob: probability of the Gaussian blur (0.5 on ImageNet, 0 for <= 32 px).
        blur_sigma: (min, max) of the blur's sigma in output pixels.
        brightness: "multiplicative" (SimCLRv2: x * factor) or "additive" (SimCLRv1:
            x + delta, delta ~ U[-0.8 s, 0.8 s]).
        normalize: optional (mean, std) per channel applied last; the reference feeds [0, 1].
        crop_sampler: "torchvision" (RandomResizedCrop) or "reference" (TF's
            sample_distorted_bounding_box, as the reference crops); see the module docstring.
    """

    output_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    brightness: str = "multiplicative"
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    crop_sampler: str = "torchvision"

    def __post_init__(self) -> None:
        _check_output_size(self.output_size)
        if self.crop_sampler not in CROP_SAMPLERS:
            raise ValueError(
                f"crop_sampler must be one of {', '.join(CROP_SAMPLERS)}, got {self.crop_sampler!r}"
            )
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            try:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
            except (TypeError, ValueError):
                value = getattr(self, name)
                raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[0] <= 0:
            raise ValueError(f"crop_scale min must be > 0, got {self.crop_scale}")
        _check_range("crop_ratio", self.crop_ratio, 0.0, math.inf)
        if self.crop_ratio[0] <= 0:
            raise ValueError(f"crop_ratio min must be > 0, got {self.crop_ratio}")
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma min must be > 0, got {self.blur_sigma}")
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob"):
            _check_probability(name, getattr(self, name))
        if not (math.isfinite(self.color_jitter_strength) and self.color_jitter_strength >= 0):
            raise ValueError(
                f"color_jitter_strength must be finite and >= 0, got {self.color_jitter_strength}"
            )
        if self.brightness not in ("multiplicative", "additive"):
            raise ValueError(
                f"brightness must be 'multiplicative' or 'additive', got {self.brightness!r}"
            )
        object.__setattr__(self, "normalize", _check_normalize(self.normalize))

    def sample_params(
        self,
        seed: int,
        epoch: int | Indices,
        indices: Indices,
        view: int | Indices,
        image_height: int,
        image_width: int,
    ) -> Params:
        """Draw the random parameters of one view of each sample.

        Args:
            seed, epoch, indices (B,): the key of the counter-based RNG (:func:`uniforms`); the
                epoch one for all samples or (B,) one per sample.
            view: which view, one for all samples or (B,) one per sample.
            image_height, image_width: source image size in pixels.

        Returns:
            Dict of CPU tensors, all with leading dimension B: ``top``, ``left``, ``height``,
            ``width`` (int64 crop box in source pixels), ``flip``, ``jitter``, ``grayscale``,
            ``blur`` (bool), ``brightness`` (factor, or delta if additive), ``contrast``,
            ``saturation`` (factors), ``hue`` (shift in turns), ``sigma`` (float64) and
            ``order`` (B, 4) int64: the colour op applied in each of the four positions
            (0 brightness, 1 contrast, 2 saturation, 3 hue).
        """
        if image_height < 1 or image_width < 1:
            raise ValueError(f"image size must be positive, got {image_height}x{image_width}")
        if self.crop_sampler == "reference":
            u = _uniforms(seed, epoch, indices, view, NUM_REFERENCE_SLOTS)
            crop_u = np.concatenate([u[:, _SLOT_CROP:_SLOT_FLIP], u[:, NUM_SLOTS:]], axis=1)
            box = _sample_reference_boxes(
                crop_u, image_height, image_width, self.crop_scale, self.crop_ratio
            )
        else:
            u = _uniforms(seed, epoch, indices, view, NUM_SLOTS)
            box = _sample_crop_boxes(
                u[:, _SLOT_CROP:_SLOT_FLIP], image_height, image_width, self.crop_scale,
                self.crop_ratio,
            )
        s = self.color_jitter_strength
        factor_range = (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        if self.brightness == "multiplicative":
            brightness = _uniform(u[:, _SLOT_BRIGHTNESS], *factor_range)
        else:
            brightness = _uniform(u[:, _SLOT_BRIGHTNESS], -0.8 * s, 0.8 * s)
        params = {
            "top": box[:, 0],
            "left": box[:, 1],
            "height": box[:, 2],
            "width": box[:, 3],
            "flip": u[:, _SLOT_FLIP] < self.flip_prob,
            "jitter": u[:, _SLOT_JITTER] < self.color_jitter_prob,
            "brightness": brightness,
            "contrast": _uniform(u[:, _SLOT_CONTRAST], *factor_range),
            "saturation": _uniform(u[:, _SLOT_SATURATION], *factor_range),
            "hue": _uniform(u[:, _SLOT_HUE], -0.2 * s, 0.2 * s),
            # argsort of i.i.d. uniforms is a uniformly random permutation (tf.random_shuffle).
            "order": np.argsort(u[:, _SLOT_ORDER : _SLOT_ORDER + 4], axis=1),
            "grayscale": u[:, _SLOT_GRAYSCALE] < self.grayscale_prob,
            "blur": u[:, _SLOT_BLUR] < self.blur_prob,
            "sigma": _uniform(u[:, _SLOT_SIGMA], *self.blur_sigma),
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}

    def apply(
        self, images: torch.Tensor, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Render one view per sample from its parameters; batched, on the images' device.

        Args:
            images: (B, C, H, W) uint8, or float in [0, 1]; C is 1 or 3; CPU or CUDA.
            params: from :meth:`sample_params` (small CPU tensors: only per-sample vectors go
                to the device, and nothing waits on it).
            out: optional contiguous float32 (B, C, S, S) tensor on the images' device to write
                into (a reused buffer saves the page faults of fresh memory).

        Returns:
            (B, C, S, S) float32 in [0, 1] (normalised if ``normalize`` is set).
        """
        return _apply(
            images,
            params,
            output_size=self.output_size,
            additive_brightness=self.brightness == "additive",
            normalize=self.normalize,
            out=out,
        )

    def views(
        self, images: torch.Tensor, seed: int, epoch: int, indices: Indices, num_views: int = 2
    ) -> list[torch.Tensor]:
        """Batched views (paper Alg. 1: t ~ T and t' ~ T for every image).

        Args:
            images: (B, C, H, W) uint8 or float in [0, 1], CPU or CUDA.
            seed, epoch: RNG key; indices: (B,) dataset indices of the images.
            num_views: views per image.

        Returns:
            ``num_views`` tensors of shape (B, C, S, S), view v of image b being a pure function
            of (seed, epoch, indices[b], v).
        """
        height, width = images.shape[-2:]
        return [
            self.apply(images, self.sample_params(seed, epoch, indices, view, height, width))
            for view in range(num_views)
        ]

    def crop_uint8(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """The first half of the transform, in uint8: crop, flip and resize only.

        The split pipeline for files (``filebatches.py``) runs this half where the source
        image is (a loader worker, next to the decoder) and hands over uint8 views of the
        output size, a quarter of float32's bytes; :meth:`color` does the rest. The two halves
        compose to :meth:`apply` up to the rounding of the resized view to 8 bits.

        Args:
            images: (B, C, H, W) uint8 or float in [0, 1]; params: from :meth:`sample_params`
                (the crop box may be fractional: a box in full-size pixels scaled to an image
                decoded at a reduced size).

        Returns:
            (B, C, S, S) uint8.
        """
        batch, channels = images.shape[:2]
        off = torch.zeros(batch, dtype=torch.bool)
        geometric = {**params, "jitter": off, "grayscale": off, "blur": off}
        size = self.output_size
        out = torch.empty(batch, channels, size, size, dtype=torch.uint8, device=images.device)
        return _apply(
            images, geometric, output_size=size, additive_brightness=False, normalize=None,
            out=out,
        )

    def color(
        self, views: torch.Tensor, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The second half of the transform: colour jitter, grayscale, blur and normalisation
        of uint8 views that :meth:`crop_uint8` made, on the views' device.

        Args:
            views: (B, C, S, S) uint8 at the output size; params: the same draws as for
                :meth:`crop_uint8` (only the colour and blur entries are used).
            out: as :meth:`apply`.

        Returns:
            (B, C, S, S) float32.
        """
        batch, size = views.shape[0], self.output_size
        if views.shape[-2:] != (size, size):
            raise ValueError(f"views must be {size}x{size}, got {tuple(views.shape[-2:])}")
        zero = torch.zeros(batch, dtype=torch.int64)
        side = torch.full((batch,), size, dtype=torch.int64)
        identity = {**params, "top": zero, "left": zero, "height": side, "width": side,
                    "flip": torch.zeros(batch, dtype=torch.bool)}  # fmt: skip
        return self.apply(views, identity, out=out)

    def __call__(
        self, image: torch.Tensor, seed: int, epoch: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample path for DataLoader workers: the batched path run on one image.

        Args:
            image: (C, H, W) uint8 or float in [0, 1], any size.
            seed, epoch, index: RNG key of this sample.

        Returns:
            (view1, view2), each (C, S, S) float32; equal to row ``b`` of :meth:`views` for the
            same key up to float rounding.
        """
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError("image must be a (C, H, W) tensor")
        height, width = image.shape[-2:]
        # Both views in one batch of two: half the per-call overhead.
        params = self.sample_params(seed, epoch, [index, index], [0, 1], height, width)
        out = self.apply(image.unsqueeze(0).expand(2, -1, -1, -1), params)
        return out[0], out[1]


def default_blur(image_size: int) -> bool:
    """Whether the blur is on by default: yes above 32 px, off for CIFAR-size images (SPEC §2)."""
    return image_size > 32


def color_strength(setting: float | str, image_size: int) -> float:
    """The colour jitter strength s of a setting: a number as given, or for ``"auto"`` the
    paper's 0.5 for CIFAR-size images (<= 32 px, App. B.9) and 1.0 above (ImageNet), the
    same size rule as :func:`default_blur`."""
    if setting == "auto":
        return 1.0 if default_blur(image_size) else 0.5
    return float(setting)


def imagenet_augment(output_size: int = 224, **overrides) -> SimCLRAugment:
    """ImageNet recipe: colour strength 1.0, blur p = 0.5 (paper App. A; Table 1 "1 + blur")."""
    blur_prob = 0.5 if default_blur(output_size) else 0.0
    settings = {"color_jitter_strength": 1.0, "blur_prob": blur_prob}
    return SimCLRAugment(output_size=output_size, **{**settings, **overrides})


def cifar_augment(output_size: int = 32, **overrides) -> SimCLRAugment:
    """CIFAR-10 recipe: colour strength 0.5, no blur (paper App. B.9)."""
    blur_prob = 0.5 if default_blur(output_size) else 0.0
    settings = {"color_jitter_strength": 0.5, "blur_prob": blur_prob}
    return SimCLRAugment(output_size=output_size, **{**settings, **overrides})


@dataclass(frozen=True, kw_only=True)
class EvalAugment:
    """Linear-evaluation and test transforms (SPEC §2; reference ``preprocess_for_train`` with
    ``color_distort=False`` and ``preprocess_for_eval``).

    Train: the same random resized crop and flip as pretraining, nothing else. Test: a centre
    crop of ``crop_proportion`` of the shorter side, resized to the output size, or, with
    ``test_crop`` off, the whole image resized.

    Attributes:
        output_size: side S of the output.
        crop_scale, crop_ratio, flip_prob: as :class:`SimCLRAugment` (train only).
        crop_proportion: test-time centre crop fraction (reference CROP_PROPORTION = 0.875).
        test_crop: whether to centre-crop at test time; None: only above 32 px (the reference
            does not crop CIFAR).
        normalize: optional (mean, std); must match the pretraining transform.
    """

    output_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    crop_proportion: float = 0.875
    test_crop: bool | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_proportion <= 1.0:
            raise ValueError(f"crop_proportion must be in (0, 1], got {self.crop_proportion}")
        # Validates the shared fields and keeps the crop/flip sampler of pretraining.
        train = SimCLRAugment(
            output_size=self.output_size,
            crop_scale=self.crop_scale,
            crop_ratio=self.crop_ratio,
            flip_prob=self.flip_prob,
            color_jitter_prob=0.0,
            grayscale_prob=0.0,
            blur_prob=0.0,
            normalize=self.normalize,
        )
        object.__setattr__(self, "crop_scale", train.crop_scale)
        object.__setattr__(self, "crop_ratio", train.crop_ratio)
        object.__setattr__(self, "normalize", train.normalize)
        object.__setattr__(self, "_train", train)
        if self.test_crop is None:
            object.__setattr__(self, "test_crop", self.output_size > 32)

    def sample_params(
        self,
        train: bool,
        image_height: int,
        image_width: int,
        seed: int = 0,
        epoch: int = 0,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> Params:
        """Parameters for a batch: random crop and flip (train) or the fixed test crop.

        ``indices`` (B,) is required for train; for test it only sets the batch size.
        """
        if indices is None:
            raise ValueError("indices are required (they set the batch size and the RNG key)")
        if train:
            return self._train.sample_params(seed, epoch, indices, 0, image_height, image_width)
        batch = _as_int64(indices, "indices").shape[0]
        if self.test_crop:
            box = _center_crop_box(image_height, image_width, self.crop_proportion)
        else:
            box = (0, 0, image_height, image_width)
        return _fixed_params(batch, box)

    def apply(
        self, images: torch.Tensor, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) uint8 or float images -> (B, C, S, S) float32, batched on their device."""
        return _apply(
            images,
            params,
            output_size=self.output_size,
            additive_brightness=False,
            normalize=self.normalize,
            out=out,
        )

    def __call__(
        self, image: torch.Tensor, train: bool, seed: int = 0, epoch: int = 0, index: int = 0
    ) -> torch.Tensor:
        """Per-sample path: (C, H, W) -> (C, S, S), the batched path run on one image."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError("image must be a (C, H, W) tensor")
        params = self.sample_params(train, *image.shape[-2:], seed, epoch, [index])
        return self.apply(image.unsqueeze(0), params)[0]


def apply_eval(
    images: torch.Tensor,
    output_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    indices: torch.Tensor | Sequence[int] | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> torch.Tensor:
    """Evaluation transform of a batch with the default :class:`EvalAugment` settings.

    Args:
        images: (B, C, H, W) uint8 or float in [0, 1].
        output_size: side S of the output.
        train: random crop + flip (linear-eval training) or centre crop (test).
        seed, epoch, indices: RNG key for train; indices default to 0..B-1.
        normalize: optional (mean, std).

    Returns:
        (B, C, S, S) float32.
    """
    if indices is None:
        indices = torch.arange(images.shape[0])
    transform = EvalAugment(output_size=output_size, normalize=normalize)
    params = transform.sample_params(train, *images.shape[-2:], seed, epoch, indices)
    return transform.apply(images, params)


def build_augment(config: Config, image_size: int, blur: bool) -> SimCLRAugment:
    """The view transform of ``config.augment`` at ``image_size``, blur on or off."""
    aug = config.augment
    return SimCLRAugment(
        output_size=image_size,
        crop_scale=(aug.crop_min_scale, 1.0),
        flip_prob=aug.flip_prob,
        color_jitter_strength=color_strength(aug.color_jitter_strength, image_size),
        color_jitter_prob=aug.color_jitter_prob,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=aug.blur_prob if blur else 0.0,
        brightness=aug.brightness,
        crop_sampler=aug.crop_sampler,
    )
