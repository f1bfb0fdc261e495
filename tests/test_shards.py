"""Tar shards: pack writes them from real folders, the index reads them by sample, WebDataset
reads them as its own."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from simclrkit.cli import main
from simclrkit.config import ConfigError
from simclrkit.data import BadImageError, load_dataset
from simclrkit.pack import pack
from simclrkit.shards import index_shards, scan_shards

from conftest import write_jpeg_tree


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """An imagefolder (train 2 x 9, test 2 x 2) with a few odd files, packed at 40 px."""
    root = tmp_path_factory.mktemp("source")
    write_jpeg_tree(root, classes=2, per_class=9, test_per_class=2, size=(64, 48))
    small = root / "train" / "class0" / "small.jpg"  # fits 40 px: copied byte for byte
    Image.new("RGB", (30, 20), (10, 200, 30)).save(small, quality=80)
    png = root / "train" / "class1" / "alpha.png"  # RGBA PNG: decoded, re-encoded as JPEG
    Image.new("RGBA", (80, 60), (250, 0, 0, 10)).save(png)
    (root / "train" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    out = tmp_path_factory.mktemp("shards")
    report = pack("imagefolder", root, out, max_side=40, samples_per_shard=7, workers=2,
                  quiet=True)  # fmt: skip
    return root, out, report


def test_pack_writes_every_readable_image_in_listing_order_and_lists_the_rest(packed):
    root, out, report = packed
    assert report["train"]["samples"] == 20 and report["train"]["skipped"] == 1
    assert report["test"] == {**report["test"], "samples": 4, "skipped": 0, "shards": 1}
    assert sorted(p.name for p in out.glob("train-*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"
    ]  # 7 + 7 + 6
    assert "broken.jpg" in (out / "train.skipped.txt").read_text()
    assert not list(out.glob(".tmp-*"))
    train = load_dataset("shards", out, "train")
    source = load_dataset("imagefolder", root, "train")
    expected = [n for n in source.index.all_names() if not n.endswith("broken.jpg")]
    assert train.index.all_names() == expected and train.classes == ("class0", "class1")
    labels = [int(source.labels[source.index.all_names().index(n)]) for n in expected]
    assert train.labels.tolist() == labels
    for i in range(len(train)):
        image = train.read(i)
        assert max(image.shape[1:]) <= 40
    small = expected.index("train/class0/small.jpg")
    assert train.fetch(small) == (root / "train/class0/small.jpg").read_bytes()
    alpha = train.read(expected.index("train/class1/alpha.png"))
    assert alpha.shape == (3, 30, 40) and abs(int(alpha[0].float().mean()) - 250) <= 3


def test_shards_hold_what_webdataset_reads_as_its_own_samples(packed):
    import webdataset

    _, out, _ = packed
    index = index_shards(out, "train")
    urls = [str(out / name) for name in index.shard_files]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert len(samples) == len(index) == 20
    for i, sample in enumerate(samples):
        assert sample["__key__"] == f"{i:09d}"
        assert int(sample["cls"]) == int(index.labels[i])
        shard, start, size = int(index.shard[i]), int(index.start[i]), int(index.size[i])
        with open(out / index.shard_files[shard], "rb") as handle:
            handle.seek(start)
            assert handle.read(size) == sample["jpg"]


def test_a_scan_of_the_tar_headers_gives_the_same_index_as_pack(packed, tmp_path):
    _, out, _ = packed
    written = index_shards(out, "train")
    scanned = scan_shards(out, "train")
    assert scanned.fingerprint == written.fingerprint and scanned.classes == written.classes
    assert scanned.name(0) == "000000000.jpg"  # a scan knows member names only
    # A shard rewritten after pack: its index no longer matches and the shards are scanned.
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with tarfile.open(copy / "train-000002.tar", "a") as tar:
        data = io.BytesIO()
        Image.new("RGB", (8, 8)).save(data, "JPEG")
        info = tarfile.TarInfo("000000099.jpg")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
        label = tarfile.TarInfo("000000099.cls")
        label.size = 1
        tar.addfile(label, io.BytesIO(b"1"))
    rescanned = index_shards(copy, "train")
    assert len(rescanned) == 21 and rescanned.fingerprint != written.fingerprint


def test_user_shards_without_split_prefix_or_labels(tmp_path):
    with tarfile.open(tmp_path / "part-a.tar", "w") as tar:
        for i in range(3):
            data = io.BytesIO()
            Image.new("RGB", (12, 10), (i * 50, 0, 0)).save(data, "PNG")
            info = tarfile.TarInfo(f"dir/sample{i}.png")
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
        note = tarfile.TarInfo("dir/readme.txt")  # not an image sample: ignored
        note.size = 2
        tar.addfile(note, io.BytesIO(b"hi"))
    images = load_dataset("shards", tmp_path, "train")
    assert len(images) == 3 and images.labels is None
    assert [int(images.read(i)[0, 0, 0]) for i in range(3)] == [0, 50, 100]
    with pytest.raises(ConfigError, match="no test shards"):
        load_dataset("shards", tmp_path, "test")
    (tmp_path / "part-a.tar").rename(tmp_path / "part-a.tar.gz")
    with pytest.raises(ConfigError, match="compressed shards"):
        load_dataset("shards", tmp_path, "train")


def test_a_truncated_shard_makes_its_samples_bad_not_the_run(packed, tmp_path):
    _, out, _ = packed
    for path in out.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    images = load_dataset("shards", tmp_path, "train")
    last = tmp_path / "train-000002.tar"
    last.write_bytes(last.read_bytes()[:2048])  # after the index was built
    assert images.read(0).shape[0] == 3
    with pytest.raises(BadImageError, match="truncated"):
        images.read(len(images) - 1)


def test_pack_refuses_to_write_over_existing_shards(packed, capsys):
    root, out, _ = packed
    assert main(["pack", str(root), "--out", str(out), "--dataset", "imagefolder"]) == 2
    assert "already holds train shards" in capsys.readouterr().err


def test_pack_command_and_training_on_its_shards_read_the_same_pixels(tmp_path, capsys):
    write_jpeg_tree(tmp_path / "photos", classes=1, per_class=5, size=(30, 20))
    assert main(["pack", str(tmp_path / "photos"), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert "packed train: 5 images into 1 shard " in capsys.readouterr().out
    folder = load_dataset("folder", tmp_path / "photos", "train")
    shards = load_dataset("shards", tmp_path / "s", "train")
    for i in range(5):  # small JPEGs are stored as they were: the very same pixels
        assert torch.equal(folder.read(i), shards.read(i))
    assert np.array_equal(shards.index.size, [p.stat().st_size for p in
                                              sorted((tmp_path / "photos").rglob("*.jpg"))])
