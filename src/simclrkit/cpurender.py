"""Rendering of SimCLR views on the CPU: one compiled, cache-resident pass per image.

The same maths as the batched tensor path in :mod:`simclrkit.render` (crop and bicubic resize,
flip, colour jitter in a random order, grayscale, Gaussian blur, clipping after every op,
normalisation), written as numba kernels. Why by hand: in eager PyTorch every op is a pass over
the whole batch in memory (about fifteen per view at 224 px, plus the layout copies a batched
gather needs), while here one image at a time stays in the core's cache from the resize to the
normalised output, and per-sample decisions are plain branches instead of sorted runs. Measured
with ``benchmarks/augment.py`` (docs/benchmarks.md). No library applies per-sample crop boxes,
colour factors in per-sample order and per-sample blur kernels to a batch in one pass.

Parallelism is over images: each worker thread (numba releases the GIL) renders its own
contiguous slice of the batch, so the result does not depend on the number of threads.

The kernels are compiled on first use and cached on disk by numba (a few seconds once).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

# Indices are cast to unsigned before indexing: numba then skips its negative-index wraparound
# test, which otherwise stops LLVM from vectorising the inner loops (measured 3-9x slower).
_U = np.uint64
_TINY = np.float32(np.finfo(np.float32).tiny)  # as torch.finfo(float32).tiny in render.py
_GRAY_R, _GRAY_G, _GRAY_B = (np.float32(w) for w in (0.2989, 0.5870, 0.1140))


def _compiled(**options):
    """numba's njit, GIL released, cached on disk when some cache folder is writable."""

    def decorate(function):
        try:
            return njit(nogil=True, cache=True, **options)(function)
        except RuntimeError:  # numba found no writable cache folder: compile in each process
            return njit(nogil=True, **options)(function)

    return decorate


@_compiled(inline="always")
def _clip(value):
    return min(max(value, np.float32(0.0)), np.float32(1.0))


@_compiled()
def _resize(src, row_index, row_weight, col_index, col_weight, plane, along_y, image):
    """Crop + flip + bicubic resize of one plane: rows first (vectorised over x), then columns.

    Only the source columns the crop touches are filtered in the first pass.
    """
    size = image.shape[1]
    low = col_index[0, 0]
    high = low
    for x in range(size):
        for k in range(4):
            low = min(low, col_index[x, k])
            high = max(high, col_index[x, k])
    for y in range(size):
        for x in range(low, high + 1):
            along_y[y, _U(x - low)] = np.float32(0.0)
        for k in range(4):
            weight = row_weight[y, k]
            row = row_index[y, k]
            for x in range(low, high + 1):
                along_y[y, _U(x - low)] += weight * np.float32(src[plane, row, _U(x)])
    for y in range(size):
        for x in range(size):
            total = np.float32(0.0)
            for k in range(4):
                total += col_weight[x, k] * along_y[y, _U(col_index[x, k] - low)]
            image[plane, y, x] = _clip(total)


@_compiled()
def _brightness(image, value, additive):
    # SimCLRv2 multiplies by a factor; SimCLRv1 (tf.image.random_brightness) adds a delta.
    channels, size = image.shape[0], image.shape[1]
    for c in range(channels):
        for y in range(size):
            for x in range(size):
                v = image[c, y, x] + value if additive else image[c, y, x] * value
                image[c, y, x] = _clip(v)


# reassoc: lets LLVM vectorise the sum (a strict left-to-right float sum is latency-bound).
@_compiled(fastmath={"reassoc"})
def _contrast(image, factor):
    # tf.image.adjust_contrast: (x - mean) * factor + mean with the mean of EACH channel.
    channels, size = image.shape[0], image.shape[1]
    for c in range(channels):
        total = 0.0  # float64: the sum of 50k pixels, then rounded once as torch.mean does
        for y in range(size):
            for x in range(size):
                total += image[c, y, x]
        mean = np.float32(total / (size * size))
        shift = mean * (np.float32(1.0) - factor)
        for y in range(size):
            for x in range(size):
                image[c, y, x] = _clip(image[c, y, x] * factor + shift)


@_compiled(inline="always")
def _lerp(start, end, weight):
    # torch.lerp's formula: exact at weight 1 (returns ``end``).
    if weight < np.float32(0.5):
        return start + weight * (end - start)
    return end - (end - start) * (np.float32(1.0) - weight)


@_compiled()
def _saturation(image, factor):
    # tf.image.adjust_saturation in closed form (see render._saturation): c' = lerp(max, c, k),
    # k = min(factor, max / (max - min)).
    size = image.shape[1]
    for y in range(size):
        for x in range(size):
            r, g, b = image[0, y, x], image[1, y, x], image[2, y, x]
            high = max(r, max(g, b))
            spread = max(high - min(r, min(g, b)), _TINY)
            k = min(high / spread, factor)
            image[0, y, x] = _clip(_lerp(high, r, k))
            image[1, y, x] = _clip(_lerp(high, g, k))
            image[2, y, x] = _clip(_lerp(high, b, k))


@_compiled()
def _hue(image, target):
    # tf.image.adjust_hue in closed form (see render._hue): h6 in sextants, red winning ties,
    # then each channel min + (max - min) * clamp(||h6 - target| - 3| - 1, 0, 1).
    size = image.shape[1]
    t0, t1, t2 = target[0], target[1], target[2]
    for y in range(size):
        for x in range(size):
            r, g, b = image[0, y, x], image[1, y, x], image[2, y, x]
            high = max(r, max(g, b))
            low = min(r, min(g, b))
            spread = high - low
            if high == r:
                h6 = g - b
            elif high == g:
                h6 = b - r + 2 * spread
            else:
                h6 = r - g + 4 * spread
            h6 = h6 / max(spread, _TINY)
            image[0, y, x] = _clip(low + _clip(abs(abs(h6 - t0) - 3) - 1) * spread)
            image[1, y, x] = _clip(low + _clip(abs(abs(h6 - t1) - 3) - 1) * spread)
            image[2, y, x] = _clip(low + _clip(abs(abs(h6 - t2) - 3) - 1) * spread)


@_compiled()
def _grayscale(image):
    # tf.image.rgb_to_grayscale, replicated to 3 channels (reference to_grayscale).
    size = image.shape[1]
    for y in range(size):
        for x in range(size):
            gray = image[0, y, x] * _GRAY_R + image[1, y, x] * _GRAY_G + image[2, y, x] * _GRAY_B
            gray = _clip(gray)
            image[0, y, x] = gray
            image[1, y, x] = gray
            image[2, y, x] = gray


@_compiled()
def _blur(image, plane, kernel, along_x):
    """Separable Gaussian blur of one plane, zero padding ('SAME'), along x then along y."""
    size = image.shape[1]
    radius = (kernel.shape[0] - 1) // 2
    for y in range(size):
        for x in range(size):
            along_x[y, x] = np.float32(0.0)
        for k in range(kernel.shape[0]):
            weight = kernel[k]
            d = k - radius
            for x in range(max(0, -d), min(size, size - d)):
                along_x[y, _U(x)] += weight * image[plane, y, _U(x + d)]
    for y in range(size):
        for x in range(size):
            image[plane, y, x] = np.float32(0.0)
        for k in range(kernel.shape[0]):
            source = y + k - radius
            if 0 <= source < size:
                weight = kernel[k]
                for x in range(size):
                    image[plane, y, _U(x)] += weight * along_x[_U(source), _U(x)]
        for x in range(size):
            image[plane, y, x] = _clip(image[plane, y, x])


@_compiled()
def _render_range(
    start, stop, src, source, row_index, row_weight, col_index, col_weight, identity, jitter,
    order,
    brightness, additive, contrast, saturation, hue_target, grayscale, blur, kernel,
    mean, std, quantise, out, along_y, image, along_x,
):  # fmt: skip
    """Views of samples [start, stop): resize, colour ops in each sample's order, grayscale,
    blur, normalise (``std`` <= 0 means no normalisation), written to ``out``. A sample whose
    resize is the identity (``identity``: its taps are weights 0, 1, 0, 0 on the pixel itself)
    is only scaled: the same products and sums, without the two passes. Sample ``i`` is
    rendered from image ``source[i]`` of ``src``."""
    channels, size = out.shape[1], out.shape[2]
    for i in range(start, stop):
        if identity[i]:
            scale = row_weight[i, 0, 1] * col_weight[i, 0, 1]
            for c in range(channels):
                for y in range(size):
                    for x in range(size):
                        image[c, y, x] = _clip(scale * np.float32(src[source[i], c, y, x]))
        else:
            for c in range(channels):
                _resize(src[source[i]], row_index[i], row_weight[i], col_index[i], col_weight[i], c,
                        along_y, image)  # fmt: skip
        if jitter[i]:
            for slot in range(4):
                op = order[i, slot]
                if op == 0:
                    _brightness(image, brightness[i], additive)
                elif op == 1:
                    _contrast(image, contrast[i])
                elif op == 2 and channels == 3:
                    _saturation(image, saturation[i])
                elif op == 3 and channels == 3:
                    _hue(image, hue_target[i])
        if channels == 3 and grayscale[i]:
            _grayscale(image)
        if blur[i] and kernel.shape[1] > 1:
            for c in range(channels):
                _blur(image, c, kernel[i], along_x)
        for c in range(channels):
            m = mean[c]
            s = std[c]
            for y in range(size):
                for x in range(size):
                    if quantise:  # uint8 output: [0, 1] -> 0..255, rounded half up
                        out[i, c, y, x] = np.uint8(image[c, y, x] * np.float32(255) + 0.5)
                    else:
                        out[i, c, y, x] = (image[c, y, x] - m) / s if s > 0 else image[c, y, x]


class _Scratch(threading.local):
    """Per-thread working planes, grown on demand: fresh memory costs page faults."""

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        array = getattr(self, name, None)
        if array is None or array.size < size:
            array = np.empty(size, dtype=np.float32)
            setattr(self, name, array)
        return array[:size].reshape(shape)


_scratch = _Scratch()
_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, executor)


def _executor(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers (a new one after a fork or a resize)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), threads):
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, "simclrkit-render"))
        return _pool[2]


def _identity_taps(row_taps, col_taps, height: int, width: int, size: int) -> np.ndarray:
    """(B,) bool: samples whose taps read pixel k with weight w for output k and nothing else
    (the colour half of the split pipeline renders views that are already the output size)."""
    batch = row_taps[0].shape[0]
    if (height, width) != (size, size):
        return np.zeros(batch, dtype=np.bool_)
    own = np.arange(size)
    found = np.ones(batch, dtype=np.bool_)
    for index, weight in (row_taps, col_taps):
        found &= (index[:, :, 1] == own).all(axis=1)
        found &= (weight[:, :, [0, 2, 3]] == 0).all(axis=(1, 2))
        found &= (weight[:, :, 1] == weight[:, :1, 1]).all(axis=1)
    found &= col_taps[1][:, 0, 1] == 1
    return found


def render(
    images: torch.Tensor,
    host: dict[str, np.ndarray],
    *,
    row_taps: tuple[np.ndarray, np.ndarray],
    col_taps: tuple[np.ndarray, np.ndarray],
    hue_target: np.ndarray,
    blur_kernel: np.ndarray,
    additive_brightness: bool,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Render every view of a CPU batch into ``out``, in parallel over images.

    Args:
        images: (B, C, H, W) uint8 or float32 in [0, 1], on the CPU.
        host: the per-sample parameters as numpy arrays (``jitter``, ``order``, ``brightness``,
            ``contrast``, ``saturation``, ``grayscale``, ``blur``), in batch order.
        row_taps, col_taps: (B, S, 4) bicubic indices and weights; the uint8 scaling is folded
            into the row weights, the flip into the column taps.
        hue_target: (B, 3) channel hues for the hue op; blur_kernel: (B, 2r + 1) normalised.
        out: contiguous float32 (B, C, S, S) CPU tensor, or uint8 (without ``normalize``):
            the views rounded to 0..255.

    Returns:
        ``out``.
    """
    batch, channels, height, width = images.shape
    size = out.shape[-1]
    if images.dtype != torch.uint8:
        images = images.float()
    if batch > 1 and images.stride(0) == 0:
        # Views of one image (``expand``): rendered from the single copy, not B copies of it.
        src = images[:1].contiguous().numpy()
        source = np.zeros(batch, dtype=np.int64)
    else:
        src = images.contiguous().numpy()
        source = np.arange(batch, dtype=np.int64)
    if normalize is None:
        mean = std = np.zeros(channels, np.float32)
    else:
        mean, std = (np.broadcast_to(np.asarray(v, np.float32), channels).copy() for v in normalize)
    arguments = (
        src,
        source,
        np.ascontiguousarray(row_taps[0], np.int64),
        np.ascontiguousarray(row_taps[1], np.float32),
        np.ascontiguousarray(col_taps[0], np.int64),
        np.ascontiguousarray(col_taps[1], np.float32),
        _identity_taps(row_taps, col_taps, height, width, size),
        np.ascontiguousarray(host["jitter"], np.bool_),
        np.ascontiguousarray(host["order"], np.int64),
        np.ascontiguousarray(host["brightness"], np.float32),
        bool(additive_brightness),
        np.ascontiguousarray(host["contrast"], np.float32),
        np.ascontiguousarray(host["saturation"], np.float32),
        np.ascontiguousarray(hue_target, np.float32),
        np.ascontiguousarray(host["grayscale"], np.bool_),
        np.ascontiguousarray(host["blur"], np.bool_),
        np.ascontiguousarray(blur_kernel, np.float32),
        mean,
        std,
        out.dtype == torch.uint8,
        out.numpy(),
    )

    def work(start: int, stop: int) -> None:
        along_y = _scratch.get("along_y", (size, width))
        image = _scratch.get("image", (channels, size, size))
        along_x = _scratch.get("along_x", (size, size))
        _render_range(start, stop, *arguments, along_y, image, along_x)

    threads = min(torch.get_num_threads(), batch)
    if threads <= 1:
        work(0, batch)
        return out
    # A few slices per thread so that blurred and jittered samples even out.
    bounds = np.linspace(0, batch, min(batch, 4 * threads) + 1).astype(int)
    jobs = [_executor(threads).submit(work, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()
    return out
