"""JPEG decode on the training device (data.decode_on=device), run on the CPU with torchvision's
decoder: the same views as the loader's Pillow path, files it cannot take left to the loader,
and a JPEG that fails on the device replaced exactly as the loader replaces it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrkit import jpegdevice, render
from simclrkit import train as train_module
from simclrkit.augment import imagenet_augment
from simclrkit.config import ConfigError, load_config
from simclrkit.data import load_dataset
from simclrkit.devicefeed import finish_views
from simclrkit.filebatches import FileChunks

from conftest import write_jpeg_tree

CPU = torch.device("cpu")


def _chunks(source, on_device: bool, batch: int) -> FileChunks:
    return FileChunks(source, imagenet_augment(16), seed=4, global_batch_size=batch,
                      images_per_epoch=len(source), chunk_size=5, finish_on_device=True,
                      decode_on_device=on_device)  # fmt: skip


def _finished(chunks: FileChunks, step: int = 0):
    per = chunks.items_per_step
    batch = chunks.assemble([chunks[step * per + k] for k in range(per)])
    encoded = len(batch.encoded)
    batch, views = finish_views(batch, chunks.augment, CPU)
    return batch, views, encoded


def test_jpegs_decoded_on_the_device_give_the_loaders_views(tmp_path, monkeypatch):
    # Images under twice the output size: Pillow decodes them in full too, and both decoders
    # are libjpeg-turbo on the CPU, so the pixels and hence the views are the same.
    write_jpeg_tree(tmp_path, classes=2, per_class=6, size=(26, 21))  # sizes vary: padding
    source = load_dataset("imagefolder", tmp_path, "train")
    loader_batch, loader_views, none = _finished(_chunks(source, False, 12))
    device_batch, device_views, encoded = _finished(_chunks(source, True, 12))
    assert none == 0 and encoded == 12  # every image left to the device
    assert torch.equal(device_views, loader_views)
    assert torch.equal(device_batch.indices, loader_batch.indices)
    assert device_batch.reads == loader_batch.reads == 12
    # The tensor ops a GPU runs: the same up to float rounding.
    monkeypatch.setattr(render, "_CPU_KERNEL", False)
    _, tensor_views, _ = _finished(_chunks(source, True, 12))
    torch.testing.assert_close(tensor_views, loader_views, atol=2e-5, rtol=0)


def _without_quantization_table(data: bytes) -> bytes:
    """A JPEG whose header parses (size, mode) but whose pixels cannot be decoded."""
    start = data.find(b"\xff\xdb")
    length = int.from_bytes(data[start + 2 : start + 4], "big")
    return data[:start] + data[start + 2 + length :]


def _odd_files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    pixels = (rng.random((22, 25, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    odd = {
        "png": folder / "z_png.png",
        "rotated": folder / "z_rotated.jpg",
        "truncated": folder / "z_truncated.jpg",
        "no_tables": folder / "z_no_tables.jpg",
    }
    Image.fromarray(pixels).save(odd["png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: Pillow applies it, the device decoder would not
    Image.fromarray(pixels).save(odd["rotated"], exif=exif.tobytes())
    odd["truncated"].write_bytes(jpeg[: len(jpeg) // 2])
    odd["no_tables"].write_bytes(_without_quantization_table(jpeg))
    return odd


def test_files_the_device_cannot_take_stay_on_the_loader_and_bad_ones_are_replaced_alike(tmp_path):
    write_jpeg_tree(tmp_path, classes=1, per_class=8, size=(26, 21))
    odd = _odd_files(tmp_path / "train" / "class0")
    source = load_dataset("folder", tmp_path / "train", "train")
    assert jpegdevice.device_decodable(odd["no_tables"].read_bytes(), 10**8) is not None
    for name in ("png", "rotated", "truncated"):
        assert jpegdevice.device_decodable(odd[name].read_bytes(), 10**8) is None, name
    size = len(source)  # one step holds every file
    loader_batch, loader_views, _ = _finished(_chunks(source, False, size))
    device_batch, device_views, encoded = _finished(_chunks(source, True, size))
    assert encoded == 9  # the 8 JPEGs and the one that fails only when decoded
    bad = {source.path(i) for i, _ in loader_batch.bad}
    assert bad == {str(odd["truncated"]), str(odd["no_tables"])}
    # the same replacements, counts and views as if the loader had decoded everything
    assert list(device_batch.bad) == list(loader_batch.bad)
    assert device_batch.reads == loader_batch.reads
    assert torch.equal(device_batch.indices, loader_batch.indices)
    assert torch.equal(device_views, loader_views)


def test_large_photos_stay_on_the_loader(tmp_path):
    def jpeg(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="JPEG")
        return buffer.getvalue()

    assert jpegdevice.device_decodable(jpeg(1000, 1000), 10**8) == (1000, 1000)
    assert jpegdevice.device_decodable(jpeg(1001, 1000), 10**8) is None  # over 1 MP
    assert jpegdevice.device_decodable(jpeg(1025, 16), 10**8) is None  # a side over 1024
    assert jpegdevice.device_decodable(jpeg(100, 100), 9_999) is None  # the bomb limit


def test_padding_repeats_the_last_row_and_column():
    image = torch.arange(6, dtype=torch.uint8).view(1, 2, 3)
    padded = jpegdevice.pad_to_batch([image, torch.zeros(1, 3, 4, dtype=torch.uint8)])
    assert padded.shape == (2, 1, 3, 4)
    assert padded[0, 0].tolist() == [[0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5]]


def test_a_device_that_cannot_decode_falls_back_to_the_loader_with_one_line(monkeypatch, capsys):
    config = load_config("mnist5k", ["data.decode_on=device", "data.augment_on=device"])

    def broken(encoded, device):
        raise RuntimeError("torchvision was built without nvJPEG")

    monkeypatch.setattr(jpegdevice, "decode", broken)
    assert train_module._decode_on_device(config, CPU, True, quiet=False) is False
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "without nvJPEG" in lines[0] and "loader" in lines[0]
    monkeypatch.undo()
    assert train_module._decode_on_device(config, CPU, True, quiet=False) is True
    with pytest.raises(ConfigError, match="data.augment_on=device"):
        train_module._decode_on_device(config, CPU, False, quiet=False)
