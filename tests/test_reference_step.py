"""simclrkit's training step against the reference's, computed by hand from its formulas.

The reference (google-research/simclr) computes, per device (``objective.py``)::

    logits_aa = h1 h1^T / t - 1e9 * I        logits_ab = h1 h2^T / t
    logits_bb = h2 h2^T / t - 1e9 * I        logits_ba = h2 h1^T / t
    loss_a = mean_i CE(onehot(i), [logits_ab, logits_aa]_i)
    loss_b = mean_i CE(onehot(i), [logits_ba, logits_bb]_i)
    loss   = loss_a + loss_b

and updates with ``LARSOptimizer`` (``lars_optimizer.py``, classic momentum): for a variable
whose name holds none of 'batch_normalization', 'bias', 'head_supervised'::

    g <- g + wd * w;  trust = eeta * |w| / |g| (1 where a norm is 0);  v <- m v + lr trust g

and ``v <- m v + lr g`` for the others; then ``w <- w - v``. Everything below is written from
those lines with plain tensor operations, independently of simclrkit's loss and optimiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simclrkit.losses import NTXentLoss
from simclrkit.models import build_model
from simclrkit.optim import build_optimizer, parameter_groups
from simclrkit.step import contrastive_backward

TEMPERATURE, LR, MOMENTUM, WD, EETA = 0.2, 0.8, 0.9, 1e-4, 1e-3
ARCH = {
    "encoder": "resnet18", "width": 0.0625, "in_channels": 1, "cifar_stem": True,
    "image_size": 8, "head": "nonlinear", "head_layers": 2, "proj_dim": 8,
}  # fmt: skip


def _reference_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = h1.shape[0]
    labels = torch.arange(n)
    masks = torch.eye(n) * 1e9
    logits_aa = h1 @ h1.t() / TEMPERATURE - masks
    logits_bb = h2 @ h2.t() / TEMPERATURE - masks
    logits_ab = h1 @ h2.t() / TEMPERATURE
    logits_ba = h2 @ h1.t() / TEMPERATURE
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def _excluded(name: str, module_types: dict[str, type]) -> bool:
    """The reference's exclusion by variable name; BatchNorm's weight is its 'gamma'."""
    owner = name.rsplit(".", 1)[0]
    return name.endswith("bias") or issubclass(module_types[owner], torch.nn.BatchNorm2d | torch.nn.BatchNorm1d)


def _reference_steps(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    types = {name: type(module) for name, module in model.named_modules()}
    velocity = {name: torch.zeros_like(p) for name, p in params.items()}
    for views in batches:
        model.zero_grad(set_to_none=True)
        _, z = model(views)
        n = views.shape[0] // 2
        _reference_loss(z[:n], z[n:]).backward()
        with torch.no_grad():
            for name, w in params.items():
                g = w.grad.clone()
                if _excluded(name, types):
                    velocity[name] = MOMENTUM * velocity[name] + LR * g
                else:
                    g = g + WD * w
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = EETA * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                    velocity[name] = MOMENTUM * velocity[name] + LR * trust * g
                w -= velocity[name]
    return {name: p.detach().clone() for name, p in params.items()}


def _simclrkit_steps(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    optimizer = build_optimizer(
        "lars", parameter_groups(model, weight_decay=WD), lr=LR, momentum=MOMENTUM,
        weight_decay=WD, trust_coefficient=EETA,
    )  # fmt: skip
    loss_fn = NTXentLoss(TEMPERATURE)  # the training default: reduction="reference"
    for views in batches:
        optimizer.zero_grad(set_to_none=True)
        contrastive_backward(model, views, loss_fn)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_lars_steps_at_weight_decay_1e4_equal_the_reference_by_hand():
    torch.manual_seed(0)
    batches = [torch.rand(2 * 6, 1, 8, 8) for _ in range(2)]  # 6 images, two views, two steps
    torch.manual_seed(1)
    ours = build_model(ARCH).double()
    torch.manual_seed(1)
    theirs = build_model(ARCH).double()
    batches = [b.double() for b in batches]
    ours.train(), theirs.train()

    expected = _reference_steps(theirs, batches)
    got = _simclrkit_steps(ours, batches)
    initial = dict(build_model_at_seed().named_parameters())
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)
        moved += int(not torch.equal(value, initial[name]))
    assert moved > len(expected) // 2  # the steps moved most tensors: the comparison has teeth


def build_model_at_seed() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(ARCH).double()


def test_the_eq1_mean_takes_a_different_step():
    """The Eq. 1 mean (half the reference's loss) does not give the reference's update at
    weight decay 1e-4, so the test above can tell the two scales apart."""
    torch.manual_seed(0)
    batches = [torch.rand(12, 1, 8, 8).double()]
    reference = _reference_steps(build_model_at_seed(), batches)
    model = build_model_at_seed()
    optimizer = build_optimizer(
        "lars", parameter_groups(model, weight_decay=WD), lr=LR, momentum=MOMENTUM,
        weight_decay=WD, trust_coefficient=EETA,
    )  # fmt: skip
    contrastive_backward(model, batches[0], NTXentLoss(TEMPERATURE, reduction="mean"))
    optimizer.step()
    params = dict(model.named_parameters())
    differs = [n for n in reference if not torch.allclose(params[n], reference[n], rtol=1e-6, atol=0)]
    assert differs, "the mean and the reference scale gave the same step"


def test_reference_reduction_is_twice_the_eq1_mean():
    torch.manual_seed(3)
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    reference = NTXentLoss(TEMPERATURE)(z1, z2)
    torch.testing.assert_close(reference, _reference_loss(z1, z2))
    torch.testing.assert_close(NTXentLoss(TEMPERATURE, reduction="mean")(z1, z2), reference / 2)
