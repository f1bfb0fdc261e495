"""Batches from image files: reduced-size decoding, the uint8 split, bad-file replacement."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from simclrkit.augment import SimCLRAugment, imagenet_augment
from simclrkit.data import load_dataset
from simclrkit.filebatches import FileChunks, largest_reduction, scale_boxes
from simclrkit.pipeline import batch_stream

from conftest import smooth_images, write_jpeg_tree


def _chunks(source, augment, **kwargs) -> FileChunks:
    settings = dict(seed=5, global_batch_size=8, images_per_epoch=len(source))
    return FileChunks(source, augment, **{**settings, **kwargs})


def _step(batches: FileChunks, step: int):
    items = range(step * batches.items_per_step, (step + 1) * batches.items_per_step)
    return batches.assemble([batches[i] for i in items])


def test_the_reduction_is_the_largest_power_of_two_that_keeps_every_crop_above_the_output():
    def params(heights, widths):
        return {"height": torch.tensor(heights), "width": torch.tensor(widths)}

    assert largest_reduction(params([300, 200], [250, 210]), 24) == 8  # 200 // 24 = 8
    assert largest_reduction(params([300, 100], [250, 210]), 24) == 4  # 100 // 24 = 4
    assert largest_reduction(params([47, 300], [300, 300]), 24) == 1
    assert largest_reduction(params([4000, 4000], [4000, 4000]), 24) == 8  # never past 1/8
    boxes = {"top": torch.tensor([10]), "left": torch.tensor([20]),
             "height": torch.tensor([100]), "width": torch.tensor([60])}
    scaled = scale_boxes(boxes, (200, 120), (50, 30))
    assert [float(scaled[k]) for k in ("top", "left", "height", "width")] == [2.5, 5.0, 25.0, 15.0]
    assert scale_boxes(boxes, (200, 120), (200, 120)) is boxes


def test_a_jpeg_decoded_at_a_reduced_scale_gives_nearly_the_views_of_a_full_decode(tmp_path):
    write_jpeg_tree(tmp_path, classes=1, per_class=6, size=(320, 240))
    augment = imagenet_augment(24, blur_prob=0.0)
    reduced = load_dataset("folder", tmp_path, "train")
    full = load_dataset("folder", tmp_path, "train", reduced_decode=False)
    pixels, size = reduced.read_reduced(0, lambda height, width: 4)
    assert size == (240, 320) and tuple(pixels.shape) == (3, 60, 80)
    a, b = _step(_chunks(reduced, augment, seed=1), 0), _step(_chunks(full, augment, seed=1), 0)
    other = _step(_chunks(full, augment, seed=2), 0)  # other crops of the same images
    assert torch.equal(a.indices, b.indices)
    close = (a.views - b.views).abs().mean().item()
    apart = (other.views - b.views).abs().mean().item()
    # A wrong box mapping would crop elsewhere: as far apart as other crops are.
    assert close < 0.02 and apart > 5 * close, (close, apart)


def test_exif_orientation_is_known_before_a_reduced_decode(tmp_path):
    pixels = np.zeros((128, 256, 3), dtype=np.uint8)
    pixels[:32, :32] = 255  # a marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    images = load_dataset("folder", tmp_path, "train")
    reduced, size = images.read_reduced(0, lambda height, width: 4)
    assert size == (256, 128) and tuple(reduced.shape) == (3, 64, 32)
    assert reduced[0, :8, -8:].float().mean() > 200 and reduced[0, -8:, :8].float().mean() < 50
    whole = images.read(0)
    assert tuple(whole.shape) == (3, 256, 128) and whole[0, :16, -16:].float().mean() > 200


def test_the_uint8_split_composes_to_the_whole_transform():
    images = smooth_images(16, 40)
    augment = SimCLRAugment(output_size=24, blur_prob=0.5)
    params = augment.sample_params(0, 0, torch.arange(16), 0, 40, 40)
    whole = augment.apply(images, params)
    split = augment.color(augment.crop_uint8(images, params), params)
    difference = (whole - split).abs()
    # 8-bit rounding of the resized view, amplified by at most the colour ops' slopes.
    assert difference.mean() < 0.004 and difference.max() < 0.06
    other = augment.apply(images, augment.sample_params(0, 0, torch.arange(16), 1, 40, 40))
    assert (whole - other).abs().mean() > 0.05  # the comparison can fail


def test_chunks_give_the_same_step_for_any_chunk_size_worker_count_and_world_size(tmp_path):
    write_jpeg_tree(tmp_path, classes=2, per_class=8, size=(64, 48))
    source = load_dataset("imagefolder", tmp_path, "train")
    augment = imagenet_augment(16)
    single = _chunks(source, augment, chunk_size=64)
    reference = [_step(single, step) for step in range(3)]
    assert single.items_per_step == 1 and _chunks(source, augment, chunk_size=3).items_per_step == 3
    for step, batch in enumerate(reference):
        small = _step(_chunks(source, augment, chunk_size=3), step)
        assert torch.equal(small.indices, batch.indices) and torch.equal(small.views, batch.views)
        halves = [_step(_chunks(source, augment, rank=r, world_size=2), step) for r in (0, 1)]
        assert torch.equal(torch.cat([h.indices for h in halves]), batch.indices)
        first = torch.cat([h.views[:4] for h in halves])  # each rank: its first views, then
        second = torch.cat([h.views[4:] for h in halves])  # its second views
        assert torch.equal(torch.cat([first, second]), batch.views)
    with contextlib.closing(batch_stream(_chunks(source, augment, chunk_size=3), 1, 3,
                                         num_workers=2)) as stream:  # fmt: skip
        for batch, expected in zip(stream, reference[1:]):
            assert torch.equal(batch.views, expected.views)


def test_bad_files_are_replaced_the_same_way_everywhere_and_counted(tmp_path):
    files = write_jpeg_tree(tmp_path, classes=2, per_class=8, size=(40, 30))
    source = load_dataset("imagefolder", tmp_path, "train")
    damaged = {str(files[1]), str(files[6]), str(files[12])}
    for path in damaged:  # after the listing: truncated, as a crashed copy would leave them
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    bad_index = {i for i in range(len(source)) if source.path(i) in damaged}
    augment = imagenet_augment(16)
    batches = _chunks(source, augment, global_batch_size=8)
    seen_bad = set()
    for step in range(4):  # two epochs: every file is read twice
        batch = _step(batches, step)
        assert not set(batch.indices.tolist()) & bad_index  # only good images in the batch
        assert batch.reads - len(batch.bad) == 8  # every slot filled once
        seen_bad |= {index for index, _ in batch.bad}
        assert all("truncated" in reason for _, reason in batch.bad)
        again = _step(_chunks(source, augment, global_batch_size=8), step)
        assert torch.equal(again.views, batch.views) and again.bad == batch.bad
        halves = [_step(_chunks(source, augment, rank=r, world_size=2), step) for r in (0, 1)]
        assert torch.equal(torch.cat([h.indices for h in halves]), batch.indices)
        assert sorted(e for h in halves for e in h.bad) == sorted(batch.bad)
    assert seen_bad == bad_index


def test_an_unreadable_dataset_is_a_clear_error_not_an_endless_search(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    batches = _chunks(load_dataset("folder", folder, "train"), imagenet_augment(16))
    from simclrkit.config import ConfigError

    with pytest.raises(ConfigError, match="17 images in a row could not be read"):
        batches[0]


def test_the_uint8_half_rounds_alike_in_the_cpu_kernels_and_the_tensor_ops(monkeypatch):
    from simclrkit import render

    images = smooth_images(6, 36)
    augment = SimCLRAugment(output_size=20)
    params = augment.sample_params(3, 0, torch.arange(6), 0, 36, 36)
    kernel = augment.crop_uint8(images, params)
    monkeypatch.setattr(render, "_CPU_KERNEL", False)
    tensor = augment.crop_uint8(images, params)
    float_views = augment.apply(images, {**params, "jitter": torch.zeros(6, dtype=torch.bool),
                                         "grayscale": torch.zeros(6, dtype=torch.bool),
                                         "blur": torch.zeros(6, dtype=torch.bool)})  # fmt: skip
    assert kernel.dtype == tensor.dtype == torch.uint8
    assert (kernel.int() - tensor.int()).abs().max() <= 1  # float rounding at a .5 boundary
    assert ((float_views * 255 - kernel.float()).abs() <= 0.5 + 1e-3).all()


def test_a_step_that_straddles_two_epochs_keys_each_image_on_its_own_epoch(tmp_path):
    # 10 images, batches of 4: step 2 holds the last two images of epoch 0 and the first two
    # of epoch 1 (the reference's step counting). Images under twice the output size are
    # decoded whole, so each view can be computed here from its own key.
    write_jpeg_tree(tmp_path, classes=2, per_class=5, size=(24, 20))
    source = load_dataset("imagefolder", tmp_path, "train")
    augment = imagenet_augment(16)
    chunks = _chunks(source, augment, global_batch_size=4, chunk_size=3)
    batch = _step(chunks, 2)
    epochs, indices = chunks.order.indices(2)
    assert epochs.tolist() == [0, 0, 1, 1] and torch.equal(batch.indices, indices)
    for row, (epoch, index) in enumerate(zip(epochs.tolist(), indices.tolist())):
        image = source.read(index)
        params = augment.sample_params(5, epoch, [index, index], [0, 1], *image.shape[-2:])
        pair = augment.color(augment.crop_uint8(image.expand(2, -1, -1, -1), params), params)
        torch.testing.assert_close(batch.views[row], pair[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.views[4 + row], pair[1], atol=1e-5, rtol=0)
