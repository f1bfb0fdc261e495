"""Helpers for the hostile-input suite (imported as ``hostile``): run the real command, check
how it failed, and prove that nothing that existed before was changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


def simclrkit(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m simclrkit ARGS`` as a real process, to completion."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "simclrkit", *map(str, args)], capture_output=True, text=True,
        env=env, timeout=timeout, **kwargs,
    )


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one ``simclrkit: error:`` line naming ``words``, no traceback; returns it."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("simclrkit: error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks not followed), by relative path."""
    digests = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            digests[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """Mounts a tmpfs of a given size (MB) and optionally read-only; skips where this process
    may not mount (mounting needs CAP_SYS_ADMIN). Yields ``mount(size_mb) -> Path`` and
    ``remount(path, read_only)``."""
    mounted: list[Path] = []

    class Mounts:
        def mount(self, size_mb: int) -> Path:
            point = tmp_path / f"fs{len(mounted)}"
            point.mkdir()
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)],
                capture_output=True,
            )
            if done.returncode:
                pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
            mounted.append(point)
            return point

        def remount(self, point: Path, read_only: bool) -> None:
            mode = "ro" if read_only else "rw"
            subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)

    yield Mounts()
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
