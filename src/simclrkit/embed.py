"""Embedding folders of images with a trained encoder: h for every file, as .npy or .parquet.

:func:`embed_images` computes h for every image of some files and folders, with the same safe
decoding as training (``data.py``), and writes ``.npy`` or ``.parquet``. The encoder is read by
:func:`simclrkit.export.load_encoder` and each image gets its test-time view
(:class:`simclrkit.export.Preprocess`), as in evaluation.

File names are bytes on Linux and may hold anything but ``/`` and NUL, newlines and bytes
that are not UTF-8 included; pretraining reads such files, so embedding does too. A ``.npy``
output names its rows in a UTF-8 text file, one name per line, which cannot hold those
names: they are refused before any image is embedded, with the suggestion to write
``.parquet``, which stores every name exactly. The output is written whole or not at all
(:class:`simclrkit.export.StagedOutputs`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrkit.config import ConfigError
from simclrkit.export import (
    Preprocess,
    StagedOutputs,
    _checkpoint_file,
    _input_files,
    check_outputs,
    load_encoder,
)

__all__ = ["embed_images", "files_list_path", "shown_name"]


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------


def files_list_path(out_path: str | os.PathLike) -> Path:
    """The list of file names beside a ``.npy`` output: ``<out>.files.txt``."""
    return Path(f"{out_path}.files.txt")


def shown_name(path: str) -> str:
    """A file name as one readable line: its bytes as UTF-8, any byte that is not UTF-8 as
    ``\\xNN``, and control characters (newlines included) escaped as Python writes them."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(
        char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text
    )


def _unlistable(path: str) -> str | None:
    """Why ``path`` cannot be one line of a UTF-8 list, or None if it can."""
    if path.splitlines() != [path]:
        # Every separator str.splitlines knows (\n, \r, \x0b, \x85, \u2028, ...), so the
        # list has one line per row however it is read.
        return "contains a line break"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _check_listable(paths: Sequence[str], out: Path) -> None:
    """Refuses, before any work, names that a ``.npy`` output's file list cannot hold."""
    for path in paths:
        reason = _unlistable(path)
        if reason is not None:
            parquet = out.with_name(out.name.removesuffix(".npy") + ".parquet")
            raise ConfigError(
                f"--out: the file name {shown_name(path)!s} {reason}, so "
                f"{files_list_path(out)} (one UTF-8 name per line) cannot list it; write "
                f"--out {parquet} instead (it keeps every name exactly), or rename the file"
            )


# --------------------------------------------------------------------------------------------
# Embedding folders of images
# --------------------------------------------------------------------------------------------


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given and folders expanded recursively (sorted), without repeats, in order."""
    from simclrkit.data import find_image_files

    paths, seen = [], set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = find_image_files(item)
        elif item.is_file():
            found = [str(item)]
        else:
            raise ConfigError(f"inputs: {shown_name(str(item))} is neither a file nor a folder")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _parquet_writer(paths: list[str], h: np.ndarray, source: str) -> Any:
    """The function that writes the table (built here, before anything is written)."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    # list<float32> has 32-bit offsets; beyond 2**31 values only large_list can hold them.
    large = h.size >= 2**31
    offsets = np.arange(0, h.size + 1, h.shape[1], dtype=np.int64 if large else np.int32)
    values = pa.array(h.reshape(-1), pa.float32())
    lists = pa.LargeListArray if large else pa.ListArray
    embedding = lists.from_arrays(pa.array(offsets), values)
    readable = [os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths]
    table = pa.table({
        "path": pa.array(readable, pa.string()),
        "path_bytes": pa.array([os.fsencode(p) for p in paths], pa.binary()),
        "embedding": embedding,
    })
    table = table.replace_schema_metadata(
        {"simclrkit.encoder": shown_name(source), "dim": str(h.shape[1])}
    )
    return lambda path: parquet.write_table(table, path)


def _write_embeddings(out: Path, paths: list[str], h: np.ndarray, source: str) -> Path | None:
    """Writes .npy plus its file list, or .parquet, whole; returns the list's path if any."""
    with StagedOutputs() as staged:
        if out.name.endswith(".parquet"):
            staged.write(out, _parquet_writer(paths, h, source))
            sidecar = None
        else:
            listing = "".join(p + "\n" for p in paths).encode("utf-8")  # checked up front

            def save(path: str) -> None:
                with open(path, "wb") as handle:  # a handle: np.save would append ".npy"
                    np.save(handle, h)

            staged.write(out, save)
            sidecar = files_list_path(out)
            staged.write(sidecar, lambda path: Path(path).write_bytes(listing))
        staged.commit()
    return sidecar


def embed_images(
    checkpoint_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    batch_size: int = 256,
    device: str = "auto",
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Computes h for every image of ``inputs`` and writes them to ``out_path``.

    Folders are searched recursively for image files (``data.find_image_files``); files are
    decoded by data.py's safe decoder, in threads, while the previous batch runs through the
    encoder. Files that do not decode (empty, truncated, not an image, decompression bombs) are
    skipped, printed once each and returned. Each image gets the test-time view
    (:class:`Preprocess`), as in evaluation.

    Output:

    * ``.npy``: float32 (N, D), with ``<out>.files.txt`` naming row i's file on line i (UTF-8,
      one name per line). A name with a line break or bytes that are not UTF-8 cannot be
      listed so: such names are refused before any work (use ``.parquet``).
    * ``.parquet``: columns ``path`` (string: the name for reading, bytes that are not UTF-8
      shown as ``\\xNN``), ``path_bytes`` (binary: the exact name, ``os.fsencode``; open the
      file with ``open(os.fsdecode(path_bytes))`` or the bytes themselves) and ``embedding``
      (list<float32>).

    Both are written whole or not at all (the .npy and its list together), never over an
    input, and never over an existing file unless ``overwrite``.

    Args:
        checkpoint_path: a training checkpoint, run folder or safetensors export.
        inputs: image files and folders.
        out_path: ends with ``.npy`` or ``.parquet``.
        batch_size: images per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        quiet: no progress bar (skipped files are still listed on stderr).
        overwrite: replace an existing output (and its file list).

    Returns:
        ``{"count": N, "skipped": [{"path", "reason"}, ...], "dim": D, "out": path, "files":
        sidecar path or None}``.

    Raises:
        ConfigError: a bad output name, batch size, device or input path; an output that is
            an input, a folder, or exists without ``overwrite``; a name a .npy list cannot
            hold; no image files; no file that decodes; pyarrow missing for parquet.
        CheckpointError: the checkpoint is not a simclrkit checkpoint or export, or is damaged.
    """
    from tqdm import tqdm

    from simclrkit.data import DEFAULT_MAX_IMAGE_PIXELS, decode_file, to_chw

    out = Path(out_path)
    parquet = out.name.endswith(".parquet")
    if out.is_dir():
        raise ConfigError(
            f"--out: {out} is a folder; name the file to write, e.g. {out / 'embeddings.npy'}"
        )
    if not out.name.endswith((".npy", ".parquet")):
        raise ConfigError(f"--out: {out} must end with .npy or .parquet")
    if parquet and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(
            "--out: writing .parquet needs pyarrow: pip install pyarrow (or write .npy)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size!r}; allowed: an integer >= 1")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path, not a sequence of characters
    from simclrkit.devices import select_device

    target = select_device(device, key="--device")
    paths = _expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"inputs: no image files found in {', '.join(map(str, inputs))}")
    outputs = [(out, "embeddings")] + ([] if parquet else [(files_list_path(out), "file list")])
    sources = [*_input_files(checkpoint_path), *map(Path, paths)]
    check_outputs(outputs, sources, overwrite=overwrite, example="embeddings.npy")
    if not parquet:
        _check_listable(paths, out)
    _checkpoint_file(checkpoint_path)  # a missing checkpoint is named before the encoder loads
    encoder = load_encoder(checkpoint_path, device=target)
    # Preprocess on the CPU, next to the decoder; one transfer per batch.
    preprocess = Preprocess(encoder.preprocess.image_size, encoder.preprocess.in_channels)
    decode = partial(decode_file, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    rows: list[torch.Tensor] = []
    workers = min(8, os.cpu_count() or 1)
    show_bar = not quiet and sys.stderr.isatty()
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(paths), unit="image", disable=not show_bar) as bar,
        torch.inference_mode(),
    ):
        pending = pool.map(decode, batches[0])
        for index, batch in enumerate(batches):
            decoded = list(pending)
            if index + 1 < len(batches):
                pending = pool.map(decode, batches[index + 1])  # decodes while this batch runs
            views = []
            for path, (pixels, reason) in zip(batch, decoded):
                if pixels is None:
                    skipped.append({"path": path, "reason": reason})
                    # Always said, also when quiet: a skipped file is a result, not progress.
                    tqdm.write(f"simclrkit: skipping {shown_name(path)}: {reason}", file=sys.stderr)
                    continue
                views.append(preprocess(to_chw(pixels)))
                kept.append(path)
            if views:
                rows.append(encoder(torch.cat(views).to(target)).float().cpu())
            bar.update(len(batch))
    if not rows:
        raise ConfigError(f"inputs: none of the {len(paths)} image files could be decoded")
    h = torch.cat(rows).numpy()
    sidecar = _write_embeddings(out, kept, h, str(checkpoint_path))
    return {
        "count": len(kept),
        "skipped": skipped,
        "dim": int(h.shape[1]),
        "out": str(out),
        "files": None if sidecar is None else str(sidecar),
    }
