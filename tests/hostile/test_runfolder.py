"""The run folder under hostile conditions: two owners, kills, debris, wrong kinds of files,
read-only and full disks, resuming finished runs, and a last update that poisons the weights.

Every case runs the real command in a real process and checks the exit code, the one-line
message, and that what was already written is intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclrkit import runfolder
from simclrkit.checkpoint import load_checkpoint

from conftest import TINY, assert_states_equal, run_cli, wait_for_step
from hostile import assert_user_error, simclrkit, small_tmpfs, snapshot  # noqa: F401

pytestmark = pytest.mark.slow


def _strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _metrics_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(_strict_json, lines) if "loss" in r]


def test_second_process_on_a_run_folder_is_refused_with_the_holders_pid(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(["pretrain", "--run-dir", str(run_dir), *TINY, "train.max_steps=5000"])
    try:
        wait_for_step(run_dir, 1, first)
        before = snapshot(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else {}
        second = simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *TINY)
        line = assert_user_error(second, "in use by process", str(first.pid), str(run_dir))
        assert "choose another --run-dir" in line
        # the same with --resume: still one owner
        assert_user_error(simclrkit("pretrain", "--run-dir", run_dir, "--resume", *TINY),
                          str(first.pid))
        assert first.poll() is None, "the holder must be unaffected"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    steps = _metrics_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), "only the holder wrote metrics"
    assert set(before) <= set(snapshot(run_dir / "checkpoints")) | {"last.pt"}


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=30", "train.checkpoint_every=1"]
    first = run_cli(["pretrain", "--run-dir", str(run_dir), *overrides])
    wait_for_step(run_dir, 2, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (run_dir / runfolder.LOCK_NAME).exists(), "the lock file stays; the lock does not"
    # The kernel dropped the lock with the process: the next owner simply runs.
    resumed = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert "in use" not in resumed.stderr
    assert _metrics_steps(run_dir) == list(range(1, 31))


def test_torchrun_job_stops_on_every_rank_when_the_folder_is_held(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
    from torchrun_helpers import start_torchrun

    run_dir = tmp_path / "run"
    with runfolder.claim(run_dir):
        started = time.monotonic()
        job = start_torchrun(run_dir, ["train.max_steps=4"])
        out, err = job.communicate(timeout=240)
    assert job.returncode != 0
    assert err.count(f"in use by process {os.getpid()}") >= 2, err  # both ranks say why
    assert "Traceback" not in "\n".join(
        line for line in err.splitlines() if "simclrkit" in line and "error" in line
    )
    assert time.monotonic() - started < 200, "no rank may wait for a collective timeout"
    assert not (run_dir / "metrics.jsonl").exists()


def test_ranks_of_one_torchrun_job_share_the_lock(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
    from torchrun_helpers import start_torchrun

    run_dir = tmp_path / "run"
    job = start_torchrun(run_dir, ["train.max_steps=3"])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert _metrics_steps(run_dir) == [1, 2, 3]
    with runfolder.claim(run_dir):  # released at the end of the job
        pass


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_bytes(b"my notes")
    assert_user_error(simclrkit("pretrain", "--run-dir", path, *TINY), str(path), "is a file")
    assert path.read_bytes() == b"my notes"


def test_last_pt_that_is_a_folder_is_refused_before_training(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "last.pt").mkdir(parents=True)
    started = time.monotonic()
    result = simclrkit("pretrain", "--run-dir", run_dir, *TINY)
    assert_user_error(result, "last.pt", "is a folder")
    assert not (run_dir / "metrics.jsonl").exists(), "refused before any training"
    assert time.monotonic() - started < 60


def test_temporary_files_of_a_killed_save_are_removed_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *TINY,
                     "train.max_steps=3").returncode == 0
    debris = [run_dir / "checkpoints" / ".tmp-abc123.pt", run_dir / ".tmp-xyz.json"]
    for path in debris:
        path.write_bytes(b"\0" * 1000)  # what a SIGKILL during atomic_write leaves
    keep = run_dir / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    assert simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *TINY,
                     "train.max_steps=3").returncode == 0
    assert not any(path.exists() for path in debris)
    assert keep.read_text() == "mine"


def test_resuming_a_finished_run_reproduces_its_summary(tmp_path):
    run_dir = tmp_path / "run"
    args = ("pretrain", "--run-dir", run_dir, "--quiet", *TINY, "eval.linear=true",
            "eval.random_init_baseline=false")
    assert simclrkit(*args).returncode == 0
    first = _strict_json((run_dir / "summary.json").read_text())
    report = (run_dir / "report.md").read_text()
    checkpoints = snapshot(run_dir / "checkpoints")
    for _ in range(2):  # what a requeued job does, twice
        again = simclrkit(*args, "--resume")
        assert again.returncode == 0, again.stderr
    second = _strict_json((run_dir / "summary.json").read_text())
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert second == first
    assert isinstance(first["final_loss"], float) and first["images_per_second"] > 0
    assert (run_dir / "report.md").read_text() == report
    assert snapshot(run_dir / "checkpoints") == checkpoints
    assert _metrics_steps(run_dir) == list(range(1, 9))
    events = [r.get("event") for r in map(_strict_json, (run_dir / "metrics.jsonl")
                                          .read_text().splitlines())]
    assert events.count("eval") == 1


def test_sigterm_during_the_final_evaluation_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    # A larger encoder than TINY's, so that the evaluation (features of 5,000 digits, twice)
    # outlasts the signal's way to the process.
    overrides = [*TINY, "eval.linear=true", "model.width=0.5", "data.image_size=28"]
    process = run_cli(["pretrain", "--run-dir", str(run_dir), "--quiet", *overrides])
    wait_for_step(run_dir, 8, process)
    time.sleep(2)  # the last checkpoint is written: the evaluation (tens of seconds) is running
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    # Killed by the signal during the evaluation, or (had it come during the last checkpoint)
    # stopped with 143 before it: a signal is never swallowed.
    assert process.returncode in (-signal.SIGTERM, 143), process.returncode
    assert not (run_dir / "summary.json").exists()
    resumed = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    summary = _strict_json((run_dir / "summary.json").read_text())
    last = [r for r in map(_strict_json, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("step") == 8 and "loss" in r]
    assert summary["final_loss"] == last[-1]["loss"]
    assert summary["images_per_second"] > 0 and "linear_top1" in summary["eval"]


def test_metrics_show_each_step_once_after_kills_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=12", "train.checkpoint_every=4"]
    for target in (6, 10):  # killed between checkpoints, after logging steps past them
        process = run_cli(["pretrain", "--run-dir", str(run_dir), "--quiet", *overrides,
                           *(["--resume"] if target > 6 else [])])
        wait_for_step(run_dir, target, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 11, "loss": 0.')  # a line cut short by the kill
    done = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *overrides)
    assert done.returncode == 0, done.stderr
    assert _metrics_steps(run_dir) == list(range(1, 13))


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_is_exact(tmp_path, small_tmpfs):
    overrides = [*TINY, "train.max_steps=6", "train.checkpoint_every=3"]
    reference = tmp_path / "reference"
    assert simclrkit("pretrain", "--run-dir", reference, "--quiet", *overrides).returncode == 0
    size = (reference / "checkpoints" / "last.pt").stat().st_size

    disk = small_tmpfs.mount(64)
    run_dir = disk / "run"
    filler = disk / "filler"
    stat = os.statvfs(disk)
    # Room for the step-3 checkpoint and last.pt, not for the step-6 file.
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(2.5 * size) - 2**20))
    full = simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *overrides)
    assert_user_error(full, "No space left", "disk is full")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    saved = snapshot(run_dir / "checkpoints")

    full_again = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *overrides)
    assert_user_error(full_again, "disk is full")
    assert snapshot(run_dir / "checkpoints") == saved, "a failed save changes nothing"

    filler.unlink()
    done = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *overrides)
    assert done.returncode == 0, done.stderr
    ours, theirs = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (run_dir, reference))
    for key in ("encoder", "head", "optimizer"):
        assert_states_equal(ours[key], theirs[key], key)


def test_read_only_run_folder(tmp_path, small_tmpfs):
    disk = small_tmpfs.mount(64)
    run_dir = disk / "run"
    assert simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *TINY,
                     "train.max_steps=3").returncode == 0
    before = snapshot(run_dir)
    small_tmpfs.remount(disk, read_only=True)
    started = time.monotonic()
    resumed = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--quiet", *TINY,
                        "train.max_steps=3")
    assert_user_error(resumed, "read-only")
    assert time.monotonic() - started < 60, "refused before any work"
    fresh = simclrkit("pretrain", "--run-dir", disk / "new", "--quiet", *TINY)
    assert_user_error(fresh, "read-only", str(disk / "new"))
    assert snapshot(run_dir) == before


def test_an_update_that_makes_the_weights_non_finite_is_never_checkpointed(tmp_path):
    run_dir = tmp_path / "run"
    # Finite settings whose first update overflows float32 (weight decay x learning rate ~
    # 1e44): the loss and gradients of that step are finite, and no gradient after it exists.
    result = simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *TINY,
                       "train.max_steps=1", "optim.name=sgd", "optim.weight_decay=1e38",
                       "optim.lr=1e6", "optim.warmup_epochs=0", "train.precision=fp32")
    assert result.returncode == 3, result.stderr
    assert "made the weights non-finite" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert not (run_dir / "summary.json").exists()


def test_holder_record_names_this_process(tmp_path):
    with runfolder.claim(tmp_path / "run") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid()
        with pytest.raises(runfolder.RunFolderBusy, match=str(os.getpid())):
            runfolder.claim(tmp_path / "run")
    runfolder.claim(tmp_path / "run").release()  # free again once released


def test_a_forked_child_that_outlives_the_holder_does_not_keep_the_lock(tmp_path):
    # Loader workers are forked children: after the holder's SIGKILL they live on a moment,
    # and must not keep the folder locked (flock is shared with a child's descriptor copies).
    script = (
        "import os, sys, time\n"
        "from simclrkit import runfolder\n"
        f"lock = runfolder.claim({str(tmp_path / 'run')!r})\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(runfolder.RunFolderBusy):
            runfolder.claim(tmp_path / "run")
        holder.kill()  # the holder only: its child sleeps on
        holder.wait(timeout=30)
        runfolder.claim(tmp_path / "run").release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
