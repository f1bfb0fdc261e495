"""Distillation (SimCLRv2 §2.3): Eq. 3 against a naive sum, the first step's loss computed by
hand, exact resume after SIGKILL and SIGTERM in real processes, and the refusals."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from simclrkit.checkpoint import atomic_save, load_checkpoint
from simclrkit.config import ConfigError, load_config
from simclrkit.data import load_dataset
from simclrkit.distill import _student, distill, distillation_loss
from simclrkit.evaluate import eval_views
from simclrkit.export import export_checkpoint, load_classifier
from simclrkit.finetune import class_balanced_subset
from simclrkit.pipeline import StepOrder

from conftest import TINY as PRETRAIN_TINY
from conftest import assert_states_equal, run_cli, teacher_arch, wait_for_step, write_teacher

# conftest's tiny pretraining settings, less those of the model and the evaluation: the
# student's model is the recipe's, and distillation has no end-of-run evaluation settings.
TINY = [o for o in PRETRAIN_TINY if not o.startswith(("model.", "eval."))]
_COMPARED = ("step", "encoder", "classifier", "optimizer", "schedule", "rng")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _final_state(run_dir):
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return {key: state[key] for key in _COMPARED}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    summary = distill(load_config("mnist5k_distill", [*TINY, f"distill.teacher={teacher}"]),
                      run_dir, quiet=True)  # fmt: skip
    return run_dir, summary


def test_distillation_loss_is_eq3_times_tau_squared():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 5, generator=generator) * 3
    for tau in (1.0, 2.5):
        naive = 0.0
        for i in range(6):
            t = [math.exp(v / tau) for v in teacher[i].tolist()]
            s = [math.exp(v / tau) for v in student[i].tolist()]
            naive -= sum(t[y] / sum(t) * math.log(s[y] / sum(s)) for y in range(5))
        loss = distillation_loss(student, teacher, tau)
        assert loss.item() == pytest.approx(naive / 6 * tau**2, rel=1e-6)
        # Its gradient: tau * (softmax(s / tau) - softmax(t / tau)) / B.
        (grad,) = torch.autograd.grad(loss, student)
        expected = tau * (F.softmax(student / tau, 1) - F.softmax(teacher / tau, 1)) / 6
        torch.testing.assert_close(grad, expected.detach())


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_first_step_loss_equals_a_hand_computation(tmp_path, teacher, alpha):
    config = load_config("mnist5k_distill", [*TINY, "train.max_steps=1", f"distill.teacher={teacher}",
                                             f"distill.alpha={alpha}"])  # fmt: skip
    distill(config, tmp_path / "run", quiet=True)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    # By hand: the student as seeded, the teacher from its file, step 0's images and views.
    train = load_dataset("mnist5k", None, "train", quiet=True)
    net = load_classifier(teacher)
    arch = {**teacher_arch(), "head_layers": 3, "proj_dim": 128}
    student, _ = _student(config, arch, net)
    epochs, indices = StepOrder(0, len(train), len(train), 32).indices(0)
    assert set(epochs.tolist()) == {0}
    x = eval_views(train, indices, 16, train=True, seed=0, epoch=0)
    with torch.no_grad():
        if alpha == 1:
            expected = distillation_loss(student.train()(x), net(x), 1.0)
        else:  # the labelled views go through the student in the same forward (one BN batch)
            subset = torch.as_tensor(class_balanced_subset(train.labels.numpy(), 0.1, 0))
            epochs, rows = StepOrder(1, len(subset), len(subset), 32).indices(0)
            chosen = subset[rows]
            labelled = eval_views(train, chosen, 16, train=True, seed=0, epoch=0)
            both = student.train()(torch.cat([x, labelled]))
            expected = alpha * distillation_loss(both[:32], net(x), 1.0)
            expected += (1 - alpha) * F.cross_entropy(both[32:], train.labels[chosen])
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert (logged["distill_loss"] == pytest.approx(logged["loss"])) == (alpha == 1.0)


def test_run_folder_and_student_file(reference, tmp_path):
    run_dir, summary = reference
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md"):
        assert (run_dir / name).is_file()
    assert summary["steps"] == 8 and 0 <= summary["student_top1"] <= 1
    assert "| student |" in (run_dir / "report.md").read_text()
    # The student is a classifier file: load_classifier, export and a reload agree.
    student = load_classifier(run_dir / "checkpoints" / "last.pt")
    assert student.proj_selector == 0 and student.num_classes == 10
    export_checkpoint(run_dir, "safetensors", tmp_path / "student.safetensors")
    again = load_classifier(tmp_path / "student.safetensors")
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), again(x), rtol=0, atol=0)


def test_sigkill_mid_run_then_resume_is_exact(tmp_path, teacher, reference):
    run_dir = tmp_path / "run"
    args = ["distill", "--run-dir", str(run_dir), "--teacher", str(teacher), *TINY]
    process = run_cli(args)
    wait_for_step(run_dir, 5, process)  # past the checkpoint at 3, before the one at 6
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] < 8
    resumed = run_cli([*args, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_states_equal(_final_state(run_dir), _final_state(reference[0]))
    steps = [json.loads(line).get("step") for line in
             (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]  # fmt: skip
    assert steps == list(range(1, 9))  # each step logged once across the kill


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, teacher, reference):
    run_dir = tmp_path / "run"
    args = ["distill", "--run-dir", str(run_dir), "--teacher", str(teacher), *TINY]
    process = run_cli(args)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "--resume" in err and "Traceback" not in err
    assert 2 <= load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] < 8
    resumed = run_cli([*args, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_states_equal(_final_state(run_dir), _final_state(reference[0]))


def test_resume_with_another_teacher_is_refused(tmp_path, teacher, reference):
    other = write_teacher(tmp_path / "other.pt", seed=6)
    config = load_config("mnist5k_distill", [*TINY, f"distill.teacher={other}"])
    with pytest.raises(ConfigError, match="not the file this run was distilled from"):
        distill(config, reference[0], resume=True, quiet=True)


def test_refusals_are_one_line_exit_2(tmp_path, teacher):
    big = write_teacher(tmp_path / "big.pt", image_size=28)
    cases = [
        ([], "distill.teacher: not set"),
        (["--teacher", str(big)], "the teacher takes image_size 28, the student's data gives 16"),
        (["--teacher", str(teacher), "distill.student_init=teacher"],
         "must be the teacher's architecture"),
        (["--teacher", str(tmp_path / "none.pt")], "not found"),
    ]  # fmt: skip
    for extra, message in cases:
        process = run_cli(["distill", "--run-dir", str(tmp_path / "r"), *TINY, *extra])
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2 and message in err and "Traceback" not in err, err


def test_self_distillation_student_starts_as_the_teacher(teacher):
    config = load_config("mnist5k_distill", [*TINY, f"distill.teacher={teacher}",
                                             "model.head_layers=3", "model.proj_dim=16",
                                             "distill.student_init=teacher"])  # fmt: skip
    net = load_classifier(teacher)
    student, head = _student(config, teacher_arch(), net)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), net(x), rtol=0, atol=0)
    assert student.proj_selector == 1 and head is not None  # stored with its head
    assert student.encoder is not net.encoder  # a copy: the teacher stays fixed


def test_a_non_finite_loss_stops_with_exit_3_before_the_step(tmp_path, teacher):
    state = load_checkpoint(teacher)
    state["classifier"]["bias"][3] = float("nan")  # every soft label becomes NaN
    atomic_save(state, tmp_path / "nan.pt")
    run_dir = tmp_path / "run"
    process = run_cli(["distill", "--run-dir", str(run_dir), "--teacher", str(tmp_path / "nan.pt"),
                       *TINY])  # fmt: skip
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3 and "non-finite loss at step 1" in err, err
    assert "Traceback" not in err and not list((run_dir / "checkpoints").glob("*.pt"))
