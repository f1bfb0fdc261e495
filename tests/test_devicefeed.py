"""The split pipeline: uint8 across, the device finishes the views with the same draws.

On the CPU the device half runs as a GPU would run it, with render.py's tensor ops
(``render._CPU_KERNEL`` off), and is compared with the host path's compiled kernels, which
test_augment.py checks against naive references of every op.
"""

from __future__ import annotations

import time

import pytest
import torch

from simclrkit import render
from simclrkit.augment import cifar_augment, imagenet_augment
from simclrkit.data import ImageArray, load_dataset
from simclrkit.devicefeed import DeviceFeed, finish_on_device, finish_views, host_bytes
from simclrkit.filebatches import FileChunks
from simclrkit.pipeline import Batch, StepBatches, batch_stream

from conftest import smooth_images, write_jpeg_tree

DEVICE = torch.device("cpu")


def _memory(finish: bool, augment) -> StepBatches:
    images = ImageArray(images=smooth_images(40, 36, seed=7), labels=None)
    return StepBatches(images, augment, seed=11, global_batch_size=16, images_per_epoch=40,
                       finish_on_device=finish)  # fmt: skip


def _files(root, finish: bool) -> FileChunks:
    source = load_dataset("imagefolder", root, "train")
    return FileChunks(source, imagenet_augment(24), seed=11, global_batch_size=8,
                      images_per_epoch=len(source), chunk_size=3, finish_on_device=finish)  # fmt: skip


def _step(batches, step: int) -> Batch:
    per = batches.items_per_step
    return batches.assemble([batches[step * per + k] for k in range(per)])


@pytest.mark.parametrize("augment", [imagenet_augment(32), cifar_augment(32)], ids=["blur", "cifar"])
def test_images_in_memory_cross_as_uint8_and_the_device_renders_the_host_paths_views(
    augment, monkeypatch
):
    host, split = _memory(False, augment), _memory(True, augment)
    for step in (0, 2):  # step 2 straddles two epochs (40 images, batches of 16)
        expected, batch = host[step], split[step]
        assert expected.views.dtype == torch.float32 and expected.todo == ""
        assert batch.todo == "views" and batch.views.dtype == torch.uint8
        assert torch.equal(batch.indices, expected.indices)
        # the step's source images cross, not its views: 16 x 3 x 36 x 36 bytes
        assert host_bytes(batch) == 16 * 3 * 36 * 36
        assert host_bytes(expected) == 2 * 16 * 3 * 32 * 32 * 4
        monkeypatch.setattr(render, "_CPU_KERNEL", False)  # the tensor ops a GPU runs
        _, on_device = finish_views(batch, augment, DEVICE)
        monkeypatch.setattr(render, "_CPU_KERNEL", True)
        torch.testing.assert_close(on_device, expected.views, atol=2e-5, rtol=0)
        # and with the CPU's own kernels the split path is the host path bit for bit
        assert torch.equal(finish_views(batch, augment, DEVICE)[1], expected.views)


def test_files_cross_as_uint8_crops_and_the_device_applies_the_colour_half(tmp_path, monkeypatch):
    write_jpeg_tree(tmp_path, classes=2, per_class=7, size=(64, 48))
    host, split = _files(tmp_path, False), _files(tmp_path, True)
    for step in (0, 1):  # 14 images, batches of 8: step 1 straddles
        expected, batch = _step(host, step), _step(split, step)
        assert batch.todo == "color" and batch.views.dtype == torch.uint8
        assert host_bytes(batch) * 4 == host_bytes(expected) == 2 * 8 * 3 * 24 * 24 * 4
        assert batch.reads == expected.reads and torch.equal(batch.indices, expected.indices)
        monkeypatch.setattr(render, "_CPU_KERNEL", False)
        _, on_device = finish_views(batch, split.augment, DEVICE)
        monkeypatch.setattr(render, "_CPU_KERNEL", True)
        torch.testing.assert_close(on_device, expected.views, atol=2e-5, rtol=0)
        assert torch.equal(finish_views(batch, split.augment, DEVICE)[1], expected.views)


def test_views_come_out_in_the_models_memory_format():
    augment = cifar_augment(32)
    batch = _memory(True, augment)[0]
    _, views = finish_views(batch, augment, DEVICE, torch.channels_last)
    assert views.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(views, _memory(False, augment)[0].views)


def test_the_feed_yields_the_streams_batches_and_times_the_wait_for_them():
    augment = cifar_augment(32)
    split = _memory(True, augment)
    host = _memory(False, augment)

    def slow(stream):
        for batch in stream:
            time.sleep(0.05)  # a loader that cannot keep up
            yield batch

    feed = DeviceFeed(slow(batch_stream(split, 0, 3, prefetch=False)), augment, DEVICE)
    for step in range(3):
        batch, views = next(feed)
        assert torch.equal(views, host[step].views)
    window = feed.window()
    assert window["data_wait_s"] >= 3 * 0.05
    assert window["h2d_bytes"] == 3 * 16 * 3 * 36 * 36
    assert window["feed_s"] > 0
    assert feed.window()["data_wait_s"] == 0  # the window restarts
    with pytest.raises(StopIteration):
        next(feed)


def test_auto_finishes_on_accelerators_only():
    assert not finish_on_device("auto", torch.device("cpu"))
    assert finish_on_device("auto", torch.device("cuda", 0))
    assert finish_on_device("device", torch.device("cpu"))
    assert not finish_on_device("host", torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_feed_runs_a_step_ahead_and_matches_the_host_path():
    augment = imagenet_augment(32)
    split, host = _memory(True, augment), _memory(False, augment)
    device = torch.device("cuda")
    stream = batch_stream(split, 0, 3, prefetch=True, pin_memory=True)
    feed = DeviceFeed(stream, augment, device)
    for step in range(3):
        batch, views = next(feed)
        assert batch.views.is_pinned()
        torch.testing.assert_close(views.cpu(), host[step].views, atol=2e-5, rtol=0)
    assert feed.window()["feed_s"] > 0
    feed.close()
