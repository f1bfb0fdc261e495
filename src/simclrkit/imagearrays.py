"""Fixed-size images in memory: :class:`ImageArray` and the datasets' official binary files.

:class:`ImageArray` holds the fixed-size datasets (MNIST-5k, MNIST, Fashion-MNIST, CIFAR-10/100,
STL-10): ``images`` of shape (N, C, H, W) uint8, decoded once. This module reads the standard
files into it: the IDX files of MNIST and Fashion-MNIST, the CIFAR-10/100 python pickles
(through an unpickler that runs no code) and the STL-10 binaries. The embedded MNIST-5k is
read in ``data.py``; :func:`simclrkit.data.load_dataset` is the usual way in.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrkit.config import ConfigError

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


# --------------------------------------------------------------------------------------------
# Container
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
