"""Pretraining: learning, determinism, exact resume after SIGKILL/SIGTERM, non-finite policy.

Interruption tests use real processes and real signals; comparisons are tensor by tensor.
"""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch

from simclrkit import train as train_module
from simclrkit.checkpoint import load_checkpoint
from simclrkit.cli import main
from simclrkit.config import load_config
from simclrkit.report import read_metrics
from simclrkit.train import NonFiniteLossError, pretrain

from conftest import TINY, assert_states_equal, run_cli, wait_for_step

_COMPARED = ("step", "encoder", "head", "optimizer", "schedule", "rng")


def _final_state(run_dir) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return {key: state[key] for key in _COMPARED}


def _reference_run(tmp_path_factory, workers: int) -> dict:
    run_dir = tmp_path_factory.mktemp(f"reference{workers}")
    process = run_cli(["pretrain", "--run-dir", str(run_dir), *TINY, f"data.num_workers={workers}"])
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return _final_state(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference_run(tmp_path_factory, 0)


def test_same_seed_same_weights_other_seed_different(tmp_path, reference):
    cfg = load_config("mnist5k", TINY)
    pretrain(cfg, tmp_path / "a", quiet=True)
    assert_states_equal(_final_state(tmp_path / "a"), reference)  # in-process == subprocess
    other = load_config("mnist5k", [*TINY, "seed=1"])
    pretrain(other, tmp_path / "b", quiet=True)
    b = _final_state(tmp_path / "b")
    assert not torch.equal(b["encoder"]["conv1.weight"], reference["encoder"]["conv1.weight"])


@pytest.mark.parametrize("workers, where", [(0, "host"), (2, "host"), (0, "device")])
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, reference, workers, where):
    # where="device": the split pipeline (uint8 images cross, the device renders the views);
    # on the CPU its device half runs the host path's kernels, so the reference is the same
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *TINY, f"data.num_workers={workers}",
            f"data.augment_on={where}"]  # fmt: skip
    # Kill between checkpoints (every 3 steps) so the resumed run must redo steps.
    kill_at = random.Random(f"{workers}{where}").choice([4, 5, 7])
    process = run_cli(args)
    wait_for_step(run_dir, kill_at, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] < 8

    resumed = run_cli([*args, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_states_equal(_final_state(run_dir), reference)
    # the log continued instead of being overwritten: both runs' records are there
    events = [json.loads(l).get("event") for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("resume") == 1
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 9))


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run_dir), *TINY]
    process = run_cli(args)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "--resume" in err and "Traceback" not in err
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped < 8  # the step in flight was finished and saved, not a later one

    resumed = run_cli([*args, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_states_equal(_final_state(run_dir), reference)


def test_resume_refuses_changed_settings_unless_forced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--run-dir", str(run_dir), "--quiet", *TINY, "train.max_steps=2"]) == 0
    code = main(["pretrain", "--run-dir", str(run_dir), "--quiet", "--resume", *TINY,
                 "train.max_steps=2", "loss.temperature=0.3"])
    err = capsys.readouterr().err
    assert code == 2 and "loss.temperature: 0.4 -> 0.3" in err and "--force" in err
    # starting over in a folder that holds a run is refused too: nothing is overwritten
    code = main(["pretrain", "--run-dir", str(run_dir), "--quiet", *TINY])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    # operational settings may change
    assert main(["pretrain", "--run-dir", str(run_dir), "--quiet", "--resume", *TINY,
                 "train.max_steps=2", "train.log_every=2"]) == 0


def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    poison_at = 5  # 1-based step whose loss is NaN

    class PoisonedLoss(train_module.NTXentLoss):
        calls = 0

        def forward(self, z1, z2):
            PoisonedLoss.calls += 1
            loss = super().forward(z1, z2)
            return loss * float("nan") if PoisonedLoss.calls == poison_at else loss

    monkeypatch.setattr(train_module, "NTXentLoss", PoisonedLoss)
    cfg = load_config("mnist5k", TINY)
    with pytest.raises(NonFiniteLossError, match=f"step {poison_at}"):
        pretrain(cfg, tmp_path / "run", quiet=True)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 3  # checkpoint_every=3: the last one before the poisoned step
    for name, tensor in last["encoder"].items():
        assert torch.isfinite(tensor.float()).all(), name


def test_skip_policy_counts_the_skipped_step(tmp_path, monkeypatch):
    class PoisonedLoss(train_module.NTXentLoss):
        calls = 0

        def forward(self, z1, z2):
            PoisonedLoss.calls += 1
            loss = super().forward(z1, z2)
            return loss * float("inf") if PoisonedLoss.calls == 2 else loss

    monkeypatch.setattr(train_module, "NTXentLoss", PoisonedLoss)
    cfg = load_config("mnist5k", [*TINY, "train.nonfinite=skip", "train.max_steps=4"])
    summary = pretrain(cfg, tmp_path / "run", quiet=True)
    assert summary["skipped_steps"] == 1
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t.float()).all() for t in last["encoder"].values())


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=-4", "train.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("model.encoder=vit", "model.encoder"),
        ("loss.temprature=0.1", "loss.temprature"),
        ("data.dataset=folder", "data.root"),
        ("train.batch_size=5000", "train.batch_size"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, override, key):
    code = main(["pretrain", "--run-dir", str(tmp_path / "run"), "--quiet", *TINY, override])
    err = capsys.readouterr().err
    assert code == 2 and key in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_in_a_real_process_has_no_traceback(tmp_path):
    process = run_cli(["pretrain", "--run-dir", str(tmp_path / "r"), "train.epochs=zero"])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "train.epochs" in err and "Traceback" not in err


@pytest.mark.slow
def test_short_pretraining_beats_random_init_on_mnist5k(tmp_path):
    """End to end through the CLI: a short run's frozen features beat the random encoder."""
    run_dir = tmp_path / "run"
    code = main(
        ["pretrain", "--run-dir", str(run_dir), "--quiet", "train.max_steps=40",
         "train.checkpoint_every=40"]
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = summary["eval"]
    assert evaluation["linear_top1"] >= evaluation["random_init_linear_top1"] + 0.03
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "conv1.weight" in state["encoder"]
    for key in ("wall_seconds", "images_per_second"):
        assert summary[key] > 0
    assert (run_dir / "report.md").read_text().count("plots/") == 5  # 4 curves + monitors
