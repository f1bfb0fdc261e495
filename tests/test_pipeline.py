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
        global_batch_size=8, images_per_epoch=40,
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


def _reference_stream(seed, num_examples, images_per_epoch, steps, global_batch_size):
    """The reference's shuffle -> repeat -> batch written out naively: the epochs'
    permutations (cut to ``images_per_epoch``) laid end to end, cut into global batches."""
    from simclrkit.pipeline import epoch_order

    flat, epochs, epoch = [], [], 0
    while len(flat) < steps * global_batch_size:
        flat += epoch_order(seed, epoch, num_examples)[:images_per_epoch].tolist()
        epochs += [epoch] * images_per_epoch
        epoch += 1
    cut = range(0, steps * global_batch_size, global_batch_size)
    return [(epochs[i : i + global_batch_size], flat[i : i + global_batch_size]) for i in cut]


@pytest.mark.parametrize("num_examples,batch,world", [(10, 4, 1), (10, 4, 2), (12, 6, 3), (7, 7, 1)])
def test_step_order_cuts_the_repeated_stream_of_epochs_and_ranks_split_each_batch(
    num_examples, batch, world
):
    from simclrkit.pipeline import StepOrder

    steps = 3 * num_examples // batch + 1  # the reference's step count for 3 epochs
    expected = _reference_stream(7, num_examples, num_examples, steps, batch)
    orders = [StepOrder(7, num_examples, num_examples, batch, rank, world) for rank in range(world)]
    straddling = 0
    for step, (epochs, indices) in enumerate(expected):
        got = [order.indices(step) for order in orders]
        assert torch.cat([e for e, _ in got]).tolist() == epochs
        assert torch.cat([i for _, i in got]).tolist() == indices
        straddling += len(set(epochs)) > 1
    if num_examples % batch:
        assert straddling > 0  # the case the reference's counting differs in
    # every epoch the run completes shows each image exactly once
    seen = [i for epochs, indices in expected for e, i in zip(epochs, indices) if e < 3]
    assert sorted(seen) == sorted(list(range(num_examples)) * 3)


def test_drop_last_order_leaves_each_epochs_rest_out_and_never_straddles():
    from simclrkit.pipeline import StepOrder

    order = StepOrder(3, 8, 10, 4)  # 10 images, batches of 4: 2 steps an epoch, 2 left out
    expected = _reference_stream(3, 10, 8, 6, 4)
    for step, (epochs, indices) in enumerate(expected):
        got_epochs, got = order.indices(step)
        assert got_epochs.tolist() == epochs == [step // 2] * 4
        assert got.tolist() == indices


def test_a_straddling_step_keys_each_sample_on_its_own_epoch():
    # 10 images, batch 4: step 2 holds positions 8, 9 of epoch 0 and 0, 1 of epoch 1. Each
    # sample's views are those of its own (epoch, index), as the per-sample path draws them.
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8)
    augment = cifar_augment(8)
    batches = StepBatches(ImageArray(images=images, labels=None), augment, seed=3,
                          global_batch_size=4, images_per_epoch=10)  # fmt: skip
    batch = batches[2]
    epochs, indices = batches.order.indices(2)
    assert epochs.tolist() == [0, 0, 1, 1]
    for row, (epoch, index) in enumerate(zip(epochs.tolist(), indices.tolist())):
        first, second = augment(images[index], 3, epoch, index)
        torch.testing.assert_close(batch.views[row], first, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.views[4 + row], second, atol=1e-5, rtol=0)
