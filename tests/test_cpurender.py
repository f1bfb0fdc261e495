"""Tests for simclrkit.cpurender: the compiled CPU kernels against the tensor-op path on sampled
views of every kind, and independence from the thread count, concurrent callers and forks.

The maths of each op is checked on both paths against naive references in test_augment.py.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from simclrkit import render
from simclrkit.augment import SimCLRAugment, cifar_augment, imagenet_augment

from conftest import smooth_images


def _views(aug, images: torch.Tensor, kernel: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(render, "_CPU_KERNEL", kernel)
    return aug.views(images, 3, 1, torch.arange(images.shape[0]), num_views=3)


CASES = {
    "imagenet 64 px, blur": (imagenet_augment(64), smooth_images(24, 80)),
    "normalised": (
        imagenet_augment(40, normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        smooth_images(16, 48, seed=1),
    ),
    "cifar 32 px": (cifar_augment(32), smooth_images(32, 32, seed=2)),
    "one channel": (SimCLRAugment(output_size=28, grayscale_prob=0.0), smooth_images(32, 28, 1, 3)),
    "additive brightness": (
        SimCLRAugment(output_size=24, brightness="additive", blur_prob=1.0),
        smooth_images(16, 30, seed=4),
    ),
    "float input": (imagenet_augment(32), smooth_images(16, 44, seed=5).float() / 255),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_tensor_ops(case, monkeypatch):
    aug, images = CASES[case]
    kernel = _views(aug, images, True, monkeypatch)
    tensor_ops = _views(aug, images, False, monkeypatch)
    for a, b in zip(kernel, tensor_ops):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        # Same maths, different float summation order: a few ulps, amplified by the colour
        # factors (up to 1.8) and the normalisation's 1/std (up to 4.5).
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert not torch.equal(kernel[0], kernel[1])  # the views did differ


def test_result_does_not_depend_on_the_thread_count():
    aug, images = CASES["imagenet 64 px, blur"]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(aug.views(images, 0, 0, torch.arange(images.shape[0])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_concurrent_callers_get_their_own_results():
    # The training loop renders in a prefetch thread while other code may render too.
    aug, images = CASES["imagenet 64 px, blur"]
    expected = {epoch: aug.views(images, 0, epoch, torch.arange(24)) for epoch in range(4)}
    got: dict[int, list[torch.Tensor]] = {}

    def run(epoch: int) -> None:
        for _ in range(3):
            got[epoch] = aug.views(images, 0, epoch, torch.arange(24))

    workers = [threading.Thread(target=run, args=(epoch,)) for epoch in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for epoch, views in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(views, got[epoch]))


def _render_in_child(queue) -> None:
    aug, images = CASES["cifar 32 px"]
    torch.set_num_threads(2)
    queue.put([view.numpy() for view in aug.views(images, 0, 0, torch.arange(32))])


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_a_forked_child_renders_like_its_parent():
    # The parent's worker pool does not survive a fork (DataLoader workers are forked): the
    # child must start its own rather than wait forever on threads that do not exist.
    aug, images = CASES["cifar 32 px"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent = aug.views(images, 0, 0, torch.arange(32))  # starts the parent's pool
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_render_in_child, args=(queue,))
    child.start()
    try:
        views = queue.get(timeout=120)
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(parent, views))
