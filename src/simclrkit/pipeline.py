"""The stream of augmented training batches: item ``step`` is that step's batch.

The stream is a map-style dataset indexed by the global step, not by the image. The images of
step ``s`` are a slice of an epoch permutation drawn from ``(seed, epoch)``, and every random
number of their views comes from ``(seed, epoch, index, view)`` (``augment.uniforms``). So:

* resuming at step ``k`` is just starting the sampler at ``k``: no sampler state to save;
* any number of DataLoader workers produces identical batches (a worker computes whole steps);
* the global batch of a step is the same for any world size; rank ``r`` takes rows
  ``[r * b, (r + 1) * b)`` of it, so N processes see exactly what one process sees.

Two augmentation placements share one distribution (``augment.py``):

* ``loader``: views are made here, in the DataLoader (or the main process with 0 workers); the
  batched path for in-memory images, the per-sample path for folders of any-size files;
* ``device``: the stream returns the uint8 source batch and the training loop augments it on
  the accelerator (``augment_on_device``), which keeps a GPU fed where CPU augmentation cannot.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from simclrkit.augment import SimCLRAugment
from simclrkit.data import ImageArray, ImageFiles


def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_examples, generator=generator)


class StepBatches(Dataset):
    """Item ``step`` -> (indices, view1, view2) or, on-device mode, (indices, uint8 images).

    Args:
        source: the pretraining images.
        augment: the view transform.
        seed: the run's seed.
        global_batch_size: images per step over all processes.
        steps_per_epoch: full batches per epoch (the last partial batch is dropped).
        rank, world_size: this process's share of each global batch.
        on_device: return raw uint8 batches for the training loop to augment.
    """

    def __init__(
        self,
        source: ImageArray | ImageFiles,
        augment: SimCLRAugment,
        *,
        seed: int,
        global_batch_size: int,
        steps_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        on_device: bool = False,
    ) -> None:
        if on_device and not isinstance(source, ImageArray):
            raise ValueError("on-device augmentation needs same-size images held in memory")
        self.source = source
        self.augment = augment
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.batch_size_per_device = global_batch_size // world_size
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.on_device = on_device
        self._order: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> tuple[int, torch.Tensor]:
        """(epoch, this rank's dataset indices) of a step."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.source)))
        start = position * self.global_batch_size + self.rank * self.batch_size_per_device
        return epoch, self._order[1][start : start + self.batch_size_per_device]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        epoch, indices = self.indices(step)
        if isinstance(self.source, ImageArray):
            images = self.source.images[indices]
            if self.on_device:
                return indices, images
            view1, view2 = self.augment.views(images, self.seed, epoch, indices)
            return indices, view1, view2
        pairs = [
            self.augment(self.source.read(int(i)), self.seed, epoch, int(i)) for i in indices
        ]
        return indices, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def batch_stream(
    batches: StepBatches,
    start_step: int,
    total_steps: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: bool = True,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields the items of steps ``start_step .. total_steps - 1`` in order.

    With workers, each computes whole steps ahead of the training loop (prefetching); the
    order and content do not depend on the number of workers. Without workers and with
    ``prefetch``, a background thread of this process computes the next step's item while the
    caller trains on the current one (the augmentation kernels release the GIL). Close the
    generator (``contextlib.closing``) to stop that thread when leaving early.
    """
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=range(start_step, total_steps),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        # Each worker needs few threads: the views are small tensors and the main process's
        # compute threads must not be starved.
        worker_init_fn=_single_thread_worker if num_workers else None,
        # Its own generator: the loader's worker seeds would otherwise be drawn from the
        # global RNG, whose saved state must not depend on how often a run was resumed.
        generator=torch.Generator().manual_seed(batches.seed),
    )
    if num_workers or not prefetch:
        yield from loader
        return
    ahead = _Prefetcher(iter(loader))
    try:
        yield from ahead
    finally:
        ahead.close()


class _Prefetcher:
    """Iterates ``items`` one item ahead of the consumer, in a daemon thread.

    Written here rather than taken from DataLoader: its prefetching needs worker processes,
    which copy the dataset and pay inter-process transfer for every batch; a thread shares
    the images and hands over tensors without copying. An exception raised while producing an
    item is raised again, unchanged, by the consumer's ``next`` at that item's place. Used
    once through (``yield from``): after the end or an error it is not asked again.
    """

    _END = object()

    def __init__(self, items: Iterator[Any]) -> None:
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(items,), name="simclrkit-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
        except BaseException as error:  # handed to the consumer, raised in its thread
            self._put((None, error))
            return
        self._put((self._END, None))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        """Waits for room in the queue; False when the consumer closed the stream meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the thread (it may be computing one item, which is dropped)."""
        self._stop.set()
        self._thread.join()


def _single_thread_worker(worker_id: int) -> None:
    torch.set_num_threads(1)
