"""The step-indexed batch stream and its prefetching thread."""

import contextlib
import threading

import pytest
import torch
from torch.utils.data import Dataset

from simclrkit.augment import cifar_augment
from simclrkit.data import ImageArray
from simclrkit.pipeline import StepBatches, batch_stream


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "simclrkit-prefetch" and t.is_alive()]


def _step_batches() -> StepBatches:
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8)
    return StepBatches(
        ImageArray(images=images, labels=None), cifar_augment(8), seed=3,
        global_batch_size=8, steps_per_epoch=5,
    )


class _Steps(Dataset):
    """Item ``step`` is ``step``; records which steps were computed; fails at ``fail_at``."""

    seed = 0

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.computed: list[int] = []
        self.second_started = threading.Event()

    def __getitem__(self, step: int) -> int:
        self.computed.append(step)
        if step == 1:
            self.second_started.set()
        if step == self.fail_at:
            raise ValueError(f"unreadable image in step {step}")
        return step


def test_prefetched_stream_yields_exactly_the_plain_stream_from_any_start_step():
    batches = _step_batches()
    for start in (0, 3, 7):
        plain = list(batch_stream(batches, start, 12, prefetch=False))
        with contextlib.closing(batch_stream(batches, start, 12, prefetch=True)) as stream:
            ahead = list(stream)
        assert len(ahead) == len(plain) == 12 - start
        for first, second in zip(plain, ahead):
            assert torch.equal(first.indices, second.indices)
            assert torch.equal(first.views, second.views)
    assert not _prefetch_threads()


def test_the_next_step_is_computed_while_the_caller_holds_the_current_one():
    steps = _Steps()
    with contextlib.closing(batch_stream(steps, 0, 5)) as stream:
        assert next(stream) == 0
        # Without prefetching step 1 would only start at the next call of next().
        assert steps.second_started.wait(timeout=10)
        assert list(stream) == [1, 2, 3, 4]
    no_thread = _Steps()
    with contextlib.closing(batch_stream(no_thread, 0, 5, prefetch=False)) as stream:
        assert next(stream) == 0
        assert not no_thread.second_started.wait(timeout=0.3)


def test_an_error_making_a_batch_reaches_the_caller_at_that_step_unchanged():
    stream = batch_stream(_Steps(fail_at=2), 0, 5)
    assert [next(stream), next(stream)] == [0, 1]
    with pytest.raises(ValueError, match="unreadable image in step 2"):
        next(stream)
    assert not _prefetch_threads()


def test_leaving_early_stops_the_thread_and_computes_at_most_one_step_ahead():
    steps = _Steps()
    with contextlib.closing(batch_stream(steps, 0, 1000)) as stream:
        assert next(stream) == 0
        assert next(stream) == 1
        assert steps.second_started.wait(timeout=10)
    assert not _prefetch_threads()
    # the two consumed, one in the queue, at most one being made when the stream closed
    assert len(steps.computed) <= 4
