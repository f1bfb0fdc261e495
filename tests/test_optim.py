"""Tests for simclrkit.optim: LARS against hand-computed steps, parameter groups, schedules."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from simclrkit.optim import (
    LARS,
    WarmupCosineSchedule,
    build_optimizer,
    parameter_groups,
    scale_learning_rate,
    warmup_cosine,
)


def _tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- LARS by hand


def test_lars_three_steps_by_hand():
    """Three LARS steps on four tensors, each number derived in the comments.

    momentum m = 0.9, trust_coefficient 0.01 (larger than 0.001 for readable numbers).
    """
    # a: decayed + trust-scaled weight (wd 0.1).
    a = nn.Parameter(_tensor(3.0, 4.0))
    # b: zero-norm weight in the same group -> trust 1.
    b = nn.Parameter(_tensor(0.0, 0.0))
    # c: excluded group (lars=False); its weight_decay 0.5 must be ignored.
    c = nn.Parameter(_tensor(1.0, -1.0))
    # d: lars group without weight decay; gets a zero gradient in step 2 -> trust 1.
    d = nn.Parameter(_tensor(1.0, 0.0))
    optimizer = LARS(
        [
            {"params": [a, b], "weight_decay": 0.1},
            {"params": [c], "lars": False, "weight_decay": 0.5},
            {"params": [d]},
        ],
        lr=3.0,
        momentum=0.9,
        trust_coefficient=0.01,
    )

    # ---- step 1, lr = 3
    a.grad = _tensor(0.6, 0.8)
    b.grad = _tensor(1.0, 2.0)
    c.grad = _tensor(0.5, 0.5)
    d.grad = _tensor(2.0, 0.0)
    optimizer.step()
    # a: g' = g + 0.1 w = [0.9, 1.2], |g'| = 1.5, |w| = 5, trust = 0.01 * 5 / 1.5 = 1/30,
    #    lr * trust = 0.1, v = [0.09, 0.12], w = [2.91, 3.88].
    _close(a.detach(), _tensor(2.91, 3.88))
    _close(optimizer.state[a]["momentum_buffer"], _tensor(0.09, 0.12))
    # p.grad is left as the loss gradient (decay is added to a copy).
    _close(a.grad, _tensor(0.6, 0.8))
    # b: |w| = 0 -> trust 1; g' = g + 0.1 * 0 = [1, 2]; v = 3 * [1, 2]; w = [-3, -6].
    _close(b.detach(), _tensor(-3.0, -6.0))
    # c: no decay, no trust: v = 3 * [0.5, 0.5] = [1.5, 1.5]; w = [-0.5, -2.5].
    _close(c.detach(), _tensor(-0.5, -2.5))
    # d: |w| = 1, |g| = 2, trust = 0.005, lr * trust = 0.015, v = [0.03, 0], w = [0.97, 0].
    _close(d.detach(), _tensor(0.97, 0.0))

    # ---- step 2, lr = 2 (changed: only the new contribution uses it)
    for group in optimizer.param_groups:
        group["lr"] = 2.0
    # a: grad chosen so that g' = g + 0.1 * [2.91, 3.88] = [0.6, 0.8] exactly.
    a.grad = _tensor(0.309, 0.412)
    b.grad = None  # skipped: weight and buffer untouched
    c.grad = _tensor(0.5, 0.5)
    d.grad = _tensor(0.0, 0.0)
    optimizer.step()
    # a: |g'| = 1, |w| = 4.85, trust = 0.0485, lr * trust = 0.097,
    #    v = 0.9 * [0.09, 0.12] + 0.097 * [0.6, 0.8] = [0.1392, 0.1856],
    #    w = [2.91 - 0.1392, 3.88 - 0.1856] = [2.7708, 3.6944].
    # (With lr outside the buffer, as torch SGD does, v would be rescaled by 2/3: different.)
    _close(optimizer.state[a]["momentum_buffer"], _tensor(0.1392, 0.1856))
    _close(a.detach(), _tensor(2.7708, 3.6944))
    _close(b.detach(), _tensor(-3.0, -6.0))
    _close(optimizer.state[b]["momentum_buffer"], _tensor(3.0, 6.0))
    # c: v = 0.9 * 1.5 + 2 * 0.5 = 2.35; w = [-0.5 - 2.35, -2.5 - 2.35] = [-2.85, -4.85].
    _close(c.detach(), _tensor(-2.85, -4.85))
    # d: |g| = 0 -> trust 1, contribution 0: v = 0.9 * [0.03, 0] = [0.027, 0];
    #    w = [0.943, 0].
    _close(d.detach(), _tensor(0.943, 0.0))

    # ---- step 3, lr = 1, zero loss gradient on a: only weight decay drives it.
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    a.grad = _tensor(0.0, 0.0)
    c.grad = None
    d.grad = None
    optimizer.step()
    # a: g' = 0.1 w, so trust = 0.01 |w| / (0.1 |w|) = 0.1 whatever w is;
    #    contribution = 1 * 0.1 * 0.1 * [2.7708, 3.6944] = [0.027708, 0.036944],
    #    v = 0.9 * [0.1392, 0.1856] + that = [0.152988, 0.203984],
    #    w = [2.7708 - 0.152988, 3.6944 - 0.203984] = [2.617812, 3.490416].
    _close(optimizer.state[a]["momentum_buffer"], _tensor(0.152988, 0.203984))
    _close(a.detach(), _tensor(2.617812, 3.490416))
    _close(c.detach(), _tensor(-2.85, -4.85))
    _close(d.detach(), _tensor(0.943, 0.0))


def test_lars_eps_enters_trust_denominator():
    w = nn.Parameter(_tensor(3.0, 4.0))
    optimizer = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1, eps=1.0)
    w.grad = _tensor(0.6, 0.8)
    optimizer.step()
    # trust = 0.1 * 5 / (1 + 1) = 0.25; w = [3, 4] - 0.25 * [0.6, 0.8].
    _close(w.detach(), _tensor(2.85, 3.8))


def test_lars_matches_per_tensor_formula_on_mixed_shapes():
    """The foreach implementation against a per-tensor loop of the reference formula."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 4), (1,), (2, 2)]
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    params = [nn.Parameter(tensor.clone()) for tensor in initial]
    optimizer = LARS(
        [{"params": params[:3], "weight_decay": 1e-2}, {"params": params[3:], "lars": False}],
        lr=0.7,
        momentum=0.9,
    )
    weights = [tensor.clone() for tensor in initial]
    buffers = [torch.zeros_like(tensor) for tensor in initial]
    for step in range(3):
        lr = 0.7 / (step + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        for index, grad in enumerate(grads):
            if index < 3:
                grad = grad + 1e-2 * weights[index]
                trust = 0.001 * weights[index].norm() / grad.norm()
            else:
                trust = 1.0
            buffers[index] = 0.9 * buffers[index] + lr * trust * grad
            weights[index] = weights[index] - buffers[index]
    for param, weight in zip(params, weights):
        torch.testing.assert_close(param.detach(), weight, rtol=1e-12, atol=1e-14)


def test_lars_state_dict_round_trip():
    torch.manual_seed(0)
    model_a = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    inputs = torch.randn(8, 6)

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()

    optimizer_a = LARS(parameter_groups(model_a, 1e-4), lr=0.5)
    for _ in range(3):
        train_step(model_a, optimizer_a)
    buffer = io.BytesIO()
    torch.save(optimizer_a.state_dict(), buffer)
    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    optimizer_b = LARS(parameter_groups(model_b, 1e-4), lr=0.5)
    buffer.seek(0)
    optimizer_b.load_state_dict(torch.load(buffer, weights_only=True))
    optimizer_c = LARS(parameter_groups(model_c, 1e-4), lr=0.5)  # no state loaded

    assert [group["name"] for group in optimizer_b.param_groups] == ["weights", "norm_and_bias"]
    assert [group["lars"] for group in optimizer_b.param_groups] == [True, False]
    for _ in range(2):
        train_step(model_a, optimizer_a)
        train_step(model_b, optimizer_b)
        train_step(model_c, optimizer_c)
    for param_a, param_b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(param_a, param_b)
    # Without the momentum buffers the trajectory differs: the check above has teeth.
    assert not all(
        torch.equal(param_a, param_c)
        for param_a, param_c in zip(model_a.parameters(), model_c.parameters())
    )


def test_lars_minimises_a_regression():
    """Behaviour check: a sign or scale error makes this diverge or stall."""
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    targets = inputs @ torch.randn(8, 3) + 0.5
    model = nn.Linear(8, 3)
    groups = parameter_groups(model, weight_decay=0.0)
    groups[1]["lr_scale"] = 0.01  # the bias gets no trust ratio: give it a sane step
    optimizer = LARS(groups, lr=5.0, momentum=0.9, trust_coefficient=0.01)
    schedule = WarmupCosineSchedule(total_steps=150, warmup_steps=5, peak_lr=5.0)
    losses = []
    for step in range(150):
        schedule.apply(optimizer, step)
        loss = (model(inputs) - targets).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 1e-3 * losses[0]


def test_lars_rejects_bad_arguments():
    param = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        LARS(param, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS(param, lr=1.0, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS(param, lr=1.0, weight_decay=-1e-6)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(param, lr=1.0, trust_coefficient=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lars_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (10, 64), (0,)]
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        params = [nn.Parameter(tensor.to(device)) for tensor in tensors]
        optimizer = LARS(
            [{"params": params[:3], "weight_decay": 1e-4}, {"params": params[3:], "lars": False}],
            lr=2.0,
        )
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.to(device)
            optimizer.step()
        results.append([param.detach().cpu() for param in params])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- parameter groups


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 6)  # weight and bias
        self.layer_norm = nn.LayerNorm(6)
        self.tied = nn.Linear(6, 4, bias=False)
        self.tied_again = nn.Linear(6, 4, bias=False)
        self.tied_again.weight = self.tied.weight  # a shared parameter
        self.probe = nn.Linear(4, 10)


def test_parameter_groups_exact_membership():
    net = _Net()
    groups = parameter_groups(net, weight_decay=1e-6, extra_excluded=(net.probe,))
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["weights", "norm_and_bias", "probe"]

    def ids(params):
        return [id(param) for param in params]

    assert ids(by_name["weights"]["params"]) == ids(
        [net.conv.weight, net.fc.weight, net.tied.weight]
    )
    assert set(ids(by_name["norm_and_bias"]["params"])) == set(
        ids(
            [
                net.bn.weight,
                net.bn.bias,
                net.group_norm.weight,
                net.group_norm.bias,
                net.fc.bias,
                net.layer_norm.weight,
                net.layer_norm.bias,
            ]
        )
    )
    assert set(ids(by_name["probe"]["params"])) == set(ids(net.probe.parameters()))
    assert (by_name["weights"]["lars"], by_name["weights"]["weight_decay"]) == (True, 1e-6)
    for name in ("norm_and_bias", "probe"):
        assert (by_name[name]["lars"], by_name[name]["weight_decay"]) == (False, 0.0)

    everything = [id(param) for group in groups for param in group["params"]]
    assert len(everything) == len(set(everything))  # no duplicates (tied weight once)
    assert set(everything) == set(ids(net.parameters()))
    # torch itself rejects a parameter appearing in two groups; this must construct.
    LARS(groups, lr=0.1)


def test_parameter_groups_without_exclusion_and_external_probe():
    net = _Net()
    outside_probe = nn.Linear(4, 3)
    groups = parameter_groups(
        net, weight_decay=1e-4, exclude_bias_and_bn=False, extra_excluded=(outside_probe,)
    )
    assert [group["name"] for group in groups] == ["weights", "probe"]
    assert {id(param) for param in groups[0]["params"]} == {id(param) for param in net.parameters()}
    assert {id(param) for param in groups[1]["params"]} == {
        id(param) for param in outside_probe.parameters()
    }
    with pytest.raises(ValueError):
        parameter_groups(net, weight_decay=-1.0)


# ----------------------------------------------------------------------- learning rates


def test_scale_learning_rate_values_and_errors():
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_learning_rate(0.3, 256, "linear") == pytest.approx(0.3)
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_learning_rate(0.1, 1024, "sqrt") == pytest.approx(3.2)  # SimCLRv2
    assert scale_learning_rate(0.5, 4096, "none") == 0.5
    with pytest.raises(ValueError, match="linear"):
        scale_learning_rate(0.3, 256, "cosine")
    with pytest.raises(ValueError):
        scale_learning_rate(0.0, 256, "linear")
    with pytest.raises(ValueError):
        scale_learning_rate(0.3, 0, "sqrt")


def test_warmup_cosine_values():
    total, warmup, peak, final = 110, 10, 1.0, 0.1
    lr = [warmup_cosine(step, total, warmup, peak, final) for step in range(total + 20)]
    assert lr[0] == 0.0
    assert lr[5] == pytest.approx(0.5)  # peak * 5 / 10
    assert lr[9] == pytest.approx(0.9)
    assert lr[10] == pytest.approx(peak)  # cosine at t = 0
    assert lr[60] == pytest.approx((peak + final) / 2)  # halfway through 100 decay steps
    # one step before the end: final + (peak - final) * (1 + cos(pi * 99 / 100)) / 2
    assert lr[109] == pytest.approx(final + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr[110] == pytest.approx(final)
    assert all(value == pytest.approx(final) for value in lr[110:])
    # strictly decreasing during the decay: stepped every iteration, not every epoch
    assert all(later < earlier for earlier, later in zip(lr[10:110], lr[11:111]))
    # reference form with final 0: tf cosine_decay(peak, step - warmup, total - warmup)
    assert warmup_cosine(35, total, warmup, 2.0) == pytest.approx(
        2.0 * 0.5 * (1 + math.cos(math.pi * 25 / 100))
    )


def test_warmup_cosine_edge_cases():
    assert warmup_cosine(0, 100, 0, 2.0) == pytest.approx(2.0)  # no warmup
    assert warmup_cosine(50, 100, 0, 2.0) == pytest.approx(1.0)
    # all warmup: ramps up, then final
    assert warmup_cosine(5, 10, 10, 2.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 10, 2.0, 0.25) == 0.25
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 11, 1.0)
    with pytest.raises(ValueError):
        warmup_cosine(-1, 10, 1, 1.0)


def test_schedule_applies_lr_scale_and_round_trips():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(
        [{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.1}], lr=123.0
    )
    schedule = WarmupCosineSchedule(total_steps=20, warmup_steps=4, peak_lr=2.0)
    returned = schedule.apply(optimizer, 2)
    assert returned == pytest.approx(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)
    schedule.apply(optimizer, 12)  # halfway through 16 decay steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)

    restored = WarmupCosineSchedule(total_steps=1, warmup_steps=0, peak_lr=9.0)
    restored.load_state_dict(schedule.state_dict())
    assert [restored(step) for step in range(25)] == [schedule(step) for step in range(25)]


# ----------------------------------------------------------------------- build_optimizer


def test_build_optimizer():
    net = _Net()
    groups = parameter_groups(net, weight_decay=1e-4, extra_excluded=(net.probe,))
    lars = build_optimizer("lars", groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(lars, LARS)
    assert "momentum" not in groups[0]  # the caller's dicts are not filled with defaults
    sgd = build_optimizer("sgd", groups, lr=0.1, momentum=0.8, weight_decay=1e-3)
    assert isinstance(sgd, torch.optim.SGD)
    # per-group weight decay wins over the default
    assert [group["weight_decay"] for group in sgd.param_groups] == [1e-4, 0.0, 0.0]
    assert all(g["momentum"] == 0.8 and not g["nesterov"] for g in sgd.param_groups)
    adamw = build_optimizer("adamw", [nn.Parameter(torch.zeros(2))], 0.1, 0.9, 0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="lars.*sgd.*adamw"):
        build_optimizer("adam", groups, 0.1, 0.9, 0.0)
