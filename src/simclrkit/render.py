"""Rendering of SimCLR views: the batched image work that turns sampled parameters into pixels.

:mod:`simclrkit.augment` draws the parameters of each view (crop box, flip, colour factors and
their order, grayscale, blur sigma) and calls :func:`_apply`, which crops and resizes, applies
the colour ops, grayscale and blur, and restores the layout, in batched tensor ops on the
images' device; CPU batches go instead to the compiled kernels of :mod:`simclrkit.cpurender`,
which compute the same maths one cache-resident image at a time. Nothing here draws a random
number. What each op computes and how it departs from the reference is in ``augment.py``'s
docstring; the memory layout is in the note at the top of the rendering section below.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from simclrkit import cpurender

Params = dict[str, torch.Tensor]

# Colour ops, numbered as in the reference color_jitter_rand.
_OP_NAMES = ("brightness", "contrast", "saturation", "hue")
_PARAM_NAMES = (
    "top", "left", "height", "width", "flip", "jitter", "brightness", "contrast",
    "saturation", "hue", "order", "grayscale", "blur", "sigma",
)  # fmt: skip
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
_CPU_CHUNK_BYTES = 8 << 20
_CPU_KERNEL = True  # CPU batches: compiled kernels (cpurender) rather than the tensor ops


# --------------------------------------------------------------------------------------------
# Rendering. Image work is batched tensor ops on the images' device; the per-sample decisions
# are numpy arrays on the host, so nothing waits on the device.
#
# Layout: a chunk of n images lives in a table of rows. The resize leaves each view
# transposed, rows (sample, channel, x) holding a column over y: every colour op is per pixel
# or per channel, so it does not care, and the blur's transpose or the last copy restores the
# layout. The samples are also SORTED by their decisions (blur, grayscale, jitter, order of the
# four ops): each colour op then runs in place on a few contiguous slices instead of gathering
# and scattering subsets, the blurred samples form one block, and the last copy puts the
# samples back in their original order.
# --------------------------------------------------------------------------------------------


class _Buffers:
    """Scratch tensors reused across the chunks of one call: fresh memory costs page faults."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._store.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=self.device)
            self._store[name] = buffer
        return buffer[:numel].view(shape)


def _to_device(array: np.ndarray, device: torch.device, dtype: type) -> torch.Tensor:
    """A host array as a tensor on ``device``, without waiting for the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
    if device.type == "cpu":
        return tensor
    # A copy from pageable memory waits for the stream; from (cached) pinned memory it does not.
    return tensor.pin_memory().to(device, non_blocking=True)


def _padded_width(width: int) -> int:
    # A transpose that walks rows of a multiple of 64 floats hits the same cache sets over and
    # over (3x slower measured at 256 px); a few spare columns avoid it.
    return width + 16 if width % 64 == 0 else width


def _gather_rows(
    table: torch.Tensor, plane_start: np.ndarray, index: np.ndarray, weight: np.ndarray
) -> torch.Tensor:
    """Weighted sums of table rows: one fused ``embedding_bag`` over all planes and rows.

    out[(i, c, s)] = sum_k weight[i, s, k] * table[plane_start[i, c] + index[i, s, k]]

    Args:
        table: (R, L) float32 rows.
        plane_start: (n, C) first row of each plane.
        index: (n, S, K) row offsets within a plane.
        weight: (n, S, K) or (n, 1, K) weights.

    Returns:
        (n * C * S, L) float32.
    """
    n, channels = plane_start.shape
    size, taps = index.shape[1], index.shape[2]
    device = table.device
    start = _to_device(plane_start, device, np.int64)
    offsets = _to_device(index, device, np.int64)
    flat = (start.view(n, channels, 1, 1) + offsets.unsqueeze(1)).reshape(-1, taps)
    weights = _to_device(weight, device, np.float32)
    weights = weights.unsqueeze(1).expand(n, channels, size, taps).reshape(-1, taps)
    return F.embedding_bag(flat, table, mode="sum", per_sample_weights=weights)


def _cubic_taps(
    start: np.ndarray, length: np.ndarray, source_size: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic taps (Keys, a = -0.75, half-pixel centres) for a crop resampled to ``size``.

    Args:
        start: (B,) first source pixel of the crop; length: (B,) its extent in pixels.

    Returns:
        index (B, size, 4) clamped to the image (edge replication) and weight (B, size, 4).
    """
    a = -0.75
    position = np.arange(size) + 0.5
    # Source coordinate of each output pixel centre, pixel k's centre being at k.
    u = start[:, None] + position * (length[:, None] / size) - 0.5
    floor = np.floor(u)
    t = (u - floor)[..., None]
    distance = np.concatenate([t + 1, t, 1 - t, 2 - t], axis=-1)  # to taps floor-1 .. floor+2
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1  # |d| <= 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a  # 1 < |d| < 2
    weight = np.where(distance <= 1, near, far)
    index = np.clip(floor.astype(np.int64)[..., None] + np.arange(-1, 3), 0, source_size - 1)
    return index, weight


def _crop_taps(
    params: dict[str, np.ndarray], height: int, width: int, size: int, uint8: bool
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Bicubic (index, weight) taps of each sample's rows and columns, (n, S, 4) each.

    The flip is folded into the column taps (a flipped view reads its columns in reverse
    order) and the uint8 -> [0, 1] scaling into the row weights.
    """
    row_index, row_weight = _cubic_taps(params["top"], params["height"], height, size)
    col_index, col_weight = _cubic_taps(params["left"], params["width"], width, size)
    flip = params["flip"][:, None, None]
    col_index = np.where(flip, col_index[:, ::-1], col_index)
    col_weight = np.where(flip, col_weight[:, ::-1], col_weight)
    if uint8:
        row_weight = row_weight / 255.0
    return (row_index, row_weight), (col_index, col_weight)


def _resize(
    images: torch.Tensor,
    params: dict[str, np.ndarray],
    order: np.ndarray,
    size: int,
    buffers: _Buffers,
) -> torch.Tensor:
    """Crop, flip and bicubic-resize every sample at once (paper §3, "random crop and resize").

    Separable: one gather of source rows (vertical pass), a transpose, one gather of columns
    (horizontal pass). The uint8 -> [0, 1] scaling is folded into the first pass's weights.

    Args:
        images: (n, C, H, W) uint8 (0..255) or float (0..1), in the original order.
        params: crop box and flip, in the sorted order.
        order: (n,) the original index of each sorted sample.
        size: output side S.

    Returns:
        (n * C * S, S) table of rows (sorted sample, channel, x) over y, clipped to [0, 1].
    """
    n, channels, height, width = images.shape
    (row_index, row_weight), (col_index, col_weight) = _crop_taps(
        params, height, width, size, images.dtype == torch.uint8
    )
    padded = _padded_width(width)
    if images.dtype == torch.float32 and padded == width:
        source = images.reshape(n * channels * height, width)
    else:
        source = buffers.get("source", n, channels, height, padded)
        source[..., :width].copy_(images)
        source[..., width:].zero_()
        source = source.view(-1, padded)
    original_planes = order[:, None] * channels + np.arange(channels)
    rows = _gather_rows(source, original_planes * height, row_index, row_weight)
    planes = n * channels
    columns = buffers.get("columns", planes, width, size)
    columns.copy_(rows.view(planes, size, padded)[:, :, :width].transpose(1, 2))
    sorted_planes = np.arange(planes).reshape(n, channels)
    table = _gather_rows(columns.view(-1, size), sorted_planes * width, col_index, col_weight)
    return table.clamp_(0.0, 1.0)


def _brightness_multiplicative(x: torch.Tensor, factor: torch.Tensor) -> None:
    # SimCLRv2: x * factor (reference random_brightness impl='simclrv2').
    x.mul_(factor.view(-1, 1, 1, 1))


def _brightness_additive(x: torch.Tensor, delta: torch.Tensor) -> None:
    # SimCLRv1: tf.image.random_brightness adds one delta to every pixel.
    x.add_(delta.view(-1, 1, 1, 1))


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> None:
    # tf.image.adjust_contrast: (x - mean) * factor + mean with the mean of EACH channel.
    factor = factor.view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x.mul_(factor).add_(mean.mul_(1 - factor))


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> None:
    """tf.image.adjust_saturation in closed form: S <- min(1, S * factor), H and V kept.

    In HSV each channel is c = V - V * S * f(H) with V = max and V * S = max - min. Scaling S
    by k keeps V and f(H), so c' = max + k * (c - max), and S * k <= 1 caps k at
    max / (max - min). ``lerp`` returns c exactly for k = 1.
    """
    high = x.amax(dim=1, keepdim=True)
    spread = high - x.amin(dim=1, keepdim=True)
    cap = high / spread.clamp_min_(torch.finfo(x.dtype).tiny)
    torch.lerp(high, x, torch.minimum(cap, factor.view(-1, 1, 1, 1)), out=x)


def _hue(x: torch.Tensor, target: torch.Tensor) -> None:
    """tf.image.adjust_hue: rotate the HSV hue; S and V (so max and min) are kept.

    The hue is measured in sextants, h6 in [-1, 5] (red 0, green 2, blue 4). In closed form
    HSV -> RGB is c = min + (max - min) * clamp(2 - d, 0, 1), d the circular distance from the
    rotated hue to the channel's own hue. Rotating h6 by 6 * shift is the same as rotating each
    channel's hue back by it; ``target`` holds those per-sample hues, pre-wrapped to [-1, 5) so
    that |h6 - target| < 6 and d = 3 - ||h6 - target| - 3|, with no per-pixel modulo.
    Branch-free on purpose: comparisons and ``torch.where`` are many times slower than
    arithmetic on CPU, so the sextant masks are sign(max - c), which is 0 or 1.

    Args:
        x: (n, 3, H, W) in [0, 1], changed in place.
        target: (n, 3) the channels' hues minus 6 * shift, wrapped to [-1, 5).
    """
    red, green, blue = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    high = x.amax(dim=1, keepdim=True)
    low = x.amin(dim=1, keepdim=True)
    spread = high - low
    not_red = (high - red).sign_()  # 0 where red is the max: red wins ties, as in TF
    not_green = (high - green).sign_()
    # h6 * spread for each possible max channel, then blended by the masks.
    from_red = green - blue
    from_green = (blue - red).add_(spread, alpha=2)
    from_blue = (red - green).add_(spread, alpha=4)
    h6 = from_blue.sub_(from_green).mul_(not_green).add_(from_green)
    h6 = h6.sub_(from_red).mul_(not_red).add_(from_red)
    h6.div_(spread.clamp_min(torch.finfo(x.dtype).tiny))
    distance = (h6 - target.view(-1, 3, 1, 1)).abs_()  # in [0, 6)
    # clamp(2 - d, 0, 1) = clamp(||t| - 3| - 1, 0, 1) with t = h6 - target.
    closeness = distance.sub_(3).abs_().sub_(1).clamp_(0.0, 1.0)
    torch.addcmul(low, closeness, spread, out=x)


def _hue_targets(shift: np.ndarray) -> np.ndarray:
    """(n,) hue shifts in turns -> (n, 3) channel hues for :func:`_hue`, wrapped to [-1, 5)."""
    return np.remainder(np.array([0.0, 2.0, 4.0]) - 6 * shift[:, None] + 1, 6.0) - 1


def _grayscale(x: torch.Tensor) -> None:
    # tf.image.rgb_to_grayscale, replicated to 3 channels (reference to_grayscale).
    gray = x[:, 0:1] * _GRAY_WEIGHTS[0]
    gray.add_(x[:, 1:2], alpha=_GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=_GRAY_WEIGHTS[2])
    x.copy_(gray.expand_as(x))


def _sort_order(params: dict[str, np.ndarray], blur_first: bool) -> np.ndarray:
    """A stable order grouping samples with the same decisions (see the layout note above):
    blurred samples first (when the blur is on), then by grayscale, jitter and op order."""
    op_sequence = params["order"] @ np.array([64, 16, 4, 1])
    key = params["grayscale"] * 512 + params["jitter"] * (256 + op_sequence)
    if blur_first:
        key = key + ~params["blur"] * 1024
    return np.argsort(key, kind="stable")


def _runs(select: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a bool vector."""
    padded = np.zeros(select.size + 2, dtype=np.int8)
    padded[1:-1] = select
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _prefers_slices(device: torch.device, runs: int) -> bool:
    # On an accelerator launches cost more than copies: beyond a few runs, gather the selected
    # samples, work on them and scatter them back once.
    return device.type == "cpu" or runs <= 4


def _on_selected(x: torch.Tensor, select: np.ndarray, op, *args: torch.Tensor) -> None:
    """Run the in-place ``op`` on the selected samples of the sorted chunk, then clip.

    The selection is a few runs thanks to the sort, each one a slice: no copies. Per-sample
    arguments are (n, ...) tensors on x's device.
    """
    runs = _runs(select)
    if not _prefers_slices(x.device, len(runs)):
        index = _to_device(np.flatnonzero(select), x.device, np.int64)
        part = x.index_select(0, index)
        op(part, *(a.index_select(0, index) for a in args))
        x.index_copy_(0, index, part.clamp_(0.0, 1.0))
        return
    for start, stop in runs:
        part = x[start:stop]
        op(part, *(a[start:stop] for a in args))
        part.clamp_(0.0, 1.0)


def _color_distort(
    x: torch.Tensor, params: dict[str, np.ndarray], additive_brightness: bool
) -> None:
    """Colour jitter in a random order (reference color_jitter_rand) then random grayscale.

    Args:
        x: (n, C, S, S) sorted chunk, changed in place.
        params: the chunk's parameters, sorted like x.
    """
    colour = x.shape[1] == 3  # saturation, hue and grayscale need RGB
    jitter, order = params["jitter"], params["order"]
    if jitter.any():
        brightness = _brightness_additive if additive_brightness else _brightness_multiplicative
        ops = (brightness, _contrast, _saturation, _hue)
        values = [params[name] for name in _OP_NAMES[:3]] + [_hue_targets(params["hue"])]
        args = [_to_device(v, x.device, np.float32) for v in values]
        for slot in range(4):
            for op in range(4 if colour else 2):
                chosen = jitter & (order[:, slot] == op)
                if chosen.any():
                    _on_selected(x, chosen, ops[op], args[op])
    if colour and params["grayscale"].any():
        _on_selected(x, params["grayscale"], _grayscale)


def _blur_radius(size: int) -> int:
    # Reference random_blur: kernel_size = height // 10; gaussian_blur: radius = int(k / 2).
    return (size // 10) // 2


def _gaussian_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    """(m, 2r + 1) normalised Gaussian kernels of the reference gaussian_blur, one per sigma."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))
    return kernel / kernel.sum(axis=1, keepdims=True)


def _blur_taps(sigma: np.ndarray, size: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of the reference gaussian_blur: (m, S, 2r + 1) row offsets and weights.

    Zero padding as TF's padding='SAME': a tap outside the image gets weight 0 (its offset is
    clamped only to stay a valid row).
    """
    kernel = _gaussian_kernels(sigma, radius)
    source = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    inside = (source >= 0) & (source < size)
    index = np.repeat(np.clip(source, 0, size - 1)[None], sigma.shape[0], axis=0)
    return index, kernel[:, None, :] * inside


def _blur_and_restore(
    table: torch.Tensor,
    params: dict[str, np.ndarray],
    order: np.ndarray,
    channels: int,
    size: int,
    buffers: _Buffers,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Gaussian blur of the blurred samples (reference gaussian_blur, batch_random_blur), then
    every view back to the [sample, channel, y, x] layout and the original sample order.

    Args:
        table: (n * C * S, S) sorted rows (sample, channel, x) over y, after colour.
        params: sorted parameters; the blurred samples come first.
        order: (n,) the original index of each sorted sample.
        out: optional contiguous (n, C, S, S) destination.

    Returns:
        (n, C, S, S) float32.
    """
    n = order.shape[0]
    rows = buffers.get("rows", n * channels, size, size)  # rows (sample, channel, y) over x
    radius = _blur_radius(size)
    blurred = int(params["blur"].sum()) if radius > 0 else 0
    first = blurred * channels  # planes to blur
    if blurred:
        index, weight = _blur_taps(params["sigma"][:blurred], size, radius)
        starts = np.arange(first).reshape(blurred, channels) * size
        along_x = _gather_rows(table, starts, index, weight)
        rows[:first].copy_(along_x.view(first, size, size).transpose(1, 2))
        along_y = _gather_rows(rows.view(-1, size), starts, index, weight)
        rows[:first].copy_(along_y.view(first, size, size).clamp_(0.0, 1.0))
    rows[first:].copy_(table[first * size :].view(-1, size, size).transpose(1, 2))
    restore = _to_device(np.argsort(order), table.device, np.int64)
    flat_out = None if out is None else out.view(n, -1)
    result = torch.index_select(rows.view(n, -1), 0, restore, out=flat_out)
    return result.view(n, channels, size, size)


def _render_chunk(
    images: torch.Tensor,
    params: dict[str, np.ndarray],
    output_size: int,
    additive_brightness: bool,
    buffers: _Buffers,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """One chunk of views: (n, C, H, W) images -> (n, C, S, S) views (into ``out`` if given)."""
    channels = images.shape[1]
    order = _sort_order(params, blur_first=_blur_radius(output_size) > 0)
    ordered = {k: v[order] for k, v in params.items()}
    table = _resize(images, ordered, order, output_size, buffers)
    _color_distort(table.view(-1, channels, output_size, output_size), ordered, additive_brightness)
    return _blur_and_restore(table, ordered, order, channels, output_size, buffers, out)


@torch.no_grad()
def _apply(
    images: torch.Tensor,
    params: Params,
    *,
    output_size: int,
    additive_brightness: bool,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Shared body of SimCLRAugment.apply and EvalAugment.apply.

    CPU batches go to the compiled kernels of :mod:`simclrkit.cpurender` (unless
    ``_CPU_KERNEL`` is off: then the tensor ops below run on the CPU too, as tests do to check
    one path against the other); other devices run the tensor ops.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (B, C, H, W) tensor")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    batch, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    missing = set(_PARAM_NAMES) - set(params)
    if missing:
        raise ValueError(f"params lack {sorted(missing)}")
    host = {k: torch.as_tensor(params[k]).cpu().numpy() for k in _PARAM_NAMES}
    if any(v.shape[0] != batch for v in host.values()):
        raise ValueError(f"params must all have batch size {batch}")
    top, left, crop_h, crop_w = (host[k] for k in ("top", "left", "height", "width"))
    if ((top < 0) | (left < 0) | (crop_h < 1) | (crop_w < 1)).any() or (
        (top + crop_h > height) | (left + crop_w > width)
    ).any():
        raise ValueError(f"crop boxes must lie inside the {height}x{width} images")
    if normalize is not None and len(normalize[0]) not in (1, channels):
        raise ValueError(f"normalize has {len(normalize[0])} values for {channels}-channel images")
    shape = (batch, channels, output_size, output_size)
    allowed = (torch.float32,) if normalize is not None else (torch.float32, torch.uint8)
    if out is not None and (
        out.shape != shape or out.dtype not in allowed or out.device != images.device
        or not out.is_contiguous()
    ):  # fmt: skip
        raise ValueError(
            f"out must be a contiguous {shape} tensor on {images.device}, float32 (or uint8 "
            "without normalisation)"
        )
    if batch == 0:
        return out if out is not None else torch.empty(shape, device=images.device)
    if out is not None and out.dtype == torch.uint8 and not (
        images.device.type == "cpu" and _CPU_KERNEL
    ):
        # Tensor ops render in float; rounded as the CPU kernel rounds, half up.
        rendered = _apply(images, params, output_size=output_size,
                          additive_brightness=additive_brightness, normalize=None, out=None)
        return out.copy_(rendered.mul_(255).add_(0.5).floor_())
    if images.device.type == "cpu" and _CPU_KERNEL:
        crop_taps = _crop_taps(host, height, width, output_size, images.dtype == torch.uint8)
        return cpurender.render(
            images,
            host,
            row_taps=crop_taps[0],
            col_taps=crop_taps[1],
            hue_target=_hue_targets(host["hue"]),
            blur_kernel=_gaussian_kernels(host["sigma"], _blur_radius(output_size)),
            additive_brightness=additive_brightness,
            normalize=normalize,
            out=out if out is not None else torch.empty(shape),
        )
    if images.device.type == "cpu":
        # Chunks of a few MB: the working set stays in cache and the buffers are reused.
        chunk = max(1, _CPU_CHUNK_BYTES // (4 * channels * output_size * output_size))
    else:
        chunk = batch
    buffers = _Buffers(images.device)
    if out is None and chunk < batch:
        out = torch.empty(shape, device=images.device)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        rendered = _render_chunk(
            images[start:stop],
            {k: v[start:stop] for k, v in host.items()},
            output_size,
            additive_brightness,
            buffers,
            None if out is None else out[start:stop],
        )
    if out is None:
        out = rendered
    if normalize is not None:
        mean, std = (_to_device(np.array(v), out.device, np.float32) for v in normalize)
        out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return out
