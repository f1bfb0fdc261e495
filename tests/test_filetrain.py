"""Pretraining on image files, end to end in real processes with real signals: exact resume
on folders and shards with and without workers, SIGTERM to the whole process group, files
that go bad after the index was built, and a resume on a changed folder."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from simclrkit.checkpoint import load_checkpoint
from simclrkit.config import ConfigError, load_config
from simclrkit.index import load_index
from simclrkit.pack import pack
from simclrkit.report import read_metrics
from simclrkit.train import pretrain

from conftest import assert_states_equal, run_cli, wait_for_step, write_jpeg_tree

pytestmark = pytest.mark.slow

# 40 JPEGs of about 64 x 48, views of 16 px (so most decodes are reduced), 5 steps an epoch.
FILES = [
    "model.width=0.125",
    "data.image_size=16",
    "train.batch_size=8",
    "train.max_steps=10",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "optim.warmup_epochs=0.02",
    "eval.linear=false",
    "train.precision=fp32",
]
_COMPARED = ("step", "encoder", "head", "optimizer", "schedule", "rng", "bad_files")
_TIMEOUT = 300


def _final(run_dir) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return {key: state[key] for key in _COMPARED}


def _finish(process, code: int = 0) -> tuple[str, str]:
    out, err = process.communicate(timeout=_TIMEOUT)
    assert process.returncode == code, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{"folder": [...overrides], "shards": [...]}: the same 40 images as a folder and packed."""
    base = tmp_path_factory.mktemp("files")
    write_jpeg_tree(base / "photos", classes=2, per_class=20, size=(64, 48))
    pack("folder", base / "photos", base / "shards", quiet=True, workers=1)
    return {
        "folder": ["data.dataset=folder", f"data.root={base / 'photos'}"],
        "shards": ["data.dataset=shards", f"data.root={base / 'shards'}"],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _finish(run_cli(["pretrain", "--run-dir", str(run_dir), *FILES, *data["folder"],
                     "data.num_workers=0"]))  # fmt: skip
    return _final(run_dir)


def test_shards_packed_from_a_folder_train_exactly_as_the_folder(tmp_path, data, reference):
    # pack stores these small JPEGs byte for byte, so the shards hold the very same images.
    _finish(run_cli(["pretrain", "--run-dir", str(tmp_path / "run"), *FILES, *data["shards"],
                     "data.num_workers=0"]))  # fmt: skip
    assert_states_equal(_final(tmp_path / "run"), reference)


@pytest.mark.parametrize("kind, workers, where", [
    ("folder", 0, "host"), ("folder", 2, "host"), ("shards", 0, "host"), ("shards", 2, "host"),
    ("folder", 2, "device"),  # the split pipeline: the colour half after the crops cross
])  # fmt: skip
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, data, reference, kind, workers, where):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *FILES, *data[kind],
            f"data.num_workers={workers}", f"data.augment_on={where}"]  # fmt: skip
    kill_at = random.Random(f"{kind}{workers}{where}").choice([4, 5, 7, 8])  # between checkpoints
    process = run_cli(args)
    wait_for_step(run_dir, kill_at, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] < 10
    _finish(run_cli([*args, "--resume"]))
    # the same for any worker count, and where the colour half runs (on the CPU the device
    # half runs the same compiled kernels)
    assert_states_equal(_final(run_dir), reference)


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_jpegs_decoded_on_the_device_resume_exactly(tmp_path, data, kind):
    # data.decode_on=device: the workers only read, the device (here the CPU's torchvision
    # decoder) decodes in full where Pillow decodes at a reduced scale, so the reference is
    # an uninterrupted run of the same settings.
    settings = [*FILES, *data[kind], "data.num_workers=2", "data.augment_on=device",
                "data.decode_on=device"]  # fmt: skip
    _finish(run_cli(["pretrain", "--run-dir", str(tmp_path / "whole"), *settings]))
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *settings]
    process = run_cli(args)
    wait_for_step(run_dir, 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _finish(run_cli([*args, "--resume"]))
    assert_states_equal(_final(run_dir), _final(tmp_path / "whole"))


def test_sigterm_to_the_whole_process_group_with_workers(tmp_path, data, reference):
    # What SLURM's --signal=TERM does: every process of the job, DataLoader workers included.
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *FILES, *data["folder"],
            "data.num_workers=2", "train.checkpoint_every=100"]  # fmt: skip
    process = run_cli(args, start_new_session=True)
    wait_for_step(run_dir, 2, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = _finish(process, 143)
    assert "Traceback" not in err and "--resume" in err
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped < 10
    _finish(run_cli([*args, "--resume"]))
    assert_states_equal(_final(run_dir), reference)


def _damage(paths, truncate=(), delete=()) -> set[str]:
    for path in truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    for path in delete:
        path.unlink()
    return {str(p) for p in (*truncate, *delete)}


def test_files_broken_after_the_index_are_replaced_counted_and_the_run_finishes(tmp_path):
    files = write_jpeg_tree(tmp_path / "photos", classes=2, per_class=20, size=(64, 48))
    index = tmp_path / "index.npz"
    assert run_cli(["index", str(tmp_path / "photos"), "--out", str(index)]).wait() == 0
    damaged = _damage(files, truncate=files[3:5], delete=files[30:31])
    run_dir = tmp_path / "run"
    _, err = _finish(run_cli(["pretrain", "--run-dir", str(run_dir), *FILES, "data.dataset=folder",
                              f"data.index={index}", "data.max_bad_fraction=0.2"]))  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())["data"]
    # Two epochs: every file was read, each damaged one found; every slot got a good image.
    assert summary["bad_files"] == 3 and summary["reads"] - summary["bad_reads"] == 10 * 8
    assert {entry["path"] for entry in summary["bad_files_named"]} == damaged
    listed = (run_dir / "bad_files.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in listed} == damaged
    assert "no such file" in " ".join(listed) and "truncated" in " ".join(listed)
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["bad_files"] == 3
    assert sum(path in err for path in damaged) == 3  # one warning each


def test_more_bad_files_than_allowed_stop_the_run_with_exit_2_and_their_names(tmp_path):
    files = write_jpeg_tree(tmp_path / "photos", classes=2, per_class=20, size=(64, 48))
    run_dir = tmp_path / "run"
    process = run_cli(["pretrain", "--run-dir", str(run_dir), *FILES, "data.dataset=folder",
                       f"data.root={tmp_path / 'photos'}"])  # fmt: skip
    wait_for_step(run_dir, 1, process)
    damaged = _damage(files, truncate=files[::5])  # 8 of 40 while it runs; 1% allowed
    _, err = _finish(process, 2)
    assert "data.max_bad_fraction" in err and "Traceback" not in err
    assert any(path in err for path in damaged)
    listed = {line.split("\t")[0] for line in (run_dir / "bad_files.txt").read_text().splitlines()}
    assert listed and listed <= damaged


def test_a_resume_on_a_changed_folder_is_refused_unless_the_recorded_list_or_force(
    tmp_path, data, reference
):
    photos = tmp_path / "photos"
    write_jpeg_tree(photos, classes=2, per_class=20, size=(64, 48))  # the fixture's images
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *FILES, "data.dataset=folder",
            f"data.root={photos}", "data.num_workers=0"]  # fmt: skip
    process = run_cli(args)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    _finish(process, 143)
    write_jpeg_tree(photos / "new", classes=1, per_class=1, seed=3)  # one file more

    _, err = _finish(run_cli([*args, "--resume"]), 2)
    assert "the data changed since the run started: 40 -> 41 images: 1 file added" in err
    assert "new/train/class0/000.jpg" in err and "Traceback" not in err
    # Continuing on the recorded list is exact: the new file is not in it.
    _finish(run_cli([*args, "--resume", f"data.index={run_dir / 'data_index.npz'}"]))
    assert_states_equal(_final(run_dir), reference)


def test_force_trains_on_the_folder_as_it_is_now(tmp_path):
    photos = tmp_path / "photos"
    write_jpeg_tree(photos, classes=1, per_class=16, size=(40, 30))
    overrides = [*FILES, "data.dataset=folder", f"data.root={photos}", "train.max_steps=4",
                 "train.checkpoint_every=2"]  # fmt: skip
    config = load_config("mnist5k", overrides)
    pretrain(config, tmp_path / "run", quiet=True)
    (photos / "train" / "class0" / "000.jpg").unlink()
    with pytest.raises(ConfigError, match="1 file removed"):
        pretrain(config, tmp_path / "run", resume=True, quiet=True)
    pretrain(config, tmp_path / "run", resume=True, force=True, quiet=True)
    assert len(load_index(tmp_path / "run" / "data_index.npz")) == 15
