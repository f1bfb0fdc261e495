"""The online probe and the monitors: their measures against naive formulas, and the promise
that watching a run does not change it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simclrkit.monitors import OnlineProbe, alignment, effective_rank, uniformity
from simclrkit.optim import build_optimizer, parameter_groups

from conftest import TINY, assert_states_equal, run_cli

# --------------------------------------------------------------------------------------
# Measures against their definitions, written out
# --------------------------------------------------------------------------------------


def test_alignment_and_uniformity_equal_their_definitions():
    torch.manual_seed(0)
    z1, z2 = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    expected_alignment = sum(float(((u[i] - v[i]) ** 2).sum()) for i in range(20)) / 20
    assert alignment(z1, z2) == pytest.approx(expected_alignment, rel=1e-6)
    pairs = [math.exp(-2 * float(((u[i] - u[j]) ** 2).sum())) for i in range(20) for j in range(i + 1, 20)]
    assert uniformity(z1) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)
    # the extremes: identical views align perfectly; one repeated point is complete collapse
    assert alignment(z1, 3 * z1) == pytest.approx(0.0, abs=1e-6)
    assert uniformity(z1[:1].repeat(10, 1)) == pytest.approx(0.0, abs=1e-6)


def test_effective_rank_is_exp_entropy_of_the_singular_values():
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 7, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 7, dtype=torch.float64))
    # seven equal singular values: effective rank 7; a collapsed h: rank 1
    h = 3.0 * u @ v.t()
    assert effective_rank(h) == pytest.approx(7.0, rel=1e-4)
    assert effective_rank(torch.ones(50, 16)) == pytest.approx(1.0, rel=1e-3)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum() + 1e-7
    mixed = torch.diag(s)
    assert effective_rank(mixed) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)


def test_online_probe_learns_separable_features_and_keeps_the_reference_weight_decay():
    torch.manual_seed(2)
    centres = torch.randn(4, 16) * 3
    labels = torch.arange(200) % 4
    h = centres[labels] + torch.randn(200, 16)
    probe = OnlineProbe(16, 4, weight_decay=1e-3)
    assert not probe.linear.weight.any()  # zero start: no random numbers drawn
    groups = parameter_groups(torch.nn.Linear(1, 1), 0.0, extra_excluded=(probe,))
    optimizer = build_optimizer("lars", groups, lr=0.1, momentum=0.9, weight_decay=0.0,
                                trust_coefficient=0.001)  # fmt: skip
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        probe.backward_step(h, labels)
        optimizer.step()
    window = probe.window()
    assert window["probe_train_acc"] > 0.8
    assert (probe(h).argmax(1) == labels).float().mean() > 0.95
    # the gradient holds the reference's wd * W on the kernel and none on the bias
    probe.zero_grad()
    probe.backward_step(h, labels)
    with_decay = probe.linear.weight.grad.clone()
    probe.zero_grad()
    loss = F.cross_entropy(probe(h), labels)
    loss.backward()
    torch.testing.assert_close(with_decay - probe.linear.weight.grad, 1e-3 * probe.linear.weight.detach())
    assert probe.window()["probe_loss"] > 0 and probe.window() == {}  # reset after reading


# --------------------------------------------------------------------------------------
# In a real run
# --------------------------------------------------------------------------------------


def _pretrain(run_dir, *overrides: str) -> None:
    process = run_cli(["pretrain", "--run-dir", str(run_dir), "--quiet", *TINY, *overrides])
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_probe_and_monitors_leave_the_weights_bit_identical(tmp_path):
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    _pretrain(watched, "eval.monitor_every=3", "eval.monitor_images=64")
    _pretrain(plain, "eval.online_probe=false", "eval.monitor_every=0")
    a = torch.load(watched / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)
    for key in ("encoder", "head", "rng", "step"):
        assert_states_equal(a[key], b[key], key)
    # the network's parameter groups are the same; the probe has a group of its own
    assert [g["name"] for g in a["optimizer"]["param_groups"]] == ["weights", "norm_and_bias", "probe"]
    assert [g["name"] for g in b["optimizer"]["param_groups"]] == ["weights", "norm_and_bias"]
    for i in range(2):
        assert a["optimizer"]["param_groups"][i]["params"] == b["optimizer"]["param_groups"][i]["params"]
    assert "probe" in a["monitor"] and b["monitor"] == {}

    lines = _lines(watched)
    monitors = [line for line in lines if line.get("event") == "monitor"]
    assert [m["step"] for m in monitors] == [3, 6, 8]
    for m in monitors:
        assert {"alignment", "uniformity", "rankme", "knn_top1", "probe_top1", "seconds"} <= set(m)
        assert 0 <= m["alignment"] <= 4 and m["uniformity"] <= 0 and m["rankme"] >= 1
    trained = [line for line in lines if "loss" in line]
    assert all("probe_train_acc" in line and "probe_loss" in line for line in trained)
    assert not any(line.get("event") == "monitor" for line in _lines(plain))


def test_an_unlabelled_folder_is_watched_for_collapse_without_labels(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    run_dir = tmp_path / "run"
    _pretrain(run_dir, "data.dataset=folder", f"data.root={folder}", "train.batch_size=8",
              "eval.monitor_every=4")  # fmt: skip
    monitors = [line for line in _lines(run_dir) if line.get("event") == "monitor"]
    assert [m["step"] for m in monitors] == [4, 8]
    for m in monitors:
        assert set(m) == {"event", "step", "alignment", "uniformity", "rankme", "seconds"}
    assert not any("probe_loss" in line for line in _lines(run_dir))
    report = (run_dir / "report.md").read_text()
    assert "plots/monitors.png" in report
