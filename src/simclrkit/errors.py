"""The errors a user can cause, and how the command line reports them.

Every mistake in what a user hands simclrkit (a config, a file, a folder, a checkpoint, a
disk) raises a :class:`UserError` subclass whose message names the thing and the fix; the
command line prints it as one line and exits with :data:`EXIT_USER_ERROR`. Errors the
operating system raises about files and disks (:class:`OSError`) and an allocation the
machine cannot serve (:class:`MemoryError`) are user errors too: :func:`describe` turns them
into the same one-line form. Anything else is a bug in simclrkit and keeps its traceback
(exit 1).
"""

from __future__ import annotations

import errno
import os

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the input (config, files, folders, checkpoints, disk), not a bug."""


# What to do about the operating-system errors users meet, by errno.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space (the last complete checkpoint is intact)",
    errno.EDQUOT: "the disk quota is used up; free space (the last complete checkpoint is intact)",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you may write to, or fix its permissions",
    errno.EPERM: "operation not permitted; check the file's owner and permissions",
    errno.EISDIR: "it is a folder where a file is expected; name a file",
    errno.ENOTDIR: "a part of the path is a file where a folder is expected",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.EIO: "the device reported an I/O error; check the disk",
}


def describe(error: BaseException) -> str:
    """One line for a user error: the message of a :class:`UserError`, or the file, the
    system's reason and the fix for an :class:`OSError`, or the fix for a failed allocation."""
    if isinstance(error, OSError):
        names = [n for n in (error.filename, error.filename2) if n is not None]
        where = " -> ".join(os.fsdecode(n) if isinstance(n, bytes) else str(n) for n in names)
        reason = error.strerror or str(error)
        hint = _OS_HINTS.get(error.errno or 0)
        return f"{where + ': ' if where else ''}{reason}" + (f" ({hint})" if hint else "")
    if isinstance(error, MemoryError):
        return (
            "out of memory: the run asks for more memory than this machine has; lower "
            "train.batch_size (or set train.micro_batch_size), data.image_size or model.width"
        )
    return str(error)
