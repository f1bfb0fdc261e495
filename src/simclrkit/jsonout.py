"""Strict JSON for every file simclrkit writes.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader
accepts (JavaScript's ``JSON.parse``, ``jq``, most languages' standard parsers). A value that
is not a finite number has no JSON spelling, so it is written as ``null``: "no value".
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become null)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Writes ``value`` as strict JSON, atomically (a reader sees the old file or the new)."""
    from simclrkit.checkpoint import atomic_write

    text = dumps(value, indent=indent) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
