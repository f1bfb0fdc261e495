"""Owning a run folder: one process (one torchrun job) at a time, checked before any work.

Two ``pretrain`` processes pointed at one ``--run-dir`` would interleave their metrics and
overwrite each other's checkpoints. :func:`claim` takes an exclusive advisory lock
(``flock``) on ``RUN_DIR/.lock`` and holds it for the run's life. The kernel releases it when
the process ends in any way (exit, crash, SIGKILL, a node reboot), so a stale lock cannot
exist and nothing has to be cleaned up; the file itself stays (deleting it would let a third
process lock a fresh file while the second still holds the old one). A second process finds
the lock taken and stops with exit 2 naming the holder's pid and host, which the holder
wrote into the file.

Under torchrun only rank 0 writes into the run folder, so rank 0 alone takes the lock and
tells the others whether it got it (:func:`claim_for_job`); a torchrun restart ends the old
workers, whose lock the kernel releases, before the new ones claim it. ``flock`` is honoured
across the nodes of NFSv4 and Lustre mounts (Linux maps it to a POSIX lock there); on file
systems without any locking the claim fails with a clear error rather than silently not
locking.

While it holds the lock, the claimant also checks that the folder's fixed names are not of
the wrong kind (``checkpoints/last.pt`` a folder would otherwise be found only when the first
checkpoint is written, after hours of training) and removes the temporary files (``.tmp-*``)
that a process killed in the middle of an atomic write left behind: with the lock held, no
other process can be writing them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from simclrkit import distributed
from simclrkit.config import ConfigError
from simclrkit.errors import UserError, describe

LOCK_NAME = ".lock"

# Names the run writes, and the kind each must be when it already exists.
_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "report.md", "bad_files.txt",
    "data_index.npz", "checkpoints/last.pt",
)
_FOLDERS = ("checkpoints", "tb", "plots", "eval")


# Descriptors of the locks this process holds. A forked child (a loader worker) shares the
# lock's open file, and flock is released only when every descriptor of it is closed: a worker
# still alive after its parent's SIGKILL would keep the folder locked. Each child closes its
# copies at once, so the lock lives exactly as long as the process that took it.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """The held lock; :meth:`release` (or the process ending) gives it up."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_kinds(run_dir: Path) -> None:
    for names, right_kind, wrong in (
        (_FILES, Path.is_file, "a folder (or another non-file) where the run writes a file"),
        (_FOLDERS, Path.is_dir, "a file where the run writes a folder"),
    ):
        for name in names:
            path = run_dir / name
            if path.exists() and not right_kind(path):
                raise ConfigError(
                    f"--run-dir: {path} is {wrong}; remove or rename it, or choose another "
                    "--run-dir"
                )


def _remove_debris(run_dir: Path) -> list[Path]:
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            for path in folder.glob(".tmp-*"):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"process {info['pid']} on {info['host']} (since {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def claim(run_dir: str | os.PathLike) -> RunFolderLock:
    """Creates ``run_dir`` if needed and takes its lock; checks names, removes debris.

    Raises:
        RunFolderBusy: another live process holds the lock (exit 2 naming it).
        ConfigError: ``run_dir`` is a file, or a name in it is of the wrong kind.
        OSError: the folder cannot be created or written (read-only, full, no permission).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: {run_dir} is a file; name a folder (new or a run's)")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunFolderBusy(
                f"--run-dir: {run_dir} is in use by {_holder(path)}; wait for it to finish, "
                "stop it, or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _check_kinds(run_dir)
        _remove_debris(run_dir)
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
    return RunFolderLock(path, fd)


def claim_for_job(run_dir: str | os.PathLike, info: distributed.DistInfo) -> RunFolderLock:
    """:func:`claim` by rank 0 for the whole job; every process raises if it failed.

    Raises:
        ConfigError: on every process, with rank 0's reason, when rank 0 could not claim.
    """
    lock, failure = RunFolderLock(Path(run_dir) / LOCK_NAME, None), None
    if info.is_main:
        try:
            lock = claim(run_dir)
        except (UserError, OSError) as error:
            if info.world_size == 1:
                raise
            failure = describe(error)
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise ConfigError(failure)
    return lock
