"""Datasets: every on-disk format written here for real, read back exactly; bad files found.

Each test writes small files in the official formats (IDX, CIFAR pickles, STL-10 binaries,
image trees, file lists) and compares what the loader returns with the arrays that were
written, or with pixel values worked out by hand.
"""

import gzip
import io
import os
import pickle
import struct
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from simclrkit import data, imagearrays, imagefiles
from simclrkit.config import ConfigError
from simclrkit.data import (
    BadImageError,
    BadImageWarning,
    ImageArray,
    ImageFiles,
    dataset_summary,
    load_dataset,
    load_image_files,
)

RNG = np.random.default_rng(0)


def _bad_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, BadImageWarning)]


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------


def _write_idx(path, array, magic, gz):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        payload = gzip.compress(payload)
        path = path.with_name(path.name + ".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _write_idx_set(folder, gz):
    """Non-square (rows 3, cols 5) images so a rows/cols mix-up shows."""
    arrays = {
        "train": (RNG.integers(0, 256, (4, 3, 5)), RNG.integers(0, 10, 4)),
        "test": (RNG.integers(0, 256, (2, 3, 5)), RNG.integers(0, 10, 2)),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 0x803, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 0x801, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "name, subfolder",
    [("mnist", ""), ("mnist", "MNIST/raw"), ("fashion-mnist", ""),
     ("fashion-mnist", "FashionMNIST/raw")],
)  # fmt: skip
def test_idx_files_read_back_exactly(tmp_path, gz, name, subfolder):
    arrays = _write_idx_set(tmp_path / subfolder if subfolder else tmp_path, gz)
    for split in ("train", "test"):
        loaded = load_dataset(name, tmp_path, split)
        images, labels = arrays[split]
        assert isinstance(loaded, ImageArray)
        assert loaded.images.dtype == torch.uint8 and loaded.images.shape == (len(images), 1, 3, 5)
        assert torch.equal(loaded.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
        assert torch.equal(loaded.labels, torch.from_numpy(labels.astype(np.int64)))
        assert loaded.num_channels == 1 and loaded.native_size == 3
        assert loaded.name == name and loaded.split == split
    assert len(load_dataset(name, tmp_path, "pretrain")) == 4  # pretrain = train
    assert load_dataset(name, tmp_path, "train").classes[0] == (
        "T-shirt/top" if name == "fashion-mnist" else "0"
    )


def test_idx_wrong_magic_and_truncation_are_clear_errors(tmp_path):
    _write_idx_set(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    images_bytes, labels_bytes = images.read_bytes(), labels.read_bytes()
    images.write_bytes(labels_bytes)  # swapped files
    with pytest.raises(ConfigError, match="0x00000801, expected 0x00000803.*IDX labels file"):
        load_dataset("mnist", tmp_path, "train")
    images.write_bytes(images_bytes[:-3])
    with pytest.raises(ConfigError, match="truncated"):
        load_dataset("mnist", tmp_path, "train")
    images.write_bytes(images_bytes)
    labels.write_bytes(b"\x00\x00\x08\x03" + labels_bytes[4:])
    with pytest.raises(ConfigError, match="expected 0x00000801"):
        load_dataset("mnist", tmp_path, "train")


def test_fashion_mnist_defaults_to_the_debian_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(imagearrays, "FASHION_MNIST_SYSTEM_ROOT", str(tmp_path / "system"))
    with pytest.raises(ConfigError) as error:
        load_dataset("fashion-mnist", None, "train")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert str(tmp_path / "system") in message
    arrays = _write_idx_set(tmp_path / "system", gz=True)
    loaded = load_dataset("fashion-mnist", None, "test")
    assert torch.equal(loaded.labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("mnist", None, "train")  # plain MNIST has no system folder


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# --------------------------------------------------------------------------------------------


def _write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _cifar_images(n):
    """(n, 3, 32, 32) random images, image 0 hand-made: three known pixels, the rest zero."""
    images = RNG.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    images[0] = 0
    return images


def _check_hand_made(image):
    # Rows of 'data' are the R, G and B planes, each row-major: index = c*1024 + y*32 + x.
    assert image[0, 0, 1] == 200 and image[1, 2, 0] == 100 and image[2, 31, 31] == 50
    assert int((image != 0).sum()) == 3


def _flat_with_hand_made(images):
    flat = images.reshape(len(images), 3072).copy()
    flat[0, 0 * 1024 + 0 * 32 + 1] = 200  # red at (y=0, x=1)
    flat[0, 1 * 1024 + 2 * 32 + 0] = 100  # green at (y=2, x=0)
    flat[0, 2 * 1024 + 31 * 32 + 31] = 50  # blue at (y=31, x=31)
    return flat


def _write_cifar10(folder):
    written = {}
    for index, file_name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        flat = _flat_with_hand_made(_cifar_images(2))
        labels = [int(v) for v in RNG.integers(0, 10, 2)]
        batch = {b"batch_label": b"batch", b"labels": labels, b"data": flat,
                 b"filenames": [b"a.png", b"b.png"]}  # fmt: skip
        # Protocol 2 (as the official Python 2 files) for some, the newest for the others.
        _write_pickle(folder / file_name, batch, protocol=2 if index % 2 else 5)
        written[file_name] = (flat, labels)
    names = [f"class{i}".encode() for i in range(10)]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, 2)
    return written


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_pickles_read_back_exactly(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = _write_cifar10(folder)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar10", tmp_path, "test")
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(train.images.reshape(10, 3072), torch.from_numpy(expected))
    expected_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels and train.labels.dtype == torch.int64
    _check_hand_made(train.images[0].numpy())
    _check_hand_made(test.images[0].numpy())
    assert test.labels.tolist() == written["test_batch"][1]
    assert train.classes == tuple(f"class{i}" for i in range(10))
    assert train.native_size == 32 and train.num_channels == 3


def test_cifar100_uses_fine_labels_and_meta(tmp_path):
    folder = tmp_path / "cifar-100-python"
    expected = {}
    for split in ("train", "test"):
        flat = _flat_with_hand_made(_cifar_images(3))
        fine = [int(v) for v in RNG.integers(0, 100, 3)]
        _write_pickle(folder / split, {b"data": flat, b"fine_labels": fine,
                                       b"coarse_labels": [0, 1, 2]})  # fmt: skip
        expected[split] = (flat, fine)
    names = [f"fine{i}".encode() for i in range(100)]
    _write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    for split in ("train", "test"):
        loaded = load_dataset("cifar100", tmp_path, split)
        assert torch.equal(loaded.images.reshape(3, 3072), torch.from_numpy(expected[split][0]))
        assert loaded.labels.tolist() == expected[split][1]
        _check_hand_made(loaded.images[0].numpy())
    assert loaded.classes[99] == "fine99" and loaded.num_classes == 100


def _python2_pickle(flat, labels, label_key):
    """The bytes Python 2's cPickle (protocol 2) writes for a CIFAR batch, opcode by opcode.

    As in the official archive: str keys and data (SHORT_BINSTRING / BINSTRING, which Python 3
    decodes as latin1 text) and numpy's old module name numpy.core.multiarray.
    """

    def text(value):
        return b"U" + bytes([len(value)]) + value

    n, width = flat.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85"
        + text(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), "b")
        + b"(K\x01" + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86"
        + b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + b"T" + struct.pack("<I", flat.size) + flat.tobytes() + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(label_key) + label_list + b"u."


def test_cifar_python2_pickle_as_in_the_official_archive(tmp_path):
    flat = _flat_with_hand_made(_cifar_images(2))
    raw = _python2_pickle(flat, [3, 7], b"labels")
    assert pickle.loads(raw, encoding="latin1")["labels"] == [3, 7]  # a valid pickle
    (tmp_path / "test_batch").write_bytes(raw)
    loaded = load_dataset("cifar10", tmp_path, "test")
    assert torch.equal(loaded.images.reshape(2, 3072), torch.from_numpy(flat))
    assert loaded.labels.tolist() == [3, 7] and loaded.classes[0] == "airplane"
    _check_hand_made(loaded.images[0].numpy())


class _OpenFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class _System:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


@pytest.mark.parametrize("payload", [_OpenFile, _System])
def test_malicious_cifar_pickle_is_refused(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    # The payload really works with plain pickle: the control file appears.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps({b"data": payload(control)}))
    assert control.exists()

    target = tmp_path / "pwned"
    _write_pickle(folder / "data_batch_1", {b"data": payload(target), b"labels": []}, protocol=2)
    with pytest.raises(ConfigError, match="refused global"):
        load_dataset("cifar10", tmp_path, "train")
    assert not target.exists()


def test_cifar_missing_files_and_download(tmp_path, monkeypatch):
    from torchvision.datasets import utils as torchvision_utils

    with pytest.raises(ConfigError, match="cifar.html"):
        load_dataset("cifar10", tmp_path, "train")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", offline)
    with pytest.raises(ConfigError) as error:
        load_dataset("cifar10", tmp_path, "train", download=True)
    assert str(tmp_path) in str(error.value) and "URLError" in str(error.value)

    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, filename, md5))
        _write_cifar10(tmp_path / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", fake_download)
    loaded = load_dataset("cifar10", tmp_path, "test", download=True)
    assert len(loaded) == 2 and calls[0][1] == "cifar-10-python.tar.gz" and calls[0][2]


# --------------------------------------------------------------------------------------------
# STL-10 binaries
# --------------------------------------------------------------------------------------------


def _write_stl10(folder, counts):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in counts.items():
        images = RNG.integers(0, 256, (count, 3, 96, 96)).astype(np.uint8)
        # The official files store each channel column-major: byte c*9216 + x*96 + y.
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        labels = RNG.integers(0, 10, count)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        written[split] = (images, labels)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return written


def test_stl10_binaries_read_back_exactly(tmp_path):
    written = _write_stl10(tmp_path / "stl10_binary", {"train": 3, "test": 2, "unlabeled": 4})
    for split in ("train", "test"):
        loaded = load_dataset("stl10", tmp_path, split)
        images, labels = written[split]
        assert loaded.images.shape == (len(images), 3, 96, 96)
        assert torch.equal(loaded.images, torch.from_numpy(images))
        assert loaded.labels.tolist() == labels.tolist()  # 1-based on disk, 0-based here
    unlabeled = load_dataset("stl10", tmp_path, "unlabeled")
    assert len(unlabeled) == 4 and unlabeled.labels is None
    pretrain = load_dataset("stl10", tmp_path, "pretrain")
    assert pretrain.split == "train+unlabeled" and pretrain.labels is None
    assert torch.equal(
        pretrain.images,
        torch.from_numpy(np.concatenate([written["train"][0], written["unlabeled"][0]])),
    )
    assert pretrain.classes[7] == "monkey" and pretrain.native_size == 96


def test_stl10_layout_by_hand(tmp_path):
    # One image, written byte by byte: red at (y=0, x=1) sits at byte 0*9216 + 1*96 + 0.
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[96] = 255
    raw[2 * 9216 + 5 * 96 + 2] = 7  # blue at (y=2, x=5)
    (tmp_path / "test_X.bin").write_bytes(raw.tobytes())
    (tmp_path / "test_y.bin").write_bytes(bytes([10]))
    loaded = load_dataset("stl10", tmp_path, "test")  # root is the stl10_binary folder itself
    assert loaded.images[0, 0, 0, 1] == 255 and loaded.images[0, 2, 2, 5] == 7
    assert int((loaded.images != 0).sum()) == 2 and loaded.labels.tolist() == [9]
    (tmp_path / "test_X.bin").write_bytes(raw.tobytes()[:-1])
    with pytest.raises(ConfigError, match="not a whole number"):
        load_dataset("stl10", tmp_path, "test")


# --------------------------------------------------------------------------------------------
# Image trees and file lists
# --------------------------------------------------------------------------------------------

H, W = 5, 7  # non-square, so a transposed read shows


def _solid(path, mode, colour, fmt=None, **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (W, H), colour).save(path, fmt, **save_args)


def _noisy_jpeg_bytes(size=64):
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_imagefolder_train_and_test(tmp_path):
    _solid(tmp_path / "train" / "cat" / "1.png", "RGB", (1, 1, 1))
    _solid(tmp_path / "train" / "cat" / "2.png", "RGB", (2, 2, 2))
    _solid(tmp_path / "train" / "dog" / "3.png", "RGB", (3, 3, 3))
    _solid(tmp_path / "test" / "dog" / "4.png", "RGB", (4, 4, 4))  # test lacks "cat"
    (tmp_path / "train" / "dog" / "readme.txt").write_text("not an image")
    train = load_dataset("imagefolder", tmp_path, "train")
    test = load_dataset("imagefolder", tmp_path, "test")
    assert isinstance(train, ImageFiles) and train.classes == ("cat", "dog")
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [1]
    assert [int(train.read(i)[0, 0, 0]) for i in range(3)] == [1, 2, 3]
    assert int(test.read(0)[0, 0, 0]) == 4
    assert train.native_size is None and train.num_channels == 3

    flat = tmp_path / "flat"
    _solid(flat / "a" / "x.png", "RGB", (9, 9, 9))
    assert load_dataset("imagefolder", flat, "pretrain").labels.tolist() == [0]
    with pytest.raises(ConfigError, match="no test split"):
        load_dataset("imagefolder", flat, "test")


def test_folder_formats_and_modes_become_rgb(tmp_path, recwarn):
    expected = {}  # relative path -> (colour, tolerance)

    def add(relative, mode, colour, want, tolerance=0, fmt=None, **save_args):
        _solid(tmp_path / relative, mode, colour, fmt, **save_args)
        expected[relative] = (want, tolerance)

    add("a.jpg", "RGB", (200, 30, 60), (200, 30, 60), tolerance=4, quality=95)
    add("sub/b.png", "RGB", (1, 2, 3), (1, 2, 3))
    add("sub/deeper/c.webp", "RGB", (40, 50, 60), (40, 50, 60), lossless=True)
    add("d.BMP", "RGB", (7, 8, 9), (7, 8, 9), fmt="BMP")
    add("e.tif", "RGB", (11, 12, 13), (11, 12, 13))
    add("e2.TIFF", "RGB", (14, 15, 16), (14, 15, 16), fmt="TIFF", compression="tiff_lzw")
    add("gray.png", "L", 77, (77, 77, 77))
    add("mono.png", "1", 1, (255, 255, 255))
    add("rgba.png", "RGBA", (250, 0, 0, 0), (250, 0, 0))  # alpha dropped, not composited
    add("cmyk.jpg", "CMYK", (0, 255, 255, 0), (255, 0, 0), tolerance=4, quality=95)
    palette = Image.new("P", (W, H), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    palette.save(tmp_path / "palette.png")
    expected["palette.png"] = ((10, 20, 30), 0)
    # 16-bit grayscale: 65535 -> 255, 32768 -> 128 (rounded), 257 * 10 -> 10, 0 -> 0.
    sixteen = np.zeros((H, W), dtype=np.uint16)
    sixteen[0, 0], sixteen[0, 1], sixteen[1, 0] = 65535, 32768, 2570
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    # Ignored silently: other extensions, hidden files and hidden folders (random bytes, so
    # they would count as bad if they were scanned).
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(RNG.bytes(100))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jpg").write_bytes(RNG.bytes(100))

    loaded = load_dataset("folder", tmp_path, "train")
    relative = [os.path.relpath(p, tmp_path) for p in loaded.paths]
    assert relative == sorted(relative) and set(relative) == set(expected) | {"sixteen.png"}
    assert loaded.skipped == 0 and loaded.labels is None and not _bad_warnings(recwarn)
    for index, name in enumerate(relative):
        image = loaded.read(index)
        assert image.dtype == torch.uint8 and image.shape == (3, H, W), name
        if name == "sixteen.png":
            assert image[:, 0, 0].tolist() == [255] * 3 and image[:, 0, 1].tolist() == [128] * 3
            assert image[:, 1, 0].tolist() == [10] * 3 and int(image[:, 1:, 1:].max()) == 0
            continue
        want, tolerance = expected[name]
        difference = (image.int() - torch.tensor(want).view(3, 1, 1)).abs().max()
        assert difference <= tolerance, (name, image[:, 0, 0].tolist(), want)
    with pytest.raises(ConfigError, match="no 'test' split"):
        load_dataset("folder", tmp_path, "test")


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    image = load_dataset("folder", tmp_path, "train").read(0)
    assert image.shape == (3, W, H)
    assert torch.nonzero(image[0]).tolist() == [[0, H - 1]]  # now at the top-right


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A real 20000x20000 1-bit PNG: 48 KB on disk, 1.2 GB as RGB (over Pillow's own limit)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    return path


def _bad_folder(folder, bomb_png):
    """Three good images and the bad kinds of RELIABILITY §6; returns the bad file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        _solid(folder / f"good{i}.png", "RGB", (i, i, i))
    jpeg = _noisy_jpeg_bytes()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "random.png": RNG.bytes(500),
        "text.jpg": b"this is a text file, not a JPEG\n" * 10,
        "bomb.png": bomb_png.read_bytes(),
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    if os.geteuid() != 0:  # root reads any file, so the permission case only exists for others
        _solid(folder / "unreadable.png", "RGB", (5, 5, 5))
        os.chmod(folder / "unreadable.png", 0)
        bad["unreadable.png"] = None
    return sorted(bad)


def test_loading_opens_no_image_and_a_read_names_what_is_wrong(tmp_path, bomb_png):
    bad = _bad_folder(tmp_path, bomb_png)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is checked at load time, so nothing warns
        loaded = load_dataset("folder", tmp_path, "train")
    assert len(loaded) == len(bad) + 3 and loaded.skipped == 0
    names = [os.path.basename(p) for p in loaded.paths]
    expected = {"empty.jpg": "empty file", "truncated.jpg": "truncated",
                "bomb.png": "decompression bomb", "text.jpg": "not an image",
                "random.png": "not an image", "unreadable.png": "permission denied"}
    for name in bad:
        with pytest.raises(BadImageError, match=expected[name]) as error:
            loaded.read(names.index(name))
        assert error.value.path == str(tmp_path / name)
    assert [int(loaded.read(names.index(f"good{i}.png"))[0, 0, 0]) for i in range(3)] == [0, 1, 2]


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, bomb_png):
    bad = _bad_folder(tmp_path, bomb_png)
    total = len(bad) + 3
    with pytest.warns(BadImageWarning) as record:
        loaded = load_dataset("folder", tmp_path, "train", max_bad_fraction=1.0, check="decode")
    assert len(loaded) == 3 and loaded.skipped == len(bad)
    assert [os.path.basename(p) for p in loaded.skipped_files] == bad
    messages = _bad_warnings(record)
    assert len(messages) == len(bad) == len(record)  # one each, and nothing from Pillow
    for name, message in zip(bad, messages):
        assert os.path.join(str(tmp_path), name) in message
    reasons = dict(zip(bad, messages))
    assert "empty file" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "not an image" in reasons["text.jpg"] and "not an image" in reasons["random.png"]
    if "unreadable.png" in reasons:
        assert "permission denied" in reasons["unreadable.png"]
    assert [int(loaded.read(i)[0, 0, 0]) for i in range(3)] == [0, 1, 2]

    summary = dataset_summary(loaded)
    assert summary["size"] == 3 and summary["skipped"] == len(bad) and summary["name"] == "folder"
    assert summary["skipped_files"] == list(loaded.skipped_files) and summary["num_classes"] == 0

    # The limit is inclusive: exactly at the fraction passes, just below it raises.
    with pytest.warns(BadImageWarning):
        load_dataset("folder", tmp_path, "train", max_bad_fraction=len(bad) / total, check="decode")
    with pytest.warns(BadImageWarning), pytest.raises(ConfigError) as error:
        load_dataset(
            "folder", tmp_path, "train", max_bad_fraction=len(bad) / total - 0.01, check="decode"
        )
    assert "data.max_bad_fraction" in str(error.value)
    assert f"{len(bad)} of {total}" in str(error.value)
    with pytest.warns(BadImageWarning), pytest.raises(ConfigError, match="data.max_bad_fraction"):
        load_dataset("folder", tmp_path, "train", check="decode")  # default 1%
    # The header check finds what a header shows (not truncation, which needs a decode).
    with pytest.warns(BadImageWarning):
        headers = load_dataset("folder", tmp_path, "train", max_bad_fraction=1.0, check="header")
    assert "truncated.jpg" not in [os.path.basename(p) for p in headers.skipped_files]
    assert {"empty.jpg", "text.jpg", "bomb.png"} <= {
        os.path.basename(p) for p in headers.skipped_files
    }


def test_permission_denied_is_a_bad_file(tmp_path, monkeypatch):
    # Runs as root too (root reads a chmod 000 file): the OS refusal is simulated at open().
    import builtins

    _solid(tmp_path / "good.png", "RGB", (1, 1, 1))
    _solid(tmp_path / "locked.png", "RGB", (2, 2, 2))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.warns(BadImageWarning, match="locked.png: permission denied"):
        loaded = load_dataset("folder", tmp_path, "train", max_bad_fraction=0.5, check="decode")
    assert loaded.skipped == 1 and len(loaded) == 1


def test_pixel_limit_is_a_keyword(tmp_path, recwarn):
    Image.new("1", (1500, 1500), 1).save(tmp_path / "big.png")  # a few KB on disk
    _solid(tmp_path / "small.png", "RGB", (1, 1, 1))
    kept = load_dataset("folder", tmp_path, "train", max_bad_fraction=0.5)
    assert kept.skipped == 0 and kept.read(0).shape == (3, 1500, 1500)
    assert int(kept.read(0).min()) == 255
    limited = load_dataset(
        "folder", tmp_path, "train", max_bad_fraction=0.5, max_image_pixels=1_000_000,
        check="header",
    )
    assert limited.skipped == 1 and limited.skipped_files[0].endswith("big.png")
    assert "decompression bomb: 1500x1500" in _bad_warnings(recwarn)[0]


def test_truncation_found_even_with_pillow_told_to_load_truncated_images(tmp_path, monkeypatch):
    jpeg = _noisy_jpeg_bytes()
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    _solid(tmp_path / "good.png", "RGB", (3, 3, 3))
    _solid(tmp_path / "good.tif", "RGB", (4, 4, 4))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    # With the flag Pillow itself accepts the truncated file: the check below can fail.
    Image.open(tmp_path / "truncated.jpg").load()
    with pytest.warns(BadImageWarning, match="truncated"):
        loaded = load_dataset("folder", tmp_path, "train", max_bad_fraction=0.5, check="decode")
    assert [os.path.basename(p) for p in loaded.skipped_files] == ["truncated.jpg"]
    assert len(loaded) == 3
    unchecked = load_dataset("folder", tmp_path, "train")  # found when read, all the same
    with pytest.raises(BadImageError, match="truncated"):
        unchecked.read([os.path.basename(p) for p in unchecked.paths].index("truncated.jpg"))


def test_filelist_with_labels_comments_and_missing_files(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        _solid(images / f"{i}.png", "RGB", (i * 10, 0, 0))
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# path label\n\n"
        "../images/2.png 5\n"
        f"   {images / '0.png'}\t3   \n"
        "# a comment\n"
        "../images/1.png 0\n"
        "../images/missing.png 1\n"
    )
    with pytest.warns(BadImageWarning, match="missing.png: no such file"):
        loaded = load_dataset("filelist", listing, "train", max_bad_fraction=0.25, check="decode")
    assert loaded.labels.tolist() == [5, 3, 0]  # list order, not sorted
    assert [int(loaded.read(i)[0, 0, 0]) for i in range(3)] == [20, 0, 10]
    assert loaded.num_classes == 6 and loaded.skipped == 1

    listing.write_text("../images/0.png\n../images/1.png\n")
    assert load_dataset("filelist", listing, "pretrain").labels is None
    listing.write_text("../images/0.png 1\n../images/1.png\n")
    with pytest.raises(ConfigError, match="mixes lines"):
        load_dataset("filelist", listing, "train")


def test_reads_decode_on_demand_and_a_file_broken_after_listing_is_named(tmp_path):
    for i in range(4):
        size = (10 + i, 6 + 2 * i)
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    loaded = load_dataset("folder", tmp_path, "train")
    for i in range(4):
        expected = np.array(Image.open(tmp_path / f"{i}.png").convert("RGB"))
        assert torch.equal(loaded.read(i), torch.from_numpy(expected).permute(2, 0, 1))
    (tmp_path / "2.png").write_bytes(b"")  # broken after the listing: a read says which
    with pytest.raises(BadImageError, match="2.png: empty file"):
        loaded.read(2)


def test_a_failed_read_is_retried_before_the_file_counts_as_bad(tmp_path, monkeypatch):
    _solid(tmp_path / "flaky.png", "RGB", (7, 7, 7))
    loaded = load_dataset("folder", tmp_path, "train")
    real_fetch, calls = ImageFiles.fetch, []

    def flaky(self, index):
        calls.append(index)
        if len(calls) < 3:  # a network filesystem's hiccup: two failures, then the data
            raise OSError(5, "Input/output error")
        return real_fetch(self, index)

    monkeypatch.setattr(ImageFiles, "fetch", flaky)
    assert int(loaded.read(0)[0, 0, 0]) == 7 and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(ImageFiles, "fetch", lambda self, i: calls.append(i) or b"")
    with pytest.raises(BadImageError, match="empty file"):
        loaded.read(0)
    assert len(calls) == 3  # three attempts, then bad


def test_check_does_not_depend_on_the_number_of_workers(tmp_path, monkeypatch, bomb_png):
    bad = _bad_folder(tmp_path, bomb_png)
    monkeypatch.setattr(imagefiles, "_PARALLEL_MIN_FILES", 0)  # use the pool even for a few files
    results = []
    for workers in (0, 2):
        with pytest.warns(BadImageWarning) as record:
            loaded = load_image_files(
                data.build_index("folder", tmp_path, "train"), max_bad_fraction=1.0,
                check="decode", num_workers=workers,
            )
        results.append((loaded, _bad_warnings(record)))
    (serial, serial_warnings), (parallel, parallel_warnings) = results
    assert serial.paths == parallel.paths and serial.skipped_files == parallel.skipped_files
    assert serial_warnings == parallel_warnings and len(serial_warnings) == len(bad)
    assert all(torch.equal(serial.read(i), parallel.read(i)) for i in range(len(serial)))


def test_summary_lists_the_first_twenty_skipped_files(tmp_path):
    _solid(tmp_path / "good.png", "RGB", (0, 0, 0))
    for i in range(25):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load_dataset("folder", tmp_path, "train", max_bad_fraction=1.0, check="decode")
    assert len(_bad_warnings(record)) == 25
    summary = dataset_summary(loaded)
    assert summary["skipped"] == 25 and summary["size"] == 1
    assert [os.path.basename(p) for p in summary["skipped_files"]] == [
        f"bad{i:02d}.jpg" for i in range(20)
    ]


def test_unknown_names_and_splits(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset"):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("cifar10", tmp_path, "unlabeled")
    with pytest.raises(ConfigError, match="no image files"):
        load_dataset("folder", tmp_path, "train")
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("cifar10", None, "train")
