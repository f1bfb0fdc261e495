"""Nearest-neighbour image search over a trained encoder: an index of h, queries, near-copies.

:func:`index_images` embeds images with a trained encoder (:func:`simclrkit.export.load_encoder`:
training checkpoints, run folders, safetensors exports, imported models), each at its test-time
view as in evaluation (``evaluate._test_batches``; a file that does not decode is skipped and
listed), scales every h to unit length and stores it in a faiss index, so that the inner
product is the cosine similarity. :func:`search_images` embeds query images with the same
checkpoint and returns the k most similar indexed images; :func:`find_duplicates` groups the
indexed images that are near-copies of one another.

Kinds of index, fixed when the index is created:

* ``exact``: ``IndexFlatIP``, a scan of every vector: exact answers.
* ``hnsw``: ``IndexHNSWFlat`` (M = 32, efConstruction = 40), a proximity graph searched
  greedily (Malkov & Yashunin 2018). Its search breadth efSearch is calibrated after every
  build and every addition (:func:`calibrate_ef_search`): 500 indexed vectors are searched both
  ways and the smallest efSearch of 16, 32, ..., 4096 whose recall@10 (each query's own entry
  left out) reaches 0.96 on them is kept, a margin over the sampling error of that estimate so
  that queries like the indexed images get recall@10 >= 0.95.
* ``auto``: exact up to 200,000 images, hnsw above.

Cost at ImageNet size (1.28M images, ResNet-50's h: 2048-d float32), scaled from measurements
at 40,000 2048-d vectors on an idle 2-core EPYC:

* Memory: the vectors are 10.5 GB in either kind, held in memory to build, add or search (a
  search loads the whole index); the HNSW graph adds ~0.35 GB (64 links of 4 bytes per vector
  at its base level, a few above).
* Build: embedding the images dominates (what ``simclrkit embed`` costs). Inserting into the
  graph took 0.34 ms per vector, ~10 minutes for 1.28M on 2 cores (it grows with log N); the
  exact kind only appends. An addition writes the whole index again (10.5 GB).
* Per query: exact reads all 10.5 GB, ~0.5 s for a query alone, ~27 ms each in a batch (one
  matrix product); HNSW reads a few thousand vectors, ~2-4 ms alone (~1-2 ms in a batch) at
  efSearch 128-256, what synthetic 2048-d vectors of intrinsic dimension 64 needed for
  recall@10 0.94-0.96. Random vectors, the worst case, need efSearch 1024
  (``benchmarks/search.py``).
* Near-duplicates compare every image with every other: on an exact index a range search
  (exact; ~4 minutes at 100,000 images, ~10 hours at 1.28M on 2 cores); on HNSW one k-NN
  search per image (approximate, as its queries are; ~30-45 minutes at 1.28M).

The index folder::

    meta.json                  what the index is (format, kind, dim, count, the checkpoint's
                               path, last used, and sha256, the encoder's architecture,
                               times, host) and which generation of the files below is current
    vectors.NNNNNN.faiss       the faiss index of generation NNNNNN
    names.NNNNNN.json          row i's image, as a JSON list of ``os.fsdecode`` strings (any
                               file name round-trips: newlines, bytes that are not UTF-8)
    skipped.NNNNNN.json        files that did not decode: [{"path", "reason"}, ...]
    .lock                      held (flock) by the process that is updating the index

Updates are crash-safe: a new generation's files are written and fsynced under names nothing
refers to yet, then ``meta.json`` is replaced atomically (``checkpoint.atomic_write``) to name
them, and only then are the previous generation's files removed. A kill at any moment leaves
``meta.json`` naming one complete generation, the old or the new; files it does not name are
debris that the next update removes. Loading checks that the vectors, the names and
``meta.json`` agree on the count.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrkit import __version__, jsonout
from simclrkit.checkpoint import atomic_write, fsync_folder
from simclrkit.config import ConfigError
from simclrkit.vectorindex import (
    add_vectors,
    faiss_module,
    hnsw_facts,
    new_vector_index,
    normalize,
)

__all__ = [
    "AUTO_EXACT_LIMIT",
    "KINDS",
    "ImageIndex",
    "find_duplicates",
    "index_images",
    "load_image_index",
    "search_images",
]

INDEX_FORMAT = "simclrkit-image-index"
INDEX_FORMAT_VERSION = 1
KINDS = ("auto", "exact", "hnsw")
# Files; and the built-in datasets held in memory (their images are named NAME:SPLIT/ROW).
DATASETS = ("folder", "filelist", "shards", "mnist5k", "mnist", "fashion-mnist", "cifar10",
            "cifar100", "stl10")  # fmt: skip
AUTO_EXACT_LIMIT = 200_000
_PAIR_CHUNK = 4096  # indexed vectors searched at once for near-duplicates
_DUPLICATE_K = 32  # first k of the k-NN search for near-duplicates in an HNSW index (doubled)
# A cosine is computed in float32: an exact copy's 1.0 may come out as 0.99999994.
_TOLERANCE = 1e-6
_META = "meta.json"
_GENERATION_FILE = re.compile(r"^(vectors|names|skipped)\.\d{6,}\.(faiss|json)$")
_REBUILD = "rebuild it: simclrkit index-embeddings CHECKPOINT IMAGES... --out NEW_FOLDER"


# --------------------------------------------------------------------------------------------
# The index folder: reading, and writing a new generation
# --------------------------------------------------------------------------------------------


@dataclass
class ImageIndex:
    """A loaded index folder.

    Attributes:
        folder: where it lives.
        meta: ``meta.json`` (kind, dim, count, checkpoint, ...).
        names: row i's image file (``os.fsdecode`` strings).
        skipped: files that did not decode, ``[{"path", "reason"}]``.
        vectors: the faiss index of the unit h, rows aligned with ``names``.
    """

    folder: Path
    meta: dict[str, Any]
    names: list[str]
    skipped: list[dict[str, str]]
    vectors: Any

    def __len__(self) -> int:
        return len(self.names)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def search(self, h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k indexed images most similar to each row of ``h`` (normalised here).

        Returns:
            (cosine similarities (Q, k'), row ids (Q, k')), nearest first, k' = min(k, N); an
            id of -1 marks a place the search left empty (HNSW only, rare).
        """
        return self.vectors.search(normalize(h), min(k, len(self)))


def _damaged(key: str, what: str) -> ConfigError:
    return ConfigError(f"{key}: {what}; the index is damaged or was changed by hand: {_REBUILD}")


def _read_json(path: Path, key: str) -> Any:
    if not path.is_file():
        raise _damaged(key, f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError is a ValueError
        raise _damaged(key, f"{path} is not JSON ({str(error).splitlines()[0][:120]})") from None


def _check_meta(meta: Any, path: Path, key: str) -> dict[str, Any]:
    """The fields every reader relies on, with the right types."""
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise _damaged(key, f"{path} does not describe a simclrkit image index")
    version = meta.get("format_version")
    if isinstance(version, int) and version > INDEX_FORMAT_VERSION:
        raise ConfigError(
            f"{key}: {path} has index format {version}; this simclrkit reads up to "
            f"{INDEX_FORMAT_VERSION}: upgrade simclrkit"
        )
    files = meta.get("files")
    checks = {
        "format_version": version == INDEX_FORMAT_VERSION,
        "kind": meta.get("kind") in ("exact", "hnsw"),
        "dim": isinstance(meta.get("dim"), int) and meta["dim"] > 0,
        "count": isinstance(meta.get("count"), int) and meta["count"] >= 0,
        "generation": isinstance(meta.get("generation"), int),
        "files": isinstance(files, dict) and all(
            isinstance(files.get(part), str) and _GENERATION_FILE.fullmatch(files[part])
            for part in ("vectors", "names", "skipped")
        ),
        "checkpoint": isinstance(meta.get("checkpoint"), dict)
        and all(isinstance(meta["checkpoint"].get(f), str) for f in ("path", "sha256")),
        "hnsw": meta.get("kind") != "hnsw" or (
            isinstance(meta.get("hnsw"), dict) and isinstance(meta["hnsw"].get("ef_search"), int)
        ),
    }  # fmt: skip
    for field, valid in checks.items():
        if not valid:
            raise _damaged(key, f"{path}: {field} is missing or wrong")
    return meta


def load_image_index(folder: str | os.PathLike, *, key: str = "INDEX_DIR") -> ImageIndex:
    """Reads an index folder written by :func:`index_images` and checks that it is whole.

    Raises:
        ConfigError: not a folder, no index in it, a newer format, or files that are
            missing, damaged or disagree on the count (the message says how to rebuild).
    """
    faiss = faiss_module()
    folder = Path(folder)
    if not folder.is_dir() or not (folder / _META).is_file():
        what = "holds no image index (no meta.json)" if folder.is_dir() else "is not a folder"
        raise ConfigError(
            f"{key}: {folder} {what}; build one with: simclrkit index-embeddings CHECKPOINT "
            f"IMAGES... --out {folder}"
        )
    meta = _check_meta(_read_json(folder / _META, key), folder / _META, key)
    files = meta["files"]
    names = _read_json(folder / files["names"], key)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _damaged(key, f"{folder / files['names']} is not a list of file names")
    skipped = _read_json(folder / files["skipped"], key)
    if not isinstance(skipped, list):
        raise _damaged(key, f"{folder / files['skipped']} is not a list")
    vectors_path = folder / files["vectors"]
    if not vectors_path.is_file():
        raise _damaged(key, f"{vectors_path} is missing")
    try:
        vectors = faiss.read_index(str(vectors_path))
    except RuntimeError as error:  # faiss reports any damage as a RuntimeError
        # "Error in <function> at <file>:<line>: <what>": the what.
        reason = str(error).strip().splitlines()[-1].split(": ", 1)[-1][:160]
        raise _damaged(key, f"{vectors_path} is not a readable faiss index ({reason})") from None
    expected = faiss.IndexHNSWFlat if meta["kind"] == "hnsw" else faiss.IndexFlat
    if not isinstance(vectors, expected) or vectors.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _damaged(key, f"{vectors_path} is not the {meta['kind']} inner-product index "
                            "meta.json describes")  # fmt: skip
    if not vectors.ntotal == len(names) == meta["count"] or vectors.d != meta["dim"]:
        raise _damaged(
            key,
            f"{folder} disagrees with itself: {vectors.ntotal} vectors of dimension "
            f"{vectors.d}, {len(names)} names, and meta.json says {meta['count']} of "
            f"dimension {meta['dim']}",
        )
    if meta["kind"] == "hnsw":
        vectors.hnsw.efSearch = meta["hnsw"]["ef_search"]
    return ImageIndex(folder, meta, names, skipped, vectors)


def _remove_generations(folder: Path, keep: Sequence[str]) -> None:
    """Removes every generation file that ``keep`` does not name (older generations, and what
    an update killed before its commit left)."""
    for path in folder.iterdir():
        if _GENERATION_FILE.fullmatch(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def _commit(folder: Path, meta: dict[str, Any], vectors: Any, names: list[str],
            skipped: list[dict[str, str]], previous: dict[str, Any] | None) -> int:  # fmt: skip
    """Writes the generation after ``previous`` (the current meta.json, None for a new index)
    whole, then makes it the current one; returns its number."""
    faiss = faiss_module()
    generation = previous["generation"] + 1 if previous is not None else 1
    files = {part: f"{part}.{generation:06d}.{suffix}"
             for part, suffix in (("vectors", "faiss"), ("names", "json"), ("skipped", "json"))}  # fmt: skip
    # Through a Python handle, so that a full disk is the OSError it is.
    atomic_write(folder / files["vectors"],
                 lambda handle: faiss.write_index(vectors, faiss.PyCallbackIOWriter(handle.write)))  # fmt: skip
    for part, value in (("names", names), ("skipped", skipped)):
        # ASCII JSON: a name that is not UTF-8 keeps its surrogates as \\udcXX escapes.
        text = json.dumps(value, ensure_ascii=True)
        atomic_write(folder / files[part], lambda handle, text=text: handle.write(text.encode()))
    fsync_folder(folder)
    jsonout.write_json(folder / _META, {**meta, "generation": generation, "files": files})
    _remove_generations(folder, list(files.values()))
    return generation


# --------------------------------------------------------------------------------------------
# Images: listing and embedding
# --------------------------------------------------------------------------------------------


def _listed(dataset: str, item: str | os.PathLike, key: str) -> Any:
    """The :class:`DataIndex` of one file list or shard folder, messages naming ``key``."""
    from simclrkit.index import build_index

    try:
        return build_index(dataset, os.path.abspath(item), "train")
    except ConfigError as error:
        raise ConfigError(str(error).replace("data.root: ", f"{key}: ", 1)) from None


def _image_sets(inputs: Sequence[str | os.PathLike], dataset: str, key: str) -> list[Any]:
    """The images of ``inputs`` as :class:`ImageFiles`, every name absolute: one set for files,
    folders (searched recursively) and file lists, one per shard folder."""
    from simclrkit.embed import _expand_inputs
    from simclrkit.imagefiles import ImageFiles
    from simclrkit.index import index_from_names

    if dataset not in DATASETS:
        raise ConfigError(f"--dataset: got {dataset!r}; allowed: {', '.join(DATASETS)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path, not a sequence of characters
    if dataset == "shards":
        return [ImageFiles(_listed("shards", item, key)) for item in inputs]
    if dataset not in ("folder", "filelist"):
        return [_built_in(dataset, str(split), key) for split in inputs]
    if dataset == "folder":
        try:
            paths = [os.path.abspath(path) for path in _expand_inputs(inputs)]
        except ConfigError as error:
            raise ConfigError(str(error).replace("inputs: ", f"{key}: ", 1)) from None
    else:
        paths = []
        for item in inputs:
            listing = _listed("filelist", item, key)
            paths += [os.path.abspath(listing.path(i)) for i in range(len(listing))]
        paths = list(dict.fromkeys(paths))
    if not paths:
        raise ConfigError(f"{key}: no image files found in {', '.join(map(str, inputs))}")
    return [ImageFiles(index_from_names("folder", "train", os.sep, paths))]


def _built_in(dataset: str, split: str, key: str) -> Any:
    """A built-in dataset's split (``IMAGES`` name splits: train, test), its images named
    ``NAME:SPLIT/ROW`` (``item_names``)."""
    from simclrkit.data import load_dataset

    try:
        images = load_dataset(dataset, None, split, quiet=True)
    except (ConfigError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else "no such split"
        raise ConfigError(
            f"{key}: with --dataset {dataset}, name its splits (train, test); '{split}': {reason}"
        ) from None
    _name_rows(images, [f"{dataset}:{split}/{row}" for row in range(len(images))])
    return images


def _name_rows(images: Any, names: list[str]) -> None:
    """Gives a set of in-memory images the names its rows are indexed under. ImageArray is a
    frozen dataclass of the data; the names are this module's, kept beside its fields."""
    object.__setattr__(images, "item_names", names)


def _names(files: Any) -> list[str]:
    if hasattr(files, "item_names"):
        return list(files.item_names)
    return [files.path(i) for i in range(len(files))]


def _embedded(encoder: torch.nn.Module, files: Any, *, batch_size: int, device: torch.device,
              bad: list, quiet: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """(positions (B,), unit h (B, D)) batches of ``files``' test-time views, in order.

    Files that do not decode are appended to ``bad`` as (position, reason) and named on
    stderr (also when quiet: a skipped file is a result, not progress). DataLoader processes
    decode ahead when there are more than two batches.
    """
    from tqdm import tqdm

    from simclrkit.embed import shown_name
    from simclrkit.evaluate import _test_batches
    from simclrkit.export import _match_channels
    from simclrkit.pipeline import auto_workers

    size, channels = encoder.preprocess.image_size, encoder.preprocess.in_channels
    workers = (auto_workers("auto", in_memory=False, device_type=device.type)
               if len(files) > 2 * batch_size else 0)  # fmt: skip
    reported = len(bad)

    def report() -> int:
        for position, reason in bad[reported:]:
            tqdm.write(f"simclrkit: skipping {shown_name(files.path(position))}: {reason}",
                       file=sys.stderr)  # fmt: skip
        return len(bad)

    show_bar = not quiet and sys.stderr.isatty()
    with tqdm(total=len(files), unit="image", disable=not show_bar) as bar:
        for positions, views in _test_batches(files, size, batch_size, workers=workers, bad=bad):
            bar.update(len(positions) + len(bad) - reported)
            reported = report()
            # Files decode to RGB; a grayscale encoder gets its one channel (export.py).
            with torch.inference_mode():
                h = encoder(_match_channels(views, channels).to(device)).float().cpu().numpy()
            yield positions.numpy(), normalize(h)
        bar.update(len(bad) - reported)
        report()


def _checked_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size!r}; allowed: an integer >= 1")


# --------------------------------------------------------------------------------------------
# Building and extending an index
# --------------------------------------------------------------------------------------------


def _debris(path: Path) -> bool:
    """What an unfinished update may leave in an index folder: its lock and unnamed files."""
    from simclrkit.runfolder import LOCK_NAME

    return path.name == LOCK_NAME or path.name.startswith(".tmp-") or bool(
        _GENERATION_FILE.fullmatch(path.name)
    )


def _check_out(out: Path, add: bool) -> None:
    """Refuses, before any work, an --out that is a file, or one that holds something."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; name a folder for the index (a new one)")
    if not out.is_dir():
        return
    if (out / _META).exists():
        if not add:
            raise ConfigError(
                f"--out: {out} already holds an image index; pass --add to add the images it "
                "does not have yet, or choose another --out"
            )
        return
    others = sorted(path.name for path in out.iterdir() if not _debris(path))
    if others:
        raise ConfigError(
            f"--out: {out} is a folder that holds other files ({others[0]}"
            f"{', ...' if len(others) > 1 else ''}) and no image index; choose a new or empty "
            "folder"
        )


def _claim(out: Path) -> Any:
    """Takes the folder's lock (``runfolder.claim``: flock, debris removed), or says who has it."""
    from simclrkit.runfolder import RunFolderBusy, claim

    try:
        return claim(out)
    except RunFolderBusy as error:
        raise ConfigError(str(error).replace("--run-dir", "--out")) from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def index_images(
    checkpoint_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    dataset: str = "folder",
    kind: str = "auto",
    add: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Embeds images with a trained encoder into a nearest-neighbour index folder.

    Args:
        checkpoint_path: a training checkpoint, run folder, safetensors export or imported
            model; the index records its file's path and sha256.
        inputs: image files and folders (searched recursively); for ``dataset="filelist"``
            list files, for ``"shards"`` shard folders.
        out_dir: the index folder: new or empty, or with ``add`` an index (or new or empty).
        dataset: ``folder``, ``filelist`` or ``shards``.
        kind: ``exact``, ``hnsw`` or ``auto`` (exact up to :data:`AUTO_EXACT_LIMIT` images);
            fixed when the index is created (with ``add``, ``auto`` or the index's kind).
        add: add the images the index does not hold yet (by absolute path; a file skipped
            before is tried again), embedded by the same checkpoint (same sha256).
        batch_size: images per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        quiet: no progress bar (skipped files are still named on stderr).

    An addition writes the whole index again, as a new generation (faiss files cannot be
    appended to); an addition that changes nothing (no new image, the same files skipped)
    writes nothing.

    Returns:
        ``{"out", "kind", "dim", "count" (in the index now), "added", "already_indexed",
        "skipped": [{"path", "reason"}] (this call's), "skipped_file" (the folder's list of
        every skipped file), "created" (bool), "hnsw" (its settings, or None)}``.

    Raises:
        ConfigError: bad arguments; an --out that is a file or holds other files; an existing
            index without ``add``; another checkpoint or kind than the index's; no images; no
            image that decodes (a new index); another process updating the folder.
        CheckpointError: the checkpoint is missing or is not a simclrkit checkpoint or export.
    """
    from simclrkit.devices import select_device
    from simclrkit.export import _checkpoint_file, load_encoder
    from simclrkit.modelcard import sha256_of

    if kind not in KINDS:
        raise ConfigError(f"--kind: got {kind!r}; allowed: {', '.join(KINDS)}")
    _checked_batch_size(batch_size)
    faiss_module()
    target = select_device(device, key="--device")
    out = Path(out_dir)
    checkpoint = Path(os.path.abspath(_checkpoint_file(checkpoint_path)))
    _check_out(out, add)
    image_sets = _image_sets(inputs, dataset, "IMAGES")
    with _claim(out):
        _check_out(out, add)  # again, under the lock: another process may have built it
        existing = load_image_index(out, key="--out") if (out / _META).is_file() else None
        # What an update killed before its commit (or just after) left behind.
        _remove_generations(out, list(existing.meta["files"].values()) if existing else [])
        digest = sha256_of(checkpoint)
        if existing is not None:
            _check_same_model(existing, checkpoint, digest, kind)
        todo, already = _not_indexed(image_sets, set(existing.names) if existing else set())
        candidates = sum(len(files) for files in todo)
        summary = {"out": str(out), "already_indexed": already, "created": existing is None}
        if existing is not None:
            unchanged = {**summary, "added": 0, "skipped": [], **_unchanged(existing)}
            if not candidates:
                return unchanged

        encoder = load_encoder(checkpoint, device=target)
        if existing is not None:
            chosen, vectors = existing.kind, existing.vectors
            names, skipped = list(existing.names), list(existing.skipped)
        else:
            chosen = kind if kind != "auto" else (
                "exact" if candidates <= AUTO_EXACT_LIMIT else "hnsw")  # fmt: skip
            vectors, names, skipped = new_vector_index(chosen, encoder.feature_dim), [], []
        before = len(names)
        bad_now = _embed_into(vectors, names, todo, encoder, batch_size=batch_size,
                              device=target, quiet=quiet)  # fmt: skip
        if existing is None and len(names) == 0:
            raise ConfigError(f"IMAGES: none of the {candidates} image files could be decoded")
        tried = {name for files in todo for name in _names(files)}
        skipped = [item for item in skipped if item.get("path") not in tried] + bad_now
        if existing is not None and len(names) == before and skipped == existing.skipped:
            # Only files skipped before, and skipped again: nothing to write.
            return {**unchanged, "skipped": bad_now}
        hnsw = hnsw_facts(vectors) if chosen == "hnsw" else None
        now = _now()
        meta = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": chosen,
            "metric": "cosine (inner product of L2-normalised h)",
            "dim": int(vectors.d),
            "count": len(names),
            **({"hnsw": hnsw} if hnsw else {}),
            "checkpoint": {"path": str(checkpoint), "sha256": digest},
            "architecture": dict(encoder.architecture),
            "created": existing.meta.get("created", now) if existing is not None else now,
            "updated": now,
            "host": {"name": socket.gethostname(), "platform": platform.platform()},
            "simclrkit_version": __version__,
            "faiss_version": faiss_module().__version__,
        }
        generation = _commit(out, meta, vectors, names, skipped,
                             existing.meta if existing is not None else None)  # fmt: skip
    return {**summary, "kind": chosen, "dim": int(vectors.d), "count": len(names),
            "added": len(names) - before, "skipped": bad_now, "hnsw": hnsw,
            "skipped_file": str(out / f"skipped.{generation:06d}.json")}  # fmt: skip


def _not_indexed(image_sets: list[Any], known: set[str]) -> tuple[list[Any], int]:
    """(the image sets cut to the files not in ``known``, how many were); a file listed twice
    is kept once."""
    todo, already = [], 0
    for files in image_sets:
        names = _names(files)
        keep = [i for i, name in enumerate(names) if name not in known]
        already += len(names) - len(keep)
        known.update(names[i] for i in keep)
        if keep and len(keep) < len(names):
            files = _subset(files, keep, [names[i] for i in keep])
        if keep:
            todo.append(files)
    return todo, already


def _subset(files: Any, keep: list[int], names: list[str]) -> Any:
    """The images ``keep`` of a set, named as they were."""
    from simclrkit.evaluate import select_images
    from simclrkit.imagefiles import ImageFiles

    if isinstance(files, ImageFiles):
        return ImageFiles(files.index.select(keep))
    part = select_images(files, keep)
    _name_rows(part, names)
    return part


def _embed_into(vectors: Any, names: list[str], todo: list[Any], encoder: torch.nn.Module, *,
                batch_size: int, device: torch.device, quiet: bool) -> list[dict[str, str]]:  # fmt: skip
    """Adds the unit h of every image of ``todo`` to ``vectors`` and its name to ``names``, in
    the same order; returns the files that did not decode, as ``[{"path", "reason"}]``."""
    skipped = []
    for files in todo:
        file_names, bad = _names(files), []

        def rows() -> Iterator[np.ndarray]:  # used up before the loop moves on
            for positions, h in _embedded(encoder, files, batch_size=batch_size, device=device,
                                          bad=bad, quiet=quiet):  # fmt: skip
                names.extend(file_names[i] for i in positions)
                yield h

        add_vectors(vectors, rows())
        skipped += [{"path": file_names[i], "reason": reason} for i, reason in bad]
    return skipped


def _unchanged(existing: ImageIndex) -> dict[str, Any]:
    """What :func:`index_images` reports of an index it left as it was."""
    meta = existing.meta
    return {"kind": meta["kind"], "dim": meta["dim"], "count": meta["count"],
            "hnsw": meta.get("hnsw"), "skipped_file": str(existing.folder / meta["files"]["skipped"])}  # fmt: skip


def _check_same_model(existing: ImageIndex, checkpoint: Path, digest: str, kind: str) -> None:
    """--add must embed with the index's checkpoint and cannot change its kind."""
    recorded = existing.meta["checkpoint"]
    if digest != recorded["sha256"]:
        raise ConfigError(
            f"--add: {checkpoint} (sha256 {digest[:12]}...) is not the checkpoint {existing.folder} "
            f"was built with ({recorded['path']}, sha256 {recorded['sha256'][:12]}...); its "
            "vectors would not compare with the indexed ones: add with that checkpoint, or build "
            "a new index with --out NEW_FOLDER"
        )
    if kind not in ("auto", existing.kind):
        raise ConfigError(
            f"--kind: {existing.folder} is an {existing.kind} index, and the kind is fixed when "
            f"an index is created; drop --kind, or build a {kind} index with --out NEW_FOLDER"
        )


# --------------------------------------------------------------------------------------------
# Searching
# --------------------------------------------------------------------------------------------


def _index_checkpoint(index: ImageIndex) -> Path:
    """The index's checkpoint, refused when it is missing or has changed since."""
    from simclrkit.modelcard import sha256_of

    recorded = index.meta["checkpoint"]
    path = Path(recorded["path"])
    if not path.is_file():
        raise ConfigError(
            f"INDEX_DIR: {index.folder} was built with {path}, which is missing; put it back "
            f"(sha256 {recorded['sha256'][:12]}...) to embed queries, or build a new index"
        )
    digest = sha256_of(path)
    if digest != recorded["sha256"]:
        raise ConfigError(
            f"INDEX_DIR: {path} changed since {index.folder} was built (sha256 {digest[:12]}..., "
            f"not {recorded['sha256'][:12]}...), so queries embedded by it would not compare "
            f"with the indexed images; rebuild the index: simclrkit index-embeddings {path} "
            "IMAGES... --out NEW_FOLDER"
        )
    return path


def search_images(
    index_dir: str | os.PathLike | ImageIndex,
    queries: Sequence[str | os.PathLike],
    *,
    k: int = 10,
    batch_size: int = 256,
    device: str = "auto",
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """The k indexed images most similar to each query image (cosine of h).

    Queries are embedded like the indexed images (same checkpoint, refused if its sha256
    changed; test-time view); query files that do not decode are skipped and named on stderr.

    Args:
        index_dir: an index folder (or a loaded :class:`ImageIndex`).
        queries: image files and folders (searched recursively), or names of indexed images
            (a built-in dataset's ``NAME:SPLIT/ROW``), looked up by their stored vectors.
        k: neighbours per query (at most the index's size).

    Returns:
        ``[{"query": path, "neighbours": [{"path", "similarity"}, ...]}]`` in the queries'
        order, nearest first; a query that is itself indexed is not its own neighbour.

    Raises:
        ConfigError: bad ``k`` or batch size, no index, a missing or changed checkpoint, no
            query images or none that decodes.
    """
    from simclrkit.devices import select_device
    from simclrkit.export import load_encoder

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"-k: got {k!r}; allowed: an integer >= 1")
    _checked_batch_size(batch_size)
    target = select_device(device, key="--device")
    index = index_dir if isinstance(index_dir, ImageIndex) else load_image_index(index_dir)
    if isinstance(queries, (str, os.PathLike)):
        queries = [queries]
    # A query that names an indexed image (NAME:SPLIT/ROW of a built-in dataset, or an indexed
    # file) is looked up by its stored vector; the rest are image files and folders.
    rows = {name: row for row, name in enumerate(index.names)}
    named = [str(q) for q in queries if str(q) in rows and not os.path.exists(q)]
    files_asked = [q for q in queries if str(q) not in named]
    results: list[dict[str, Any]] = []
    if named:
        stored = np.stack([index.vectors.reconstruct(rows[name]) for name in named])
        similarities, ids = index.search(stored, k + 1)
        results += [_result(name, index, s, i, k) for name, s, i in zip(named, similarities, ids)]
    if not files_asked:
        return results
    image_sets = _image_sets(files_asked, "folder", "QUERY_IMAGES")
    encoder = load_encoder(_index_checkpoint(index), device=target)
    for files in image_sets:
        names, bad = _names(files), []
        for positions, h in _embedded(encoder, files, batch_size=batch_size, device=target,
                                      bad=bad, quiet=quiet):  # fmt: skip
            similarities, ids = index.search(h, k + 1)
            results += [_result(names[p], index, s, i, k)
                        for p, s, i in zip(positions, similarities, ids)]  # fmt: skip
    if not results:
        count = sum(len(files) for files in image_sets)
        raise ConfigError(f"QUERY_IMAGES: none of the {count} query files could be decoded")
    return results


def _result(query: str, index: ImageIndex, similarities: np.ndarray, ids: np.ndarray,
            k: int) -> dict[str, Any]:  # fmt: skip
    """The k nearest of k + 1 found, the query itself left out where it is indexed."""
    neighbours = [{"path": index.names[i], "similarity": float(s)}
                  for s, i in zip(similarities, ids) if i >= 0 and index.names[i] != query]
    return {"query": query, "neighbours": neighbours[:k]}


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------


def _similar_pairs(index: ImageIndex, cut: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, cosine) of every pair of indexed images with cosine >= ``cut``
    (first < second): a range search for exact indexes (every pair: exact); for HNSW each
    image's k nearest, k doubled from 32 while an image's k-th neighbour still passes."""
    firsts, seconds, similarities = [], [], []
    count = len(index)
    for start in range(0, count, _PAIR_CHUNK):
        rows = index.vectors.reconstruct_n(start, min(_PAIR_CHUNK, count - start))
        query = np.arange(start, start + len(rows))
        if index.kind == "exact":
            limits, found_similarities, found = index.vectors.range_search(rows, cut)
            queries = np.repeat(query, np.diff(limits).astype(np.int64))
        else:
            k = min(count, _DUPLICATE_K)
            while True:
                found_similarities, found = index.vectors.search(rows, k)
                if k == count or not (found_similarities[:, -1] >= cut).any():
                    break
                k = min(count, 2 * k)
            queries = np.repeat(query, k)
            found_similarities, found = found_similarities.ravel(), found.ravel()
        keep = (found >= 0) & (found != queries) & (found_similarities >= cut)
        pairs = np.sort(np.stack([queries[keep], found[keep]]), axis=0)
        firsts.append(pairs[0])
        seconds.append(pairs[1])
        similarities.append(found_similarities[keep])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    # Each pair is found from both sides: keep one (their cosines agree to rounding).
    _, unique = np.unique(first * count + second, return_index=True)
    return first[unique], second[unique], np.concatenate(similarities)[unique]


def find_duplicates(index_dir: str | os.PathLike | ImageIndex, threshold: float) -> list[dict[str, Any]]:
    """Groups of near-duplicate images among the indexed ones.

    Two images are linked when the cosine of their h is >= ``threshold`` (to float32
    rounding, 1e-6); a group is a connected component of these links, so a chain of near
    copies is one group. Needs the index alone (no checkpoint, no image file).

    Returns:
        ``[{"paths": [...], "similarity": {"min", "max"}}]``: groups of two or more images in
        index order, the range of the links' cosines inside each.

    Raises:
        ConfigError: a threshold outside (0, 1], or no index.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            or not 0 < threshold <= 1):  # fmt: skip
        raise ConfigError(
            f"--duplicates: got {threshold!r}; allowed: a cosine similarity in (0, 1], e.g. 0.95"
        )
    index = index_dir if isinstance(index_dir, ImageIndex) else load_image_index(index_dir)
    count = len(index)
    if count < 2:
        return []
    first, second, similarity = _similar_pairs(index, threshold - _TOLERANCE)
    if not len(first):
        return []
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    # The components of two or more images are the groups; dicts keep the first member's order.
    groups: dict[int, dict[str, Any]] = {}
    for i in np.flatnonzero(np.bincount(component)[component] > 1):
        groups.setdefault(int(component[i]), {"paths": []})["paths"].append(index.names[i])
    order = np.argsort(component[first], kind="stable")
    labels, starts = np.unique(component[first][order], return_index=True)
    lowest = np.minimum.reduceat(similarity[order], starts)
    highest = np.maximum.reduceat(similarity[order], starts)
    for label, low, high in zip(labels.tolist(), lowest.tolist(), highest.tolist()):
        groups[label]["similarity"] = {"min": low, "max": high}
    return list(groups.values())

