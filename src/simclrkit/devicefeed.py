"""Feeding the training device: a step's batch crosses as uint8 and the device finishes it.

On an accelerator the CPU cannot keep up with per-pixel augmentation: the full view pipeline
costs ~9 ms of CPU per ImageNet-size image (two 224 px views, BENCHMARKS.md), and one H100
training a ResNet-50 consumes ~1,500 images/s, so ~15 cores would do nothing else. The split
pipeline (``data.augment_on=device``) keeps on the host only what must happen where the source
is, and moves the rest to the device, batched:

* images in memory (``pipeline.StepBatches``): the host hands over the step's uint8 images and
  the 2B views' parameter draws; the device crops, resizes, colours and blurs them
  (``render.py``'s tensor ops). ImageNet-size crops never exist on the host.
* image files (``filebatches.FileChunks``): loader workers read, decode (at a reduced JPEG
  scale where the crops allow) and crop+resize both views to uint8 at the output size; the
  device applies the colour half (jitter, grayscale, blur, normalisation).

Either way the batch crosses as uint8, a quarter of float32's bytes (ImageNet, 512 images:
154 MB of views, or the source images, instead of 616 MB), copied by the prefetch thread into
page-locked memory (``batch_stream(pin_memory=True)``) so the copy is asynchronous. The
parameter draws are the same numbers as the host path's (``augment.sample_params`` keyed on
(seed, epoch, index, view)), so the two paths give the same views up to float rounding.

:class:`DeviceFeed` runs one step ahead on CUDA: while step s computes on the default stream,
step s+1's copy and augmentation run on a side stream, and step s+1 waits for them on the
device, not on the host. It also times what the training loop waited for: the host stream
(data wait) and the device's copy and augmentation (CUDA events, read only at log steps, so
they add no host sync in between). On the CPU it finishes each batch synchronously.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from simclrkit.augment import SimCLRAugment
from simclrkit.jpegdevice import fill_decoded
from simclrkit.pipeline import Batch


def finish_on_device(setting: str, device: torch.device) -> bool:
    """``data.augment_on``: ``auto`` finishes views on the device when it is an accelerator."""
    if setting == "auto":
        return device.type != "cpu"
    return setting == "device"


def finish_views(
    batch: Batch, augment: SimCLRAugment, device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Batch, torch.Tensor]:  # fmt: skip
    """The batch's (2B, C, S, S) float32 views on ``device``, finished there if ``todo`` says,
    and the batch (updated where a JPEG left to the device had to be recovered as bad).

    The copy is ``non_blocking``: asynchronous from pinned memory on CUDA.
    """
    pixels = batch.views.to(device, non_blocking=True)
    if batch.encoded:  # JPEGs to decode here first (jpegdevice.py)
        batch, pixels = fill_decoded(batch, pixels, augment, device)
    if batch.todo == "color":
        views = augment.color(pixels, batch.params)
    elif batch.todo == "views":
        # both views of an image read its one copy on the device (the rows repeat, not the data)
        views = augment.apply(pixels.repeat(2, 1, 1, 1), batch.params)
    elif batch.todo == "":
        views = pixels
    else:
        raise ValueError(f"unknown batch todo {batch.todo!r}")
    return batch, views.contiguous(memory_format=memory_format)


def host_bytes(batch: Batch) -> int:
    """Bytes the batch moves from the host to the device: its pixels and any JPEG files the
    device decodes."""
    encoded = sum(entry[1].numel() for entry in batch.encoded)
    return batch.views.numel() * batch.views.element_size() + encoded


class DeviceFeed:
    """Host batches -> ``(batch, views on the device)``, and what the loop waited for.

    Args:
        host: the host stream (``pipeline.batch_stream``).
        augment: the view transform (for the half left to the device).
        device: the training device.
        memory_format: the layout the model takes (channels_last on GPUs and recent CPUs).

    Attributes:
        waited: seconds the caller's thread blocked on the host stream since the last
            :meth:`window`.
    """

    def __init__(
        self, host: Iterator[Batch], augment: SimCLRAugment, device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:  # fmt: skip
        self.host, self.augment, self.device = host, augment, device
        self.memory_format = memory_format
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.waited = 0.0
        self.bytes = 0
        self._feed_seconds = 0.0  # host-timed finishing (CPU)
        self._events: list[tuple[Any, Any]] = []  # CUDA: (start, end) of each finishing
        self._ahead: tuple[Batch, torch.Tensor] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def _next_host(self) -> Batch:
        started = time.perf_counter()
        try:
            return next(self.host)
        finally:
            self.waited += time.perf_counter() - started

    def _launch(self) -> tuple[Batch, torch.Tensor]:
        """The next batch, its copy and finishing queued on the side stream."""
        batch = self._next_host()
        self.bytes += host_bytes(batch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record()
            batch, views = finish_views(batch, self.augment, self.device, self.memory_format)
            end.record()
        self._events.append((start, end))
        return batch, views

    def __next__(self) -> tuple[Batch, torch.Tensor]:
        if not self.cuda:
            batch = self._next_host()
            self.bytes += host_bytes(batch)
            started = time.perf_counter()
            batch, views = finish_views(batch, self.augment, self.device, self.memory_format)
            self._feed_seconds += time.perf_counter() - started
            return batch, views
        if self._ahead is None:
            self._ahead = self._launch()  # the first step (raises StopIteration at the end)
        batch, views = self._ahead
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # on the device: the host does not wait
        views.record_stream(current)  # made on the side stream, used and freed on this one
        try:
            self._ahead = self._launch()  # the next step's copy overlaps this step's compute
        except StopIteration:
            self._ahead = None
        return batch, views

    def window(self) -> dict[str, float]:
        """Data wait, device-feed seconds and host->device bytes since the last call.

        On CUDA this reads the finished steps' events (a sync on work queued a step ago),
        so call it at log steps only.
        """
        feed = self._feed_seconds
        if self.cuda:
            done = self._events[:-1] if self._ahead is not None else self._events
            for start, end in done:
                end.synchronize()
                feed += start.elapsed_time(end) / 1000.0
            self._events = self._events[len(done) :]
        result = {"data_wait_s": self.waited, "feed_s": feed, "h2d_bytes": float(self.bytes)}
        self.waited, self._feed_seconds, self.bytes = 0.0, 0.0, 0
        return result

    def close(self) -> None:
        """Drops the batch queued ahead (its side-stream work completes on its own)."""
        self._ahead = None
        close = getattr(self.host, "close", None)
        if close is not None:
            close()
