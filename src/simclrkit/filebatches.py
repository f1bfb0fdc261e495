"""Training batches from image files: decode small, crop to uint8 in the loader, colour after.

The stream of a file dataset (``pipeline.py`` drives it) is split in two halves:

1. :class:`FileChunks`, a map-style dataset run by the DataLoader workers (or a thread): item
   ``k`` is one chunk of at most ``chunk_size`` images of one step. For each image it reads
   the header, draws both views' parameters for the image's full size, decodes the file at
   the smallest JPEG scale that still covers both crops at the output size
   (``ImageFiles.read_reduced``), and renders the crop, flip and resize of both views into
   uint8 (``SimCLRAugment.crop_uint8``). A worker thus hands over ``2 x 3 x S x S`` bytes per
   image, a quarter of float32 views, in chunks smaller than a step: what a rank holds in
   flight grows with ``workers x chunk_size``, not with the batch (ImageNet: 64 images x
   2 views x 150 KB = 19 MB a chunk, against ~600 MB for a float32 step of 512).
2. :func:`assemble` joins a step's chunks and runs the rest of the transform (colour jitter,
   grayscale, blur, normalisation) batched, on the CPU kernels or, later, on the device.

Bad files (RELIABILITY.md §12). A read that still fails after its retries does not stop the
stream: the sample is replaced by another image drawn as a pure function of (seed, step, the
sample's position in the global batch, attempt), so every rank, every number of workers and
every resume makes the same choice, and the replacement gets views of its own (keyed apart
from the image's regular draws). Each chunk reports how many images it tried and which were
bad; ``badfiles.py`` counts them over the ranks and stops the run above the configured
fraction.

Cost per ImageNet-size image (~500x375 JPEG) on one core of a 2-core EPYC
(``benchmarks/data.py --sections pipeline``): 3.0 ms in all, 336 images/s, 2.3x lightly's
pipeline (a reduced scale only pays for crops at least twice the output size, so rarely here).
With the colour half on the device (``finish_on_device``) a worker's share is 2.1 ms, most of
it Pillow's decode; with ``decode_on_device`` 0.15 ms (read, header, draws). At the ~1,500
images/s an H100 trains ResNet-50 at (BENCHMARKS.md), that is ~4.5, ~3 and ~0.2 cores.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from simclrkit.augment import SimCLRAugment, uniforms
from simclrkit.config import ConfigError
from simclrkit.imagefiles import BadImageError, ImageFiles
from simclrkit.jpegdevice import device_decodable
from simclrkit.pipeline import Batch, StepOrder

# Attempts at a replacement before the data is declared unreadable: with a bad fraction f,
# 16 bad draws in a row have probability f**16 (1e-32 at 1%).
MAX_REPLACEMENTS = 16
_JPEG_REDUCTIONS = (8, 4, 2, 1)


@dataclass
class FileChunk:
    """What a loader worker hands over for part of one step: uint8 views and read counts.

    Attributes:
        step: the training step.
        indices: (m,) int64 dataset indices of the images used (replacements included).
        epochs: (m,) int64 epochs of their batch positions (part of the augmentation key).
        keys: (m,) int64 keys of their augmentation draws (a replacement has its own).
        views: (2, m, C, S, S) uint8: both views, cropped and resized, colour not yet applied;
            without the images in ``encoded``, which the device decodes and crops.
        reads: images read (replacement attempts included).
        bad: (dataset index, reason) of every read that failed.
        encoded: JPEGs left to the device to decode (``decode_on_device``): (position in the
            chunk, encoded bytes as a uint8 tensor, the draws of both views at full size)
            (``jpegdevice.py``).
    """

    step: int
    indices: torch.Tensor
    epochs: torch.Tensor
    keys: torch.Tensor
    views: torch.Tensor
    reads: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    encoded: list[tuple[int, torch.Tensor, dict]] = field(default_factory=list)


def largest_reduction(params: dict[str, torch.Tensor], output_size: int) -> int:
    """The largest JPEG scale 1/r whose decode still covers every crop at the output size:
    r <= min crop side / S, r a power of two up to 8."""
    side = min(int(params["height"].min()), int(params["width"].min()))
    limit = side // output_size
    return next(r for r in _JPEG_REDUCTIONS if r <= max(limit, 1))


def scale_boxes(
    params: dict[str, torch.Tensor], full: tuple[int, int], decoded: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Crop boxes drawn on the full-size image, mapped onto its reduced decode (fractional).

    A DCT-scaled decode maps full-size pixel block [k r, (k + 1) r) to pixel k, so a length
    scales by the ratio of the sizes and the half-pixel centres stay aligned.
    """
    if decoded == full:
        return params
    sy, sx = decoded[0] / full[0], decoded[1] / full[1]
    top = params["top"].double() * sy
    left = params["left"].double() * sx
    height = torch.minimum(params["height"].double() * sy, decoded[0] - top)
    width = torch.minimum(params["width"].double() * sx, decoded[1] - left)
    return {**params, "top": top, "left": left, "height": height, "width": width}


class FileChunks(Dataset):
    """Item ``k`` -> :class:`FileChunk` ``k % chunks_per_step`` of step ``k // chunks_per_step``.

    Args:
        source: the pretraining images.
        augment: the view transform.
        seed: the run's seed.
        global_batch_size: images per step over all processes.
        images_per_epoch: stream positions per epoch (``pipeline.StepOrder``).
        rank, world_size: this process's share of each global batch.
        chunk_size: images per item.
        finish_on_device: :meth:`assemble` leaves the colour half to the training device
            (``Batch.todo == "color"``): the views cross as uint8.
        decode_on_device: plain JPEGs are read, not decoded: the training device decodes and
            crops them (``jpegdevice.py``; needs ``finish_on_device``).
    """

    def __init__(
        self,
        source: ImageFiles,
        augment: SimCLRAugment,
        *,
        seed: int,
        global_batch_size: int,
        images_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = 64,
        finish_on_device: bool = False,
        decode_on_device: bool = False,
    ) -> None:
        if decode_on_device and not finish_on_device:
            raise ValueError("decode_on_device needs finish_on_device: the crops exist there only")
        self.source, self.augment, self.seed = source, augment, seed
        self.finish_on_device, self.decode_on_device = finish_on_device, decode_on_device
        self.order = StepOrder(seed, images_per_epoch, len(source), global_batch_size, rank,
                               world_size)  # fmt: skip
        self.chunk_size = min(chunk_size, self.order.batch_size_per_device)
        self.items_per_step = math.ceil(self.order.batch_size_per_device / self.chunk_size)

    def __getitem__(self, item: int) -> FileChunk:
        step, chunk = divmod(item, self.items_per_step)
        epochs, indices = self.order.indices(step)
        first = chunk * self.chunk_size
        positions = range(first, min(first + self.chunk_size, len(indices)))
        empty = torch.empty(0)
        result = FileChunk(step, empty, epochs[first : first + len(positions)], empty, empty)
        used, keys, views = [], [], []
        for position in positions:
            epoch = int(epochs[position])
            index = int(indices[position])
            encoded = self._encoded(index, epoch) if self.decode_on_device else None
            if encoded is not None:  # read; the device decodes it
                result.reads += 1
                result.encoded.append((position - first, *encoded))
                key = index
            else:
                index, key, pair = self._sample(step, epoch, position, index, result)
                views.append(pair)
            used.append(index)
            keys.append(key)
        result.indices = torch.tensor(used, dtype=torch.int64)
        result.keys = torch.tensor(keys, dtype=torch.int64)
        size = self.augment.output_size
        result.views = (
            torch.stack(views, dim=1) if views
            else torch.empty(2, 0, self.source.num_channels, size, size, dtype=torch.uint8)
        )  # fmt: skip
        return result

    def _sample(
        self, step: int, epoch: int, position: int, index: int, report: FileChunk
    ) -> tuple[int, int, torch.Tensor]:
        """(image used, its augmentation key, (2, C, S, S) uint8) for one batch position."""
        global_position = self.order.rank * self.order.batch_size_per_device + position
        key = index
        first_failure = None
        for attempt in range(MAX_REPLACEMENTS + 1):
            if attempt:
                index, key = self._replacement(step, global_position, attempt)
            report.reads += 1
            try:
                return index, key, self._views(index, key, epoch)
            except BadImageError as error:
                report.bad.append((index, error.reason))
                first_failure = first_failure or error
        raise ConfigError(
            f"data: {MAX_REPLACEMENTS + 1} images in a row could not be read (the first: "
            f"{first_failure}); the data is unreadable or almost all of it is bad"
        )

    def _encoded(self, index: int, epoch: int) -> tuple[torch.Tensor, dict] | None:
        """(bytes, both views' draws) of a JPEG the device can decode, else None (not a plain
        JPEG, too large, a broken header or a failed read: the Pillow path reports those)."""
        try:
            data = self.source.fetch(index)
        except Exception:  # retried, and counted if bad, by the Pillow path
            return None
        size = device_decodable(data, self.source.max_image_pixels)
        if size is None:
            return None
        params = self.augment.sample_params(self.seed, epoch, [index, index], [0, 1], *size)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), params

    def recover(self, step: int, position: int, index: int, epoch: int) -> tuple:
        """The Pillow path for a JPEG the device failed to decode, at its batch position: the
        same replacement and counts as if it had never been left to the device.

        Returns:
            (image used, (2, C, S, S) uint8 views, the colour draws of its 2 views, reads
            beyond the one already counted, bad reads).
        """
        report = FileChunk(step, *(torch.empty(0),) * 4)
        used, key, pair = self._sample(step, epoch, position, index, report)
        params = colour_draws(self.augment, self.seed, torch.tensor([epoch]), torch.tensor([key]))
        return used, pair, params, report.reads - 1, report.bad

    def _replacement(self, step: int, global_position: int, attempt: int) -> tuple[int, int]:
        """The stand-in for a bad image: a function of (seed, step, position, attempt) only.

        Its key lies above every dataset index and is unique to the batch slot, so its views
        are not the same draws as the image's own in this or any other step.
        """
        u = float(uniforms(self.seed, -1 - step, [global_position], attempt, 1)[0, 0])
        num_examples = len(self.source)
        index = min(int(u * num_examples), num_examples - 1)
        slot = step * self.order.global_batch_size + global_position
        return index, num_examples + slot * (MAX_REPLACEMENTS + 1) + attempt

    def _views(self, index: int, key: int, epoch: int) -> torch.Tensor:
        augment = self.augment
        drawn: dict[str, dict] = {}

        def reduction_for(height: int, width: int) -> int:
            drawn["params"] = augment.sample_params(
                self.seed, epoch, [key, key], [0, 1], height, width
            )
            return largest_reduction(drawn["params"], augment.output_size)

        pixels, full = self.source.read_reduced(index, reduction_for)
        params = drawn.get("params")
        if params is None:  # decoded in full without asking (not a JPEG): its size is known now
            params = augment.sample_params(self.seed, epoch, [key, key], [0, 1], *full)
        params = scale_boxes(params, full, tuple(pixels.shape[-2:]))
        return augment.crop_uint8(pixels.unsqueeze(0).expand(2, -1, -1, -1), params)

    def assemble(self, chunks: list[FileChunk]) -> Batch:
        """A step's chunks -> its :class:`~simclrkit.pipeline.Batch` (colour applied)."""
        batch = assemble(self.augment, self.seed, chunks, color=not self.finish_on_device)
        if batch.encoded:
            batch = batch._replace(recover=functools.partial(self.recover, chunks[0].step))
        return batch


def colour_draws(
    augment: SimCLRAugment, seed: int, epochs: torch.Tensor, keys: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The draws of both views of each (epoch, key), first views then second views, at the
    output size: what the colour half of the crops uses."""
    which = np.repeat(np.arange(2), keys.shape[0])
    size = augment.output_size
    return augment.sample_params(
        seed, torch.cat([epochs, epochs]), torch.cat([keys, keys]), which, size, size
    )


def assemble(
    augment: SimCLRAugment, seed: int, chunks: list[FileChunk], color: bool = True
) -> Batch:
    """Joins the chunks of one step and applies the colour half of the transform, batched.

    Args:
        color: apply the colour half here; False leaves it, with its draws, to the training
            device (``devicefeed.py``).

    Returns:
        The step's batch: views (2B, C, S, S), every first view before every second one, as
        the training step concatenates them, float32 (or uint8 with ``todo == "color"``,
        without the rows of JPEGs the device decodes: ``Batch.encoded``); the reads and bad
        reads of its chunks.
    """
    indices = torch.cat([c.indices for c in chunks])
    keys = torch.cat([c.keys for c in chunks])
    epochs = torch.cat([c.epochs for c in chunks])
    views = torch.cat([torch.cat([c.views[v] for c in chunks]) for v in (0, 1)])
    params = colour_draws(augment, seed, epochs, keys)
    reads = sum(c.reads for c in chunks)
    bad = [entry for c in chunks for entry in c.bad]
    offsets = np.cumsum([0] + [c.keys.shape[0] for c in chunks])
    encoded = [
        (int(offset) + position, data, draws, int(chunk.indices[position]),
         int(chunk.epochs[position]))
        for offset, chunk in zip(offsets, chunks)
        for position, data, draws in chunk.encoded
    ]  # fmt: skip
    if not color:
        return Batch(indices, views, reads, bad, todo="color", params=params, encoded=encoded)
    if encoded:
        raise ValueError("encoded JPEGs need the device half (color=False)")
    return Batch(indices, augment.color(views, params), reads, bad)
