"""What a training loop does besides its maths: progress, the metrics log, stop requests.

Shared by pretraining (``train.py``) and distillation (``distill.py``):

* :class:`StopRequests` turns SIGTERM/SIGINT into a flag checked between steps (a second
  SIGINT aborts); the loop then checkpoints and raises :class:`Preempted`, which the command
  turns into exit code :data:`EXIT_PREEMPTED`;
* :class:`RunLog` appends ``metrics.jsonl`` and TensorBoard events, and on resume drops what a
  stopped run logged after its checkpoint;
* :class:`Progress` is a tqdm bar on a terminal and plain lines elsewhere.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from simclrkit import jsonout
from simclrkit.checkpoint import atomic_write

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a process stopped by SIGTERM


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGINT after checkpointing at ``step``."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written")
        self.step = step


class StopRequests:
    """Turns SIGTERM/SIGINT into a flag checked between steps; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (CI and log files), nothing if quiet."""

    def __init__(self, total: int, initial: int, quiet: bool, log_every: int) -> None:
        self.total, self.initial, self.quiet, self.log_every = total, initial, quiet, log_every
        self.started = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(
        self, step: int, record: dict[str, float] | None, watched: dict[str, float]
    ) -> None:
        """``watched``: the newest monitor measurement (``monitors.py``), shown beside."""
        shown = {key: watched[key] for key in _WATCHED if key in watched}
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                self.bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.3g}",
                    img_s=f"{record['images_per_second']:.0f}",
                    **_step_shares(record),
                    **{_WATCHED[key]: f"{value:.3f}" for key, value in shown.items()},
                )
        elif record is not None and not self.quiet:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            print(
                f"step {step}/{self.total}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}"
                + "".join(f"  {short} {record[key]:.3f}" for key, short in _ACCURACIES.items()
                          if key in record)
                + f"  lr {record['lr']:.4g}"
                + "".join(f"  {_WATCHED[key]} {value:.3f}" for key, value in shown.items())
                + f"  {record['images_per_second']:.0f} img/s"
                + "".join(f"  {key} {value}" for key, value in _step_shares(record).items())
                + f"  eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _step_shares(record: dict[str, Any]) -> dict[str, str]:
    """What the step waited for (and, on a known GPU, MFU), as the progress line shows them."""
    shown = {"data": f"{record['data_wait_share']:.0%}"} if "data_wait_share" in record else {}
    if "mfu" in record:
        shown["mfu"] = f"{record['mfu']:.0%}"
    return shown


# Accuracies of the step itself on the plain progress line (pretraining's, distillation's).
_ACCURACIES = {"contrastive_acc": "acc", "teacher_agreement": "agree"}
# Monitor values on the progress line, by their short names there.
_WATCHED = {"probe_top1": "probe", "knn_top1": "knn", "rankme": "rank"}


class RunLog:
    """``metrics.jsonl`` (append-only) and TensorBoard, written by the main process only.

    A resumed run repeats the steps after its checkpoint, so on resume the lines a stopped run
    logged after that step (and a final evaluation that is about to be redone) are dropped
    first, as is a line cut short by a kill: the file shows each step once after any number
    of resumes, as TensorBoard does with ``purge_step``.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_at: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resumed_at is not None and self.path.exists():
                self._truncate(resumed_at)

            # purge_step drops events a killed run logged after its last checkpoint.
            self.tensorboard = SummaryWriter(run_dir / "tb", purge_step=resumed_at)

    def write(
        self, record: dict[str, Any], scalars: tuple[str, ...] = (), prefix: str = ""
    ) -> None:
        """Appends ``record`` as one line; logs its ``scalars`` to TensorBoard at its step."""
        if not self.enabled:
            return
        # Append-only, one flushed line per record: a crash loses at most the line being written.
        with open(self.path, "a") as handle:
            handle.write(jsonout.dumps(record) + "\n")
            handle.flush()
        for key in scalars:
            self.tensorboard.add_scalar(f"{prefix}{key}", record[key], record["step"])

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by a kill
            at = record.get("step", 0) if isinstance(record, dict) else 0
            if at > step or (at == step and record.get("event") == "eval"):
                continue
            kept.append(line + "\n")
        text = "".join(kept)
        atomic_write(self.path, lambda handle: handle.write(text.encode()))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
