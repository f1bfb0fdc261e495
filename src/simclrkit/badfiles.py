"""Bad files found during training: counted over every process, warned once, bounded.

Files go bad during a run (a network filesystem's error, a file replaced or truncated after
the index was built; RELIABILITY.md §12). The stream replaces each such read by another
image (``filebatches.py``) and reports it; this ledger counts those reports exactly:

* every process adds what its own batches reported (:meth:`BadFileLedger.add`);
* at every step that logs or checkpoints, :meth:`BadFileLedger.sync` sums the counts of all
  processes and gathers the new bad files (one small collective), so every process holds the
  same totals, the checkpoint stores them, and a resumed run continues them exactly;
* the main process warns once per bad file and keeps the complete list in
  ``RUN_DIR/bad_files.txt`` (tab-separated path and reason, rewritten atomically);
* when the bad reads exceed ``max_bad_fraction`` of all reads (after a minimum sample of
  ``min(1000, N)`` reads, so that one early bad file does not stop a run), every process
  raises :class:`TooManyBadFiles` at the same step: exit code 2, with the files named.

The fraction is over reads, not files: every file is read once per epoch, so bad reads over
reads estimates the share of bad files while the run is in its first epoch and stays that
share after it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simclrkit import distributed
from simclrkit.config import ConfigError
from simclrkit.imagefiles import BadImageWarning

MIN_READS = 1000
_NAMED = 20  # files named in messages and summaries


class TooManyBadFiles(ConfigError):
    """More of the files read so far were unreadable than ``data.max_bad_fraction`` allows."""


class BadFileLedger:
    """The run's count of reads and bad reads, identical on every process after each sync.

    Args:
        max_bad_fraction: the largest share of bad reads that is tolerated.
        num_examples: images in the dataset (sets the minimum sample).
        describe: dataset index -> the file's path, for messages and the list.
        list_path: where the main process keeps the list of bad files (None: nowhere).
        is_main: whether this process warns and writes.
        state: a checkpoint's :meth:`state_dict`, to continue its counts.
    """

    def __init__(
        self,
        max_bad_fraction: float,
        num_examples: int,
        describe: Callable[[int], str],
        *,
        list_path: Path | None = None,
        is_main: bool = True,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_reads = min(MIN_READS, num_examples)
        self.describe = describe
        self.list_path = list_path
        self.is_main = is_main
        state = state or {}
        self.reads = int(state.get("reads", 0))
        self.bad_reads = int(state.get("bad_reads", 0))
        self.bad: dict[int, str] = {int(k): v for k, v in state.get("bad", {}).items()}
        self._pending_reads = 0
        self._pending: list[tuple[int, str]] = []

    def add(self, reads: int, bad: Sequence[tuple[int, str]]) -> None:
        """What one batch of this process reported (no communication)."""
        self._pending_reads += reads
        self._pending.extend(bad)

    def sync(self) -> None:
        """Folds every process's reports into the totals; a collective: call on all of them.

        Raises:
            TooManyBadFiles: on every process alike, when the bad share exceeds the limit.
        """
        pending = self._pending
        reads, bad_reads = distributed.all_reduce_sum([self._pending_reads, len(pending)])
        self._pending_reads, self._pending = 0, []
        self.reads += reads
        self.bad_reads += bad_reads
        if bad_reads:
            found = [entry for part in distributed.all_gather_objects(pending) for entry in part]
            new = {}
            for index, reason in found:
                if index not in self.bad and index not in new:
                    new[index] = reason
            self.bad.update(new)
            if self.is_main and new:
                for index, reason in new.items():
                    warnings.warn(
                        f"skipping image {self.describe(index)}: {reason} (replaced by another "
                        "image for this step)", BadImageWarning, stacklevel=2,
                    )  # fmt: skip
                self._write_list()
        if self.reads >= self.min_reads and self.bad_reads > self.max_bad_fraction * self.reads:
            raise TooManyBadFiles(self._refusal())

    def _write_list(self) -> None:
        if self.list_path is None:
            return
        from simclrkit.checkpoint import atomic_write

        text = "".join(f"{self.describe(i)}\t{r}\n" for i, r in sorted(self.bad.items()))
        atomic_write(self.list_path, lambda handle: handle.write(text.encode("utf-8", "replace")))

    def _refusal(self) -> str:
        share = self.bad_reads / self.reads
        named = "; ".join(f"{self.describe(i)}: {r}" for i, r in sorted(self.bad.items())[:_NAMED])
        more = f"; ... and {len(self.bad) - _NAMED} more" if len(self.bad) > _NAMED else ""
        where = f" in {self.list_path}" if self.list_path is not None else ""
        return (
            f"data.max_bad_fraction: {self.bad_reads} of the {self.reads} image reads so far "
            f"({share:.2%}) failed, more than the allowed {self.max_bad_fraction:.2%}; "
            f"{len(self.bad)} bad files (all listed{where}): {named}{more}. "
            "Fix or remove them and resume with --resume (the last checkpoint is from before "
            "this step), or raise data.max_bad_fraction"
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints and strings) for the checkpoint: the totals as of the last sync."""
        return {
            "reads": self.reads,
            "bad_reads": self.bad_reads,
            "bad": {str(index): reason for index, reason in self.bad.items()},
        }

    def summary(self) -> dict[str, Any]:
        """For ``summary.json`` and the report."""
        return {
            "reads": self.reads,
            "bad_reads": self.bad_reads,
            "bad_files": len(self.bad),
            "bad_files_named": [
                {"path": self.describe(i), "reason": r} for i, r in sorted(self.bad.items())[:_NAMED]
            ],
        }
