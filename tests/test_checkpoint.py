"""Checkpoints: atomic writes, retention, and refusal of files that would run code."""

import os
import pickle

import pytest
import torch

from simclrkit.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    load_checkpoint,
    safe_load,
)


def test_round_trip_is_exact(tmp_path):
    state = {"encoder": {"w": torch.randn(3, 4)}, "step": 5, "config": {"a": [1, 2.5, "x"]}}
    CheckpointManager(tmp_path).save(state, 5)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["encoder"]["w"], state["encoder"]["w"])
    assert loaded["step"] == 5 and loaded["config"] == state["config"]
    assert loaded["format_version"] == 1


def test_retention_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save({"encoder": {}, "step": step}, step)
    names = [p.name for p in manager.step_files()]
    assert names == ["step-000000030.pt", "step-000000040.pt"]
    assert load_checkpoint(manager.latest())["step"] == 40


class _FailingWrite:
    """Pickled inside torch.save; raises midway, as a full disk would."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_error_during_save_keeps_previous_file_and_leaves_no_debris(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"encoder": {"w": torch.ones(2)}, "format_version": 1, "step": 1}, path)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"encoder": {"w": torch.zeros(2)}, "bad": _FailingWrite()}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["encoder"]["w"], torch.ones(2))


class _CreatesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"encoder": _CreatesAFile(str(marker))}, handle)
    # The payload is live: an unsafe load of an identical pickle does create its file.
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps({"encoder": _CreatesAFile(str(control))}))
    assert control.exists()
    with pytest.raises(CheckpointError, match="could run code"):
        safe_load(evil)
    assert not marker.exists()


def test_torch_saved_malicious_object_is_refused(tmp_path):
    marker = tmp_path / "pwned2.txt"
    evil = tmp_path / "evil2.pt"
    torch.save({"format_version": 1, "encoder": _CreatesAFile(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"format_version": 1, "encoder": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a simclrkit checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
