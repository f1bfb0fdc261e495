"""The data index: listings of real folders, files on disk, fingerprints and differences."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from simclrkit.cli import main
from simclrkit.config import ConfigError
from simclrkit.data import BadImageError, load_dataset
from simclrkit.index import build_index, index_from_names, list_image_files, load_index

from conftest import write_jpeg_tree


def _touch(path: Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_listing_matches_a_sorted_walk_and_skips_hidden_and_other_files(tmp_path):
    for relative in ["b.jpg", "a/2.PNG", "a/10.webp", "a/b/c/deep.tiff", "z.bmp", "m/x.jpeg"]:
        _touch(tmp_path / relative)
    for relative in ["notes.txt", ".hidden.jpg", ".cache/x.jpg", "a/.git/y.png", "m/README"]:
        _touch(tmp_path / relative)
    for i in range(30):  # many sub-folders: listed in parallel threads, same result
        _touch(tmp_path / f"many/{i:02d}" / f"{i}.jpg")
    expected = []
    for directory, folders, files in os.walk(tmp_path):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(
                (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
            ):
                expected.append(os.path.join(directory, name))
    listed = [os.path.join(tmp_path, name) for name in list_image_files(tmp_path)]
    assert listed == sorted(expected) and len(listed) == 36
    index = build_index("folder", tmp_path, "train")
    assert [index.path(i) for i in range(len(index))] == listed and index.labels is None


def test_imagefolder_labels_and_test_split(tmp_path):
    write_jpeg_tree(tmp_path, classes=3, per_class=2, test_per_class=1)
    train = build_index("imagefolder", tmp_path, "train")
    test = build_index("imagefolder", tmp_path, "test")
    assert train.classes == ("class0", "class1", "class2") == test.classes
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 1, 2]
    assert train.name(0) == "train/class0/000.jpg" and test.name(2) == "test/class2/000.jpg"


def test_a_file_name_that_is_not_utf8_round_trips(tmp_path):
    write_jpeg_tree(tmp_path, classes=1, per_class=1)
    source = next((tmp_path / "train" / "class0").iterdir())
    odd = os.fsencode(source.parent) + b"/caf\xe9.jpg"  # Latin-1: not valid UTF-8
    os.rename(source, odd)
    index = build_index("folder", tmp_path, "train")
    saved = load_index(index.save(tmp_path / "index.npz"))
    assert os.fsencode(saved.path(0)) == odd and saved.fingerprint == index.fingerprint
    images = load_dataset("folder", tmp_path, "train", index=saved)
    assert images.read(0).shape[0] == 3


def test_save_and_load_keep_everything_and_the_fingerprint(tmp_path):
    write_jpeg_tree(tmp_path, classes=2, per_class=3)
    index = build_index("imagefolder", tmp_path, "train")
    loaded = load_index(index.save(tmp_path / "out" / "index.npz"))
    assert loaded.all_names() == index.all_names() and loaded.classes == index.classes
    assert np.array_equal(loaded.labels, index.labels) and loaded.root == index.root
    assert loaded.fingerprint == index.fingerprint
    assert not list((tmp_path / "out").glob(".tmp-*"))  # written atomically, no debris

    names, labels = index.all_names(), index.labels.tolist()
    moved = index_from_names("imagefolder", "train", "/elsewhere", names, labels, index.classes)
    assert moved.fingerprint == index.fingerprint  # the root is not part of the data
    relabelled = index_from_names("imagefolder", "train", tmp_path, names, labels[::-1],
                                  index.classes)  # fmt: skip
    renamed = index_from_names("imagefolder", "train", tmp_path, names[:-1] + ["x.jpg"], labels,
                               index.classes)  # fmt: skip
    assert len({index.fingerprint, relabelled.fingerprint, renamed.fingerprint}) == 3
    assert "the labels changed" in relabelled.difference(index)
    change = renamed.difference(index)
    assert "1 file added (x.jpg)" in change and "1 file removed (train/class1/002.jpg)" in change


def test_damaged_or_foreign_index_files_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; build one with: simclrkit index"):
        load_index(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="is not a readable simclrkit index"):
        load_index(tmp_path / "garbage.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ConfigError, match="is not a readable simclrkit index"):
        load_index(tmp_path / "other.npz")


def test_loading_a_folder_of_many_files_opens_none_of_them(tmp_path, monkeypatch):
    # 3,000 files of random bytes: a decode at load time would find every one bad; a listing
    # accepts them all without opening one, and each is found bad only when read.
    from PIL import Image

    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(3000):
        _touch(folder / f"{i // 100:02d}" / f"{i:04d}.jpg", rng.bytes(64))
    real_open, opened = Image.open, []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    images = load_dataset("folder", folder, "train")
    assert len(images) == 3000 and images.skipped == 0 and opened == []
    with pytest.raises(BadImageError, match="not an image"):
        images.read(1234)
    assert len(opened) == 3  # the read (and its two retries) opened the one file it needed


def test_filelist_labels_are_bounded_and_relative_to_the_list(tmp_path):
    write_jpeg_tree(tmp_path / "img", classes=1, per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text("img/train/class0/000.jpg 3\nimg/train/class0/001.jpg 0\n")
    index = build_index("filelist", listing, "train")
    assert index.labels.tolist() == [3, 0] and index.classes == ("0", "1", "2", "3")
    assert index.path(0) == str(tmp_path / "img/train/class0/000.jpg")
    listing.write_text("img/train/class0/000.jpg 99999999999\n")
    with pytest.raises(ConfigError, match="label 99999999999 outside"):
        build_index("filelist", listing, "train")
    listing.write_bytes(b"caf\xe9.jpg\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        build_index("filelist", listing, "train")


def test_index_command_writes_an_index_that_pretraining_accepts(tmp_path, capsys):
    write_jpeg_tree(tmp_path / "data", classes=2, per_class=4)
    out = tmp_path / "train.npz"
    assert main(["index", str(tmp_path / "data"), "--dataset", "imagefolder", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "indexed 8 images, 2 classes" in printed and f"data.index={out}" in printed
    assert len(load_index(out)) == 8
    assert main(["index", str(tmp_path / "data"), "--out", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
