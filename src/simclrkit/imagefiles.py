"""Image files of any size, read when they are needed: safe decoding, reduced-size JPEGs, retries.

:class:`ImageFiles` holds a folder, an ``imagefolder``, a file list or tar shards through their
:class:`~simclrkit.index.DataIndex`: a listing, so a dataset of millions of files is ready as
soon as it is listed. Images are decoded when they are read, never at load time, and each
read decodes only what it needs:

* :meth:`ImageFiles.read` decodes a whole image as (3, H, W) uint8 RGB;
* :meth:`ImageFiles.read_reduced` reads the header first, asks the caller which size it needs
  for the crops it will take, and decodes a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8,
  Pillow's ``draft`` over libjpeg-turbo's scaled IDCT) that still covers them. Pillow's
  decode alone, one thread of a 2-core EPYC (``benchmarks/data.py``): a ~500x375
  ImageNet-size JPEG 0.8 ms; a 12 MP photo 66 ms in full, 30 ms at 1/4 and 28 ms at 1/8 (the
  entropy decoding is never scaled, so a reduction never saves more than about half); with
  the colour conversion and crops that follow, 12 MP photos train at 4x the images/s of a
  full decode.

Bad files (RELIABILITY.md §6, §12): zero-byte, truncated, random bytes, decompression bombs,
unreadable files and files that vanished raise :class:`BadImageError`, whose ``reason`` says
which; a read is retried twice after short sleeps first (a file being replaced, a network
filesystem's hiccup). What to do with a bad file during training is the stream's decision
(``filebatches.py``: a deterministic replacement, counted in ``badfiles.py``). A check of every
file at load time stays available for small folders (``check="header"`` or ``"decode"``):
then bad files are left out before training, with one :class:`BadImageWarning` each.

Colour conversion (:func:`to_rgb_array`): grayscale and palette images are expanded to RGB;
alpha (RGBA, LA, PA) is dropped, not composited, as torchvision's ``pil_loader`` does; CMYK uses
Pillow's conversion; 16-bit images are scaled to 8 bits with rounding (65535 -> 255); the EXIF
orientation is applied.

:func:`simclrkit.data.load_dataset` reaches this module for the ``imagefolder``, ``folder``,
``filelist`` and ``shards`` datasets.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from simclrkit.config import ConfigError
from simclrkit.index import IMAGE_EXTENSIONS, DataIndex

_LOG = logging.getLogger(__name__)

__all__ = [
    "CHECKS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImageWarning",
    "ImageFiles",
    "decode_bytes",
    "decode_file",
    "load_image_files",
    "to_chw",
    "to_rgb_array",
]

# Pillow's own default limit (about 0.25 GiB as 32-bit pixels). Pillow's global
# Image.MAX_IMAGE_PIXELS still applies on top: it refuses images over twice its value.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
CHECKS = ("none", "header", "decode")
# Sleeps before the second and third attempt of a read that failed.
_RETRY_DELAYS = (0.05, 0.2)
# Below this many files a process pool costs more to start than it saves.
_PARALLEL_MIN_FILES = 2000
_JPEG_REDUCTIONS = (8, 4, 2, 1)
_OPEN_SHARDS = 64  # tar files a process keeps open at once


class BadImageWarning(UserWarning):
    """A file with an image extension that could not be decoded and was left out."""


class BadImageError(OSError):
    """An image that cannot be read or decoded; ``reason`` says why, ``path`` which one."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


class ImageFiles:
    """Images of any size behind a :class:`~simclrkit.index.DataIndex`, always read as RGB.

    Attributes:
        index: the listing (paths, labels, and for shards the byte range of each image).
        labels: (N,) int64 tensor, or None for unlabelled data.
        classes: class names, index-aligned with label values.
        skipped: files left out at load time by a check (0 without one).
        skipped_files: their paths, in listing order.
        name: the dataset's name; split: the split that was loaded.
        max_image_pixels: larger images are decompression bombs.
        reduced_decode: whether :meth:`read_reduced` may decode JPEGs at a reduced scale.
    """

    num_channels = 3
    native_size = None  # sizes vary: the caller picks the training resolution

    def __init__(
        self,
        index: DataIndex,
        *,
        skipped: int = 0,
        skipped_files: Sequence[str] = (),
        name: str = "",
        split: str = "",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        reduced_decode: bool = True,
    ) -> None:
        self.index = index
        self.labels = None if index.labels is None else torch.from_numpy(index.labels)
        self.classes = tuple(index.classes)
        self.skipped = skipped
        self.skipped_files = tuple(skipped_files)
        self.name = name or index.dataset
        self.split = split or index.split
        self.max_image_pixels = max_image_pixels
        self.reduced_decode = reduced_decode
        self._shards = _ShardHandles()

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (
            f"ImageFiles({self.name or 'files'}/{self.split or '?'}: {len(self)} images, "
            f"{self.skipped} skipped)"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles stay with their process (DataLoader workers under spawn).
        return {**self.__dict__, "_shards": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shards = _ShardHandles()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every image's path (N strings: meant for small sets and messages)."""
        return tuple(self.index.path(i) for i in range(len(self)))

    def path(self, index: int) -> str:
        """Image ``index``'s file, or for shards its name under the shard folder."""
        return self.index.path(index)

    def fetch(self, index: int) -> bytes:
        """The encoded bytes of image ``index`` (one read; no retry, no decode)."""
        if not self.index.is_shards:
            with open(self.index.path(index), "rb") as handle:
                return handle.read()
        size = int(self.index.size[index])
        data = self._shards.pread(self.index.shard_path(index), size, int(self.index.start[index]))
        if len(data) != size:
            raise _BadImage(f"truncated: {len(data)} of {size} bytes in its shard")
        return data

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as (3, H, W) uint8, decoded in full.

        Raises:
            BadImageError: the image does not decode, after retries.
        """
        return self.read_reduced(index, None)[0]

    def read_reduced(
        self, index: int, reduction_for: Callable[[int, int], int] | None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image ``index`` decoded at the scale the caller asks for.

        Args:
            index: which image.
            reduction_for: called with the full (height, width), EXIF orientation applied,
                before anything is decoded; returns the largest reduction the caller can use
                (1, 2, 4 or 8). JPEGs are decoded at that scale (``reduced_decode``); other
                formats in full. None: full size.

        Returns:
            (pixels (3, h, w) uint8, (height, width) of the full image). ``h / height`` and
            ``w / width`` are the scale actually decoded (exactly 1 when in full).

        Raises:
            BadImageError: the image does not decode, after retries.
        """
        chooser = reduction_for if self.reduced_decode else None
        for delay in (*_RETRY_DELAYS, None):
            try:
                pixels, full = _decode(self.fetch(index), self.max_image_pixels, chooser)
                return to_chw(pixels), full
            except Exception as error:  # the guard: a bad file is a reason, not a crash
                if delay is None:
                    raise BadImageError(self.path(index), _reason(error)) from None
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


class _ShardHandles:
    """Open tar shards of this process, least recently used closed first; reads by offset.

    ``os.pread`` has no file position, so threads share a handle safely. A forked child
    (a DataLoader worker) opens its own handles: its inherited ones belong to the parent.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def pread(self, path: str, size: int, offset: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid():
                self._handles, self._pid = OrderedDict(), os.getpid()
            fd = self._handles.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if len(self._handles) >= _OPEN_SHARDS:
                    os.close(self._handles.popitem(last=False)[1])
            self._handles[path] = fd
        return os.pread(fd, size, offset)

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._handles.values():
                with contextlib.suppress(OSError):
                    os.close(fd)


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
    if isinstance(error, OSError) and "truncated" in str(error).lower():
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


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) once the EXIF orientation is applied, read from a JPEG's header."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _decode(
    data: bytes, max_image_pixels: int, reduction_for: Callable[[int, int], int] | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes encoded bytes to (h, w, 3) uint8, a JPEG at the scale ``reduction_for``
    allows, and the full (height, width); see :meth:`ImageFiles.read_reduced`."""
    if not data:
        raise _BadImage("empty file (0 bytes)")
    stream = _EndOfDataProbe(data)
    with Image.open(stream) as image:
        _check_pixels(image, max_image_pixels)
        full = None
        if reduction_for is not None and image.format == "JPEG":
            # A JPEG's EXIF block sits in its header: the oriented size is known before any
            # pixel is decoded. (Other formats decode in full, and their size is read after.)
            full = _oriented_size(image)
            wanted = int(reduction_for(*full))
            reduction = next(r for r in _JPEG_REDUCTIONS if r <= max(wanted, 1))
            if reduction > 1:
                width, height = image.size
                image.draft(image.mode, (width // reduction, height // reduction))
        stream.read_past_end = False
        image.load()
        if stream.read_past_end:
            raise _BadImage("truncated: the image data ends before the picture does")
        pixels = to_rgb_array(image)
    return pixels, full or pixels.shape[:2]


def decode_bytes(
    data: bytes,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reduction_for: Callable[[int, int], int] | None = None,
    name: str = "",
) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> ((h, w, 3) uint8 RGB, full (height, width)), once, no retry.

    ``reduction_for`` as in :meth:`ImageFiles.read_reduced`.

    Raises:
        BadImageError: the bytes do not decode (``name`` is used in the message).
    """
    try:
        return _decode(data, max_image_pixels, reduction_for)
    except Exception as error:  # the guard: a bad file is a reason, not a crash
        raise BadImageError(name, _reason(error)) from None


def _probe_file(path: str, *, max_image_pixels: int) -> str | None:
    """Reads only the header: None, or the reason the file is bad."""
    try:
        if os.path.getsize(path) == 0:
            raise _BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns about bombs and odd metadata; the verdict here is the only report.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                _check_pixels(image, max_image_pixels)
        return None
    except Exception as error:  # the guard: any failure of a bad file is a reason, not a crash
        return _reason(error)


def decode_file(
    path: str, *, max_image_pixels: int, keep_pixels: bool = True, silence_pillow: bool = False
) -> tuple[np.ndarray | None, str | None]:
    """Decodes a whole file: (pixels (H, W, 3) uint8 or None if not kept, None) or (None, reason).

    ``Image.open`` only reads the header, so the decode (``load``) and the colour conversion
    happen inside the guard too. ``silence_pillow`` hides Pillow's own warnings so that a scan
    gives one warning per bad file; it edits the process-wide warning filters, which is safe in
    a scan's worker processes but not in threads that read images at the same time.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with warnings.catch_warnings() if silence_pillow else contextlib.nullcontext():
            if silence_pillow:
                warnings.simplefilter("ignore")
            pixels, _ = _decode(data, max_image_pixels, None)
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


def _check_reason(path: str, *, mode: str, max_image_pixels: int) -> str | None:
    if mode == "header":
        return _probe_file(path, max_image_pixels=max_image_pixels)
    return decode_file(
        path, max_image_pixels=max_image_pixels, keep_pixels=False, silence_pillow=True
    )[1]


def load_image_files(
    index: DataIndex,
    *,
    name: str = "",
    split: str = "",
    check: str = "none",
    max_bad_fraction: float = 0.01,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reduced_decode: bool = True,
    num_workers: int | None = None,
    quiet: bool = False,
) -> ImageFiles:
    """An :class:`ImageFiles` over ``index``, optionally checking every file first.

    Args:
        index: the listing.
        name, split: recorded on the result for the run summary.
        check: "none" (the default: bad files are found when read), "header" (open every
            file's header: empty, unknown-format and oversized files) or "decode" (decode
            every file: truncation too). A check leaves the bad files out, with one
            :class:`BadImageWarning` each in listing order, and refuses the set above
            ``max_bad_fraction``. It costs a header read (~0.1 ms) or a decode (~1.5 ms at
            ImageNet size) per file: for small folders, not for millions of files.
        max_bad_fraction: with a check, above this fraction of bad files raise instead.
        max_image_pixels: larger images count as decompression bombs.
        reduced_decode: allow reduced-scale JPEG decoding in :meth:`ImageFiles.read_reduced`.
        num_workers: checking processes for more than 2,000 files (None: min(8, CPUs)); the
            result does not depend on it.
        quiet: no informational log line.

    Raises:
        ConfigError: an unknown check, or too many bad files (names ``data.max_bad_fraction``).
    """
    if check not in CHECKS:
        raise ConfigError(f"data.check_files: got '{check}'; allowed: {', '.join(CHECKS)}")
    started = time.perf_counter()
    skipped: list[str] = []
    if check != "none":
        if index.is_shards:
            raise ConfigError("data.check_files: shards are checked when they are packed; "
                              "use data.check_files=none with data.dataset=shards")
        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        paths = [index.path(i) for i in range(len(index))]
        function = partial(_check_reason, mode=check, max_image_pixels=max_image_pixels)
        reasons = _map_in_order(function, paths, workers)
        bad = [i for i, reason in enumerate(reasons) if reason is not None]
        for i in bad:
            warnings.warn(f"skipping image {paths[i]}: {reasons[i]}", BadImageWarning, stacklevel=2)
        if len(bad) / len(paths) > max_bad_fraction:
            listing = "; ".join(f"{paths[i]}: {reasons[i]}" for i in bad[:5])
            raise ConfigError(
                f"data.max_bad_fraction: {len(bad)} of {len(paths)} image files "
                f"({len(bad) / len(paths):.2%}) could not be decoded, more than the allowed "
                f"{max_bad_fraction:.2%} ({listing}{'; ...' if len(bad) > 5 else ''}); fix or "
                "remove them, or raise data.max_bad_fraction to skip them"
            )
        if bad:
            bad_set = set(bad)
            index = index.select([i for i in range(len(paths)) if i not in bad_set])
            skipped = [paths[i] for i in bad]
    result = ImageFiles(
        index, skipped=len(skipped), skipped_files=skipped, name=name, split=split,
        max_image_pixels=max_image_pixels, reduced_decode=reduced_decode,
    )
    if not quiet:
        _LOG.info(
            "%s/%s: %d images, %d skipped, %.1f s", result.name, result.split, len(result),
            len(skipped), time.perf_counter() - started,
        )
    return result
