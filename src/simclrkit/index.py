"""The data index: which images a run trains on, listed once, read by every process.

A :class:`DataIndex` is a listing, not a decode: the files of a folder (sorted), of an
``imagefolder`` with its labels, of a file list, or the samples of tar shards with the byte
range of each image inside its shard. Nothing in it comes from opening an image, so building
it costs what listing the folder costs, and bad files are found later, when they are read
(``imagefiles.py``, ``badfiles.py``).

A run writes its index once into the run folder (``rundata.py``); every other process, every
resume and every torchrun restart reads that file, so all of them train on exactly the same
list, and the checkpoint records its :attr:`DataIndex.fingerprint` so that a resume on data
that changed is refused rather than silently reshuffled (RELIABILITY.md §14).

Cost. Listing uses ``os.scandir`` in threads over the top-level folders (what helps on network
filesystems, where each directory read is a round trip): 100,000 files in 100 folders list in
0.2 s on a local disk with a warm cache (2-core EPYC), so ImageNet's 1.28M in a few seconds. In
memory the paths are one blob of their bytes plus an int64 offset each (and int64 labels): no
Python object per file, so DataLoader workers forked from the process share the pages instead
of copying them as reference counts change (the usual growth of a list of path strings under
fork). ``benchmarks/data.py`` measures the whole start-up: +184 bytes of peak memory per file
from 1,000 to 100,000 files. On disk a compressed ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from simclrkit.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FILE_DATASETS = ("imagefolder", "folder", "filelist", "shards")
INDEX_FORMAT = 1
_LISTING_THREADS = 8


@dataclass(frozen=True, eq=False)
class DataIndex:
    """An ordered list of images: names, optional labels, and where shard samples lie.

    Attributes:
        dataset: ``folder``, ``imagefolder``, ``filelist`` or ``shards``.
        split: the split it lists ("train", "test").
        root: the folder the names are relative to (for file lists, the list's folder; a name
            may also be absolute). Not part of the fingerprint: a dataset moved to another
            mount is the same dataset.
        names: uint8 blob of the names (``os.fsencode``: any file name round-trips).
        offsets: (N + 1,) int64; name ``i`` is ``names[offsets[i]:offsets[i + 1]]``.
        labels: (N,) int64 class indices, or None for unlabelled images.
        classes: class names, index-aligned with label values.
        shard_files: for ``shards``, the tar files (relative to ``root``).
        shard, start, size: for ``shards``, (N,) arrays: which shard holds image ``i``, the
            byte offset of its data in that shard and its length.
    """

    dataset: str
    split: str
    root: str
    names: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    shard_files: tuple[str, ...] = ()
    shard: np.ndarray | None = None
    start: np.ndarray | None = None
    size: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def is_shards(self) -> bool:
        return self.dataset == "shards"

    def name(self, index: int) -> str:
        """Name ``index`` as stored: a path relative to ``root``, or ``shard/key`` for shards."""
        return os.fsdecode(self.names[self.offsets[index] : self.offsets[index + 1]].tobytes())

    def path(self, index: int) -> str:
        """The file of image ``index``; for shards ``SHARD.tar/NAME``, to name it in messages."""
        if self.is_shards:
            return os.path.join(self.shard_path(index), self.name(index))
        return os.path.join(self.root, self.name(index))

    def shard_path(self, index: int) -> str:
        return os.path.join(self.root, self.shard_files[int(self.shard[index])])

    def all_names(self) -> list[str]:
        """Every name, in order (builds N strings: for messages and small sets)."""
        return [self.name(i) for i in range(len(self))]

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over everything that defines the list: the names in order (for shards the
        shard files and byte ranges instead: a shard's member names are the same whether its
        index came from ``pack`` or a scan), the labels and the class names; not the root."""
        digest = hashlib.sha256()
        digest.update(json.dumps([INDEX_FORMAT, self.is_shards, list(self.classes)]).encode())
        names = (None, None) if self.is_shards else (self.names, self.offsets)
        for array in (*names, self.labels, self.shard, self.start, self.size):
            digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
            digest.update(b"|")
        digest.update(json.dumps(list(self.shard_files)).encode())
        return digest.hexdigest()

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores about the data: the count and the fingerprint."""
        return {"num_examples": len(self), "fingerprint": self.fingerprint}

    def select(self, keep: Sequence[int] | np.ndarray) -> DataIndex:
        """The sub-index of the entries ``keep`` (in that order)."""
        keep = np.asarray(keep, dtype=np.int64)
        names = [self.names[self.offsets[i] : self.offsets[i + 1]] for i in keep]
        blob, offsets = _pack_bytes(names)

        def pick(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[keep]

        return replace(
            self, names=blob, offsets=offsets, labels=pick(self.labels), shard=pick(self.shard),
            start=pick(self.start), size=pick(self.size),
        )

    def difference(self, other: DataIndex, limit: int = 3) -> str:
        """What changed from ``other`` (the recorded list) to this one, in words."""
        old, new = other.all_names(), self.all_names()
        old_set, new_set = set(old), set(new)
        added = [n for n in new if n not in old_set]
        removed = [n for n in old if n not in new_set]
        parts = []
        for names, what in ((added, "added"), (removed, "removed")):
            if names:
                examples = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
                parts.append(f"{len(names)} {'file' if len(names) == 1 else 'files'} {what} "
                             f"({examples})")
        if not parts:
            if old != new:
                parts.append("the same files in another order")
            elif (self.labels is None) != (other.labels is None) or (
                self.labels is not None and not np.array_equal(self.labels, other.labels)
            ):
                parts.append("the labels changed")
            elif self.classes != other.classes:
                parts.append("the class names changed")
            else:
                parts.append("the shard layout (byte ranges) changed")
        return f"{len(other)} -> {len(self)} images: " + "; ".join(parts)

    # ----------------------------------------------------------------------------------------
    # Files
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the index as a compressed ``.npz`` atomically (no pickled objects)."""
        from simclrkit.checkpoint import atomic_write

        meta = {
            "format": INDEX_FORMAT, "dataset": self.dataset, "split": self.split,
            "root": self.root, "classes": list(self.classes),
            "shard_files": list(self.shard_files), **self.meta,
        }  # fmt: skip
        arrays = {"names": self.names, "offsets": self.offsets}
        for key in ("labels", "shard", "start", "size"):
            if getattr(self, key) is not None:
                arrays[key] = getattr(self, key)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = Path(path)
        atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))
        return path


def load_index(path: str | os.PathLike, *, key: str = "data.index") -> DataIndex:
    """Reads an index written by :meth:`DataIndex.save` (never unpickles anything).

    Raises:
        ConfigError: missing, unreadable or not an index; ``key`` names the setting.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist; build one with: simclrkit index ROOT "
                          f"--out {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        if meta.get("format", 0) > INDEX_FORMAT:
            raise ConfigError(f"{key}: {path} has index format {meta['format']}; this simclrkit "
                              f"reads up to {INDEX_FORMAT}: upgrade simclrkit")
        extra = {k: v for k, v in meta.items() if k not in _META_FIELDS}
        index = DataIndex(
            dataset=meta["dataset"], split=meta["split"], root=meta["root"],
            names=arrays["names"], offsets=arrays["offsets"], labels=arrays.get("labels"),
            classes=tuple(meta["classes"]), shard_files=tuple(meta["shard_files"]),
            shard=arrays.get("shard"), start=arrays.get("start"), size=arrays.get("size"),
            meta=extra,
        )  # fmt: skip
    except ConfigError:
        raise
    except Exception as error:  # any damage: a clear refusal, not a traceback
        raise ConfigError(
            f"{key}: {path} is not a readable simclrkit index ({type(error).__name__}: {error})"
        ) from None
    if len(index.offsets) < 1 or index.offsets[-1] != len(index.names):
        raise ConfigError(f"{key}: {path} is damaged (its name offsets do not match its names)")
    return index


_META_FIELDS = {"format", "dataset", "split", "root", "classes", "shard_files"}


def _pack_bytes(parts: Sequence[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(bytes(p) for p in parts), dtype=np.uint8).copy()
    return blob, offsets


def index_from_names(
    dataset: str,
    split: str,
    root: str | os.PathLike,
    names: Sequence[str],
    labels: Sequence[int] | None = None,
    classes: Sequence[str] = (),
    **shards: Any,
) -> DataIndex:
    """A :class:`DataIndex` from names relative to ``root`` (and labels, classes, shards)."""
    blob, offsets = _pack_bytes([os.fsencode(name) for name in names])
    label_array = None if labels is None else np.asarray(labels, dtype=np.int64)
    return DataIndex(
        dataset=dataset, split=split, root=str(root), names=blob, offsets=offsets,
        labels=label_array, classes=tuple(classes), **shards,
    )


# --------------------------------------------------------------------------------------------
# Listing folders, image folders and file lists
# --------------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder: str, prefix: str) -> list[str]:
    """Image files under ``folder`` (recursively), as ``prefix + relative path``; unsorted."""
    found, pending = [], [(folder, prefix)]
    while pending:
        directory, relative = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as error:
            raise ConfigError(f"data.root: cannot list {directory}: {error.strerror}") from None
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():
                pending.append((entry.path, f"{relative}{entry.name}/"))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(relative + entry.name)
    return found


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder``, recursively, as sorted paths relative to it.

    Hidden files and folders are skipped; only ``IMAGE_EXTENSIONS`` (any case) count. The
    top-level sub-folders are listed in parallel threads (each directory read is a round trip
    on a network filesystem).
    """
    folder = os.fspath(folder)
    try:
        top = list(os.scandir(folder))
    except OSError as error:
        raise ConfigError(f"data.root: cannot list {folder}: {error.strerror}") from None
    found = [e.name for e in top if not e.is_dir() and _is_image_name(e.name)]
    subfolders = [e for e in top if e.is_dir() and not _is_hidden(e.name)]
    if len(subfolders) > 1:
        with ThreadPoolExecutor(min(_LISTING_THREADS, len(subfolders))) as pool:
            for part in pool.map(lambda e: _scan(e.path, e.name + "/"), subfolders):
                found.extend(part)
    else:
        for entry in subfolders:
            found.extend(_scan(entry.path, entry.name + "/"))
    # Sorted as the joined full paths would sort (the common root does not change the order).
    return sorted(found)


def find_image_files(folder: str | os.PathLike) -> list[str]:
    """All image files under ``folder`` as full paths, sorted (see :func:`list_image_files`)."""
    return [os.path.join(os.fspath(folder), name) for name in list_image_files(folder)]


def _require_folder(root: Path) -> None:
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder")


def list_folder(root: Path, split: str) -> DataIndex:
    """``folder``: every image below ``root``, unlabelled; one split."""
    if split != "train":
        raise ConfigError(
            f"data.dataset: 'folder' is one unlabelled set of images, with no '{split}' split; "
            "use imagefolder (ROOT/train/<class>, ROOT/test/<class>) or filelist to evaluate"
        )
    _require_folder(root)
    return index_from_names("folder", split, root, list_image_files(root))


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def list_imagefolder(root: Path, split: str) -> DataIndex:
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
    label_of = {name: i for i, name in enumerate(classes)}
    prefix = os.path.relpath(folder, root)
    prefix = "" if prefix == "." else prefix + "/"
    present = _class_folders(folder)
    for class_name in present:
        if class_name not in label_of:
            raise ConfigError(
                f"data.root: class folder {folder / class_name} has no counterpart in "
                f"{class_source}; the classes are {classes}"
            )

    def listing(class_name: str) -> list[str]:
        return [f"{prefix}{class_name}/{n}" for n in list_image_files(folder / class_name)]

    with ThreadPoolExecutor(min(_LISTING_THREADS, max(1, len(present)))) as pool:
        per_class = list(pool.map(listing, present))
    names = [name for part in per_class for name in part]
    labels = [label_of[c] for c, part in zip(present, per_class) for _ in part]
    return index_from_names("imagefolder", split, root, names, labels, classes)


# A label is an index into the class list that training allocates: bounded so that a typo
# (an extra digit) is an error here rather than a giant allocation later.
MAX_LABEL = 10_000_000
# A list may name fewer images than it has classes (a small test list of a many-class set),
# up to this many classes (ImageNet's count); beyond it, more classes than images is a typo.
FREE_CLASSES = 1000

_LABEL = re.compile(r"\+?[0-9]+")  # ASCII digits only: int() also takes "1_0" and "١"
# What a mistyped label looks like (so it is not taken for the end of a file name).
_NUMBER_LIKE = re.compile(r"[-+]?([0-9][0-9_]*\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _parse_label(token: str) -> int | None:
    """The label of a last token that is a non-negative integer; None for any other word."""
    return int(token) if _LABEL.fullmatch(token) else None


def _decode_list(root: Path, data: bytes) -> str:
    """The list file as text. A list is text in UTF-8; a file name that is not UTF-8 cannot
    be written in one, so such files are trained on as a folder (data.dataset=folder), whose
    listing keeps any name's bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"data.root: {root} line {line} is not UTF-8 text (byte "
            f"{data[error.start:error.start + 1]!r}); a file list must be UTF-8: save it as "
            "UTF-8, or put files whose names are not UTF-8 in a folder and use "
            "data.dataset=folder"
        ) from None


def list_filelist(root: Path, split: str) -> DataIndex:
    """One path per line, optionally followed by whitespace and an integer label.

    Relative paths are relative to the list file's folder. Blank lines and lines starting with
    "#" are ignored. A path containing spaces must then carry a label (the last token is the
    label only when it is an integer). Labels are class indices: integers from 0, and the
    classes they imply (the largest label + 1) may exceed the number of listed images only up
    to ``FREE_CLASSES``; a last token that looks like a number but is no such index (``-1``,
    ``3.5``, ``1e3``) is refused rather than read as the end of a file name.
    """
    if split != "train":
        raise ConfigError(
            f"data.dataset: a filelist is a single set of images, with no '{split}' split; "
            "pass another list file as data.root to evaluate on it"
        )
    if not root.is_file():
        raise ConfigError(f"data.root: {root} is not a file (filelist expects a text file)")
    text = _decode_list(root, root.read_bytes())
    paths, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.rsplit(None, 1)
        label = _parse_label(tokens[1]) if len(tokens) == 2 else None
        if len(tokens) == 2 and label is None and _NUMBER_LIKE.fullmatch(tokens[1]):
            raise ConfigError(
                f"data.root: {root} line {number}: label {tokens[1]!r} is not a class index; "
                f"labels are integers 0..{MAX_LABEL:,}"
            )
        path = tokens[0] if label is not None else line
        if label is not None and not 0 <= label <= MAX_LABEL:
            raise ConfigError(
                f"data.root: {root} line {number}: label {label} outside 0..{MAX_LABEL:,}"
            )
        paths.append(path)
        labels.append(label)
        lines.append(number)
    labelled = [label is not None for label in labels]
    if any(labelled) and not all(labelled):
        first = labelled.index(not labelled[0])
        raise ConfigError(
            f"data.root: {root} mixes lines with and without labels (line {lines[first]} "
            f"differs from line {lines[0]}); label every line or none"
        )
    if paths and all(labelled):
        top = max(range(len(labels)), key=labels.__getitem__)
        num_classes = labels[top] + 1
        if num_classes > max(len(paths), FREE_CLASSES):
            raise ConfigError(
                f"data.root: {root} line {lines[top]}: label {labels[top]} implies "
                f"{num_classes:,} classes, more than the {len(paths):,} images listed; labels "
                "are class indices 0, 1, 2, ... (number the classes from 0 without gaps)"
            )
        classes = tuple(str(i) for i in range(num_classes))
        return index_from_names("filelist", split, root.parent, paths, labels, classes)
    return index_from_names("filelist", split, root.parent, paths)


def build_index(dataset: str, root: str | os.PathLike, split: str) -> DataIndex:
    """Lists a file dataset's split into a :class:`DataIndex` (no image is opened).

    Raises:
        ConfigError: a missing root, an empty listing, a malformed list or shard.
    """
    if dataset not in FILE_DATASETS:
        raise ConfigError(f"data.dataset: '{dataset}' has no file index; one of {FILE_DATASETS}")
    root = Path(root).expanduser()
    if dataset == "shards":
        from simclrkit.shards import index_shards

        index = index_shards(root, split)
    else:
        lister = {"folder": list_folder, "imagefolder": list_imagefolder}.get(dataset, list_filelist)
        index = lister(root, split)
    if not len(index):
        raise ConfigError(
            f"data.root: no image files ({' '.join(IMAGE_EXTENSIONS)}) found for {dataset} "
            f"in {root}"
        )
    return index
