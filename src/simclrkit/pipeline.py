"""The stream of augmented training batches: item ``step`` is that step's batch.

The stream is indexed by the global step, not by the image. The images of step ``s`` are a
slice of the run's stream of epoch permutations, each drawn from ``(seed, epoch)``
(:class:`StepOrder`), and every random number of their views comes from
``(seed, epoch, index, view)`` (``augment.uniforms``), the epoch being the sample's own. So:

* resuming at step ``k`` is just starting the sampler at ``k``: no sampler state to save;
* any number of DataLoader workers produces identical batches (items are pure functions);
* the global batch of a step is the same for any world size; rank ``r`` takes rows
  ``[r * b, (r + 1) * b)`` of it, so N processes see exactly what one process sees.

Two datasets feed it, with one protocol (``items_per_step`` items make a step, ``assemble``
joins them into a :class:`Batch`):

* :class:`StepBatches`, images held in memory: one item is a whole step, rendered batched;
* :class:`~simclrkit.filebatches.FileChunks`, image files: a step is several chunks, each
  decoded and cropped to uint8 by a worker; the colour half runs when a step is assembled.

With DataLoader workers each worker computes whole items ahead of the loop; with or without
them a thread assembles the next step while the training step runs (``prefetch``). Workers
survive the SIGTERM a cluster sends to every process of a job: the main process checkpoints
and then stops them itself (:func:`worker_init`).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from simclrkit.augment import SimCLRAugment
from simclrkit.data import ImageArray


class Batch(NamedTuple):
    """One step's batch on this process.

    Attributes:
        indices: (B,) int64 dataset indices of the images.
        views: (2B, C, S, S) float32: the first view of every image, then every second view;
            or, when ``todo`` is set, the uint8 pixels the training device finishes them from
            (``devicefeed.py``).
        reads: image files read for it (0 for images held in memory).
        bad: (dataset index, reason) of each file read that failed and was replaced.
        todo: what remains to be done on the device: "" nothing; "color": ``views`` are the
            (2B, C, S, S) uint8 crops and the colour half remains (files); "views": ``views``
            are the (B, C, H, W) uint8 images and the whole transform remains (in memory).
        params: with ``todo``, the augmentation draws of the 2B views (first views, then
            second views), small CPU tensors.
        encoded: JPEGs the device decodes first (``jpegdevice.py``): (row, bytes, both views'
            draws at full size, dataset index, epoch); ``views`` then holds only the other
            rows' crops (first views, then second views, in row order).
        recover: ``recover(row, index, epoch)``, the loader's path for an encoded JPEG the
            device could not decode (``FileChunks.recover``).
    """

    indices: torch.Tensor
    views: torch.Tensor
    reads: int = 0
    bad: Sequence[tuple[int, str]] = ()
    todo: str = ""
    params: dict[str, torch.Tensor] | None = None
    encoded: Sequence[tuple] = ()
    recover: Callable[..., tuple] | None = None


def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_examples, generator=generator)


class StepOrder:
    """Which images each step gives this process: its rows of the run's stream of samples.

    The stream is the concatenation of the epochs' permutations, each cut to its first
    ``images_per_epoch`` entries; the global batch of step ``s`` is stream positions
    ``[s B, (s + 1) B)`` and rank ``r`` of ``W`` takes rows ``[r b, (r + 1) b)`` of it
    (``b = B / W``). Position ``q`` is entry ``q mod images_per_epoch`` of epoch
    ``q // images_per_epoch``'s permutation. With ``images_per_epoch`` the number of images
    this is the reference's shuffle -> repeat -> batch (a step may hold the end of one epoch
    and the start of the next); with ``floor(N / B) B`` every epoch is whole steps and its
    last ``N mod B`` images are dropped (``config.resolve``, ``train.step_counting``).

    Cost: the two newest permutations are cached, since a step spans at most two epochs
    (``config.resolve`` keeps ``B <= N``); ImageNet's 1.28M is 10 MB and ~20 ms to draw, once
    per epoch per process.
    """

    def __init__(
        self, seed: int, images_per_epoch: int, num_examples: int, global_batch_size: int,
        rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        if not 0 < images_per_epoch <= num_examples:
            raise ValueError(
                f"images_per_epoch must be in [1, {num_examples}], got {images_per_epoch}"
            )
        self.seed, self.images_per_epoch, self.num_examples = seed, images_per_epoch, num_examples
        self.global_batch_size = global_batch_size
        self.batch_size_per_device = global_batch_size // world_size
        self.rank = rank
        self._cached: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cached:
            self._cached = {e: o for e, o in self._cached.items() if e == epoch - 1}
            self._cached[epoch] = epoch_order(self.seed, epoch, self.num_examples)
        return self._cached[epoch]

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(epochs, dataset indices) of this rank's rows of a step: two (b,) int64 tensors.

        The epoch of each sample is part of its augmentation key (``augment.uniforms``).
        """
        first = step * self.global_batch_size + self.rank * self.batch_size_per_device
        positions = torch.arange(first, first + self.batch_size_per_device, dtype=torch.int64)
        epochs = positions // self.images_per_epoch
        within = positions % self.images_per_epoch
        indices = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():  # one or two epochs
            rows = epochs == epoch
            indices[rows] = self._order(epoch)[within[rows]]
        return epochs, indices


class StepBatches(Dataset):
    """Item ``step`` -> that step's :class:`Batch`, for images held in memory.

    Args:
        source: the pretraining images.
        augment: the view transform.
        seed: the run's seed.
        global_batch_size: images per step over all processes.
        images_per_epoch: stream positions per epoch (:class:`StepOrder`).
        rank, world_size: this process's share of each global batch.
        finish_on_device: hand over the step's uint8 images and the views' draws instead of
            rendered views (``Batch.todo == "views"``): the training device renders them,
            ``B x C x H x W`` bytes crossing instead of ``2B x C x S x S x 4``.
    """

    items_per_step = 1

    def __init__(
        self,
        source: ImageArray,
        augment: SimCLRAugment,
        *,
        seed: int,
        global_batch_size: int,
        images_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        finish_on_device: bool = False,
    ) -> None:
        self.source, self.augment, self.seed = source, augment, seed
        self.finish_on_device = finish_on_device
        self.order = StepOrder(seed, images_per_epoch, len(source), global_batch_size, rank,
                               world_size)  # fmt: skip

    def __getitem__(self, step: int) -> Batch:
        epochs, indices = self.order.indices(step)
        images = self.source.images[indices]
        if self.finish_on_device:
            which = torch.arange(2).repeat_interleave(len(indices))  # first views, then second
            params = self.augment.sample_params(
                self.seed, epochs.repeat(2), indices.repeat(2), which, *images.shape[-2:]
            )
            return Batch(indices, images, todo="views", params=params)
        size, batch = self.augment.output_size, len(indices)
        views = torch.empty(2 * batch, images.shape[1], size, size)
        for view, out in enumerate((views[:batch], views[batch:])):
            params = self.augment.sample_params(
                self.seed, epochs, indices, view, *images.shape[-2:]
            )
            self.augment.apply(images, params, out=out)
        return Batch(indices, views)

    @staticmethod
    def assemble(items: list[Batch]) -> Batch:
        return items[0]


def batch_stream(
    batches: Any,
    start_step: int,
    total_steps: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: bool = True,
) -> Iterator[Any]:
    """Yields the batches of steps ``start_step .. total_steps - 1`` in order.

    ``batches`` is a :class:`StepBatches`, a :class:`~simclrkit.filebatches.FileChunks` or any
    map-style dataset of whole steps (``items_per_step`` 1 and ``assemble`` default to that).
    With workers, each computes whole items ahead of the training loop; the order and content
    do not depend on the number of workers. With ``prefetch``, a background thread of this
    process assembles the next step while the caller trains on the current one (the
    augmentation kernels release the GIL). With ``pin_memory`` (CUDA only) each assembled
    step's pixels are copied into page-locked memory there too, so that the copy to the
    device can be asynchronous (``devicefeed.py``); the workers' chunks are not pinned, as
    they are joined on the host. Close the generator (``contextlib.closing``) to stop that
    thread and the workers when leaving early.
    """
    per_step = getattr(batches, "items_per_step", 1)
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=range(start_step * per_step, total_steps * per_step),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=worker_init if num_workers else None,
        # Its own generator: the loader's worker seeds would otherwise be drawn from the
        # global RNG, whose saved state must not depend on how often a run was resumed.
        generator=torch.Generator().manual_seed(batches.seed),
    )
    assemble = getattr(batches, "assemble", None)

    def steps() -> Iterator[Any]:
        items = iter(loader)
        for _ in range(start_step, total_steps):
            group = [next(items) for _ in range(per_step)]
            batch = assemble(group) if assemble is not None else group[0]
            if pin_memory:
                batch = batch._replace(views=batch.views.pin_memory())
            yield batch

    if not prefetch:
        yield from steps()
        return
    ahead = _Prefetcher(steps())
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
        self._items = items
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
        """Stops the thread (it may be computing one item, which is dropped), then the
        generator it drew from, which shuts the DataLoader's workers down."""
        self._stop.set()
        self._thread.join()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


def worker_init(worker_id: int) -> None:
    """A DataLoader worker: one compute thread, and the first SIGTERM or SIGINT ignored.

    Each worker needs few threads: the views are small tensors and the main process's compute
    threads must not be starved. The signals: SLURM (``--signal=TERM@...``) and a terminal's
    Ctrl-C signal every process of the job, workers included. A worker that died of it would
    take the run down before the main process could checkpoint (DataLoader turns a dead worker
    into an error); so a worker ignores the first one and goes on serving batches until the
    main process, which has checkpointed meanwhile, shuts it down the usual way. A second
    signal (DataLoader's own ``terminate`` of a worker that did not stop in time, or a user
    insisting) ends it as the signal would have.
    """
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_first_signal)


def _ignore_first_signal(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)  # the next one acts as if nothing had been set
    if signum == signal.SIGINT:
        signal.signal(signum, signal.default_int_handler)


def auto_workers(setting: int | str, *, in_memory: bool, device_type: str) -> int:
    """``data.num_workers``: a number as given, or ``auto``.

    ``auto``: 0 for images held in memory (a thread renders them; workers would copy them);
    for files, what decoding needs next to the training step: on an accelerator every core of
    this process's share but two (one for the training loop, one for the prefetch thread), up
    to 16; on the CPU, where the training step itself uses the cores, half of them, up to 4.
    A process's share is its cores divided by the processes on the machine (torchrun's
    ``LOCAL_WORLD_SIZE``).
    """
    if setting != "auto":
        return int(setting)
    if in_memory:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device_type == "cpu":
        return max(1, min(4, share // 2))
    return max(1, min(16, share - 2))
