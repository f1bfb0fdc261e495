"""Crash-safe checkpoints that cannot run code when loaded.

Saving writes to a temporary file in the destination folder, fsyncs it, renames it over the
destination with ``os.replace`` (atomic on POSIX) and fsyncs the folder, so a kill or an error
at any moment leaves either the old file or the new one, never a partial file under the
final name. Temporary files start with ``.tmp-`` and are removed on error; resume only ever
looks at final names.

Loading always uses ``torch.load(weights_only=True)``: a file whose pickle would construct
arbitrary objects (and so could run code) is refused with :class:`CheckpointError`; there is
no fallback to unsafe loading.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or from another format."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Runs ``write(handle)`` so that ``path`` is never seen half-written.

    The data goes to a temporary file in the same folder, is fsynced, renamed over ``path``
    and the folder fsynced: after a crash at any moment ``path`` holds the old content or
    the new one.

    Raises:
        OSError: when the write fails (disk full, ...); no temporary file remains and an
            earlier file at ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        # mkstemp creates the file for its owner only; give it the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Saves ``obj`` with ``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Loads a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: when the file is missing, truncated, or holds objects other than
            tensors and plain containers (a pickle that could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain "
            f"data, and loading it could run code ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a simclrkit training checkpoint and checks its format version."""
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or "format_version" not in state or "encoder" not in state:
        raise CheckpointError(f"{path} is not a simclrkit checkpoint (no format_version/encoder)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {state['format_version']}; this simclrkit reads up to "
            f"{FORMAT_VERSION}: upgrade simclrkit"
        )
    return state


class CheckpointManager:
    """Writes ``step-NNNNNNNNN.pt`` files plus ``last.pt`` and keeps the newest ``keep_last``.

    ``last.pt`` is always a complete copy of the newest checkpoint (written atomically), so
    tools can load one stable name; step files exist for retention and inspection.
    """

    def __init__(self, folder: str | os.PathLike, keep_last: int = 2):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def save(self, state: dict, step: int) -> Path:
        state = {"format_version": FORMAT_VERSION, **state}
        path = self.folder / f"step-{step:09d}.pt"
        atomic_save(state, path)
        atomic_save(state, self.folder / "last.pt")
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def step_files(self) -> list[Path]:
        """Complete step checkpoints, oldest first (temporary files are never listed)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _STEP_NAME.match(p.name))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        last = self.folder / "last.pt"
        if last.is_file():
            return last
        files = self.step_files()
        return files[-1] if files else None
