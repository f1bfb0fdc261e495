"""``torchrun --nproc_per_node=2 -m simclrkit distill``: two processes distil what one does, and
a stop signal to one rank stops both at the same step and resumes exactly.

Real processes on the CPU (gloo). The labelled loss is on (``distill.alpha=0.5``), so both the
unlabelled rows and the labelled rows are split over the ranks.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from torchrun_helpers import (
    checkpoint_steps,
    load,
    logged_step,
    relative_difference,
    start_single,
    start_torchrun,
    wait_for,
    worker_pids,
)

from conftest import assert_states_equal, write_teacher

pytestmark = pytest.mark.slow

STEPS = ["train.max_steps=12", "train.checkpoint_every=4", "distill.alpha=0.5"]
RARE_CHECKPOINTS = ["train.max_steps=12", "train.checkpoint_every=100", "distill.alpha=0.5"]
_PARTS = ("encoder", "classifier")
_COMPARED = ("step", *_PARTS, "optimizer", "schedule", "rng")
_TIMEOUT = 300


def _finish(process, what: str) -> str:
    out, err = process.communicate(timeout=_TIMEOUT)
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{err[-3000:]}"
    return out


def _records(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, teacher):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    overrides = [*STEPS, f"distill.teacher={teacher}"]
    _finish(start_torchrun(run_dir, overrides, command="distill"), "2-process distillation")
    return run_dir


def test_two_processes_distil_as_one_process(two_process_run, teacher, tmp_path):
    one = tmp_path / "one"
    out = _finish(start_single(one, [*STEPS, f"distill.teacher={teacher}"], command="distill"),
                  "1-process distillation")  # fmt: skip
    assert "test top-1: student" in out
    # float32 sums in another order on 2 processes; SyncBN gives both the global batch's
    # statistics, DDP the global batch's gradient.
    assert relative_difference(load(two_process_run, 4), load(one, 4), _PARTS) < 1e-4
    two_records, one_records = _records(two_process_run), _records(one)
    two_losses = [r["loss"] for r in two_records if "loss" in r]
    one_losses = [r["loss"] for r in one_records if "loss" in r]
    assert len(two_losses) == 12  # rank 0 alone wrote the log, each step once
    for two, single in zip(two_losses[:4], one_losses[:4]):
        assert abs(two - single) <= 1e-5 * abs(single)  # the logged loss is the global one
    assert [r["event"] for r in two_records if "event" in r] == ["start", "eval"]

    # The comparison can fail: without SyncBN each process normalises its own half batch.
    local_bn = tmp_path / "local_bn"
    _finish(start_torchrun(local_bn, [*STEPS, f"distill.teacher={teacher}", "train.sync_bn=false"],
                           command="distill"), "2-process distillation without SyncBN")  # fmt: skip
    assert relative_difference(load(local_bn, 4), load(one, 4), _PARTS) > 1e-3


def test_sigterm_to_one_rank_stops_both_and_resumes_exactly(two_process_run, teacher, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*RARE_CHECKPOINTS, f"distill.teacher={teacher}"]
    process = start_torchrun(run_dir, overrides, command="distill")
    ranks = worker_pids(process.pid)
    wait_for(lambda: logged_step(run_dir) >= 2, process, what="step 2")
    os.kill(ranks[1], signal.SIGTERM)
    _, err = process.communicate(timeout=_TIMEOUT)
    assert process.returncode == 1, err[-3000:]  # torchrun's code for failed workers
    stops = re.findall(r"simclrkit: stopped by (.+?) after step (\d+)", err)
    assert sorted(name for name, _ in stops) == ["SIGTERM", "a signal to another process"]
    (step,) = {int(step) for _, step in stops}  # the same step on both ranks
    assert 2 <= step < 12 and checkpoint_steps(run_dir) == [step]
    assert not re.search(r"\[rank\d\]: Traceback", err)  # a clean stop, not a crash

    _finish(start_torchrun(run_dir, overrides, extra=["--resume"], command="distill"),
            "resumed 2-process distillation")  # fmt: skip
    final, reference = load(run_dir), load(two_process_run)
    assert_states_equal({k: final[k] for k in _COMPARED}, {k: reference[k] for k in _COMPARED})
