"""Folders and file lists of images of any size: which files, and decoding them safely.

:class:`ImageFiles` holds folders and file lists of images of any size. Every file is decoded
once when the dataset is loaded, so bad files are found before training starts; the decoded
(3, H, W) uint8 tensors are kept in memory when they fit under ``cache_limit_bytes``, else
:meth:`ImageFiles.read` decodes again on demand. Folder contents are sorted (file lists keep
their order) and every result is the same whatever the number of decoding processes.

Bad files (RELIABILITY.md §6): zero-byte, truncated, random bytes, decompression bombs,
unreadable and non-image files with an image extension are left out with one
:class:`BadImageWarning` each and counted exactly (``skipped``, ``skipped_files``); above
``max_bad_fraction`` of the files the load fails with a :class:`ConfigError` instead.

:func:`simclrkit.data.load_dataset` reaches this module for the ``imagefolder``, ``folder``
and ``filelist`` datasets.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from simclrkit.config import ConfigError

_LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Pillow's own default limit (about 0.25 GiB as 32-bit pixels). Pillow's global
# Image.MAX_IMAGE_PIXELS still applies on top: it refuses images over twice its value.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3
# Below this many files a process pool costs more to start than it saves.
_PARALLEL_MIN_FILES = 2000


class BadImageWarning(UserWarning):
    """A file with an image extension that could not be decoded and was left out."""


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


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
