"""Gradient caching (``train.micro_batch_size``): the same gradients with a fraction of the memory.

``contrastive_backward`` with micro-batches is compared with plain autograd: on the full batch
when nothing in the network depends on the batch (BatchNorm in eval mode), and, in training
mode, with autograd over the SAME micro-batches (BatchNorm normalises each micro-batch by itself
in both). BatchNorm's running statistics must move once per micro-batch, not twice.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from simclrkit import step as step_module
from simclrkit.checkpoint import load_checkpoint
from simclrkit.config import ConfigError, TrainConfig, load_config, resolve
from simclrkit.losses import NTXentLoss, nt_xent
from simclrkit.models import build_model
from simclrkit.step import contrastive_backward
from simclrkit.train import pretrain

from conftest import TINY

ARCH = {
    "encoder": "resnet18", "width": 0.125, "in_channels": 1, "cifar_stem": True,
    "image_size": 8, "head": "nonlinear", "head_layers": 2, "proj_dim": 16,
}
NUM_IMAGES = 8
TEMPERATURE = 0.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH).double()


def _views() -> torch.Tensor:
    """(2N, 1, 8, 8) float64: N first views then N second views."""
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2 * NUM_IMAGES, 1, 8, 8, generator=generator, dtype=torch.float64)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _assert_close_dicts(a: dict, b: dict, rtol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-12, msg=key)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_equal_to_the_full_batch_when_nothing_depends_on_the_batch(micro_batch_size):
    """Eval-mode BatchNorm uses fixed statistics: caching must reproduce the full batch."""
    views = _views()
    full = _model().eval()
    loss_full, z1_full, z2_full, h_full = contrastive_backward(full, views, NTXentLoss(TEMPERATURE))
    cached = _model().eval()
    loss, z1, z2, h = contrastive_backward(
        cached, views, NTXentLoss(TEMPERATURE), micro_batch_size=micro_batch_size
    )
    torch.testing.assert_close(loss, loss_full, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([z1, z2]), torch.cat([z1_full, z2_full]))
    torch.testing.assert_close(h, h_full)  # h in the same order: first views, then second
    _assert_close_dicts(_grads(cached), _grads(full), rtol=1e-10)
    # the returned loss is the full batch's NT-Xent (at the reference's scale, 2x the Eq. 1
    # mean), not a micro-batch's
    torch.testing.assert_close(loss, 2 * nt_xent(z1, z2, TEMPERATURE), rtol=1e-12, atol=0)


def _micro_batched_autograd(model: torch.nn.Module, views: torch.Tensor, size: int) -> torch.Tensor:
    """The reference: every micro-batch forward once WITH a graph, one loss, one backward."""
    view1, view2 = views[:NUM_IMAGES], views[NUM_IMAGES:]
    z1_parts, z2_parts = [], []
    for start in range(0, NUM_IMAGES, size):
        _, z = model(torch.cat([view1[start : start + size], view2[start : start + size]]))
        z1_parts.append(z[: len(z) // 2])
        z2_parts.append(z[len(z) // 2 :])
    loss = 2 * nt_xent(torch.cat(z1_parts), torch.cat(z2_parts), TEMPERATURE)  # reference scale
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("micro_batch_size", [2, 4])
def test_training_mode_equals_autograd_over_the_same_micro_batches(micro_batch_size):
    views = _views()
    reference = _model().train()
    loss_ref = _micro_batched_autograd(reference, views, micro_batch_size)
    cached = _model().train()
    loss, *_ = contrastive_backward(
        cached, views, NTXentLoss(TEMPERATURE), micro_batch_size=micro_batch_size
    )
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    _assert_close_dicts(_grads(cached), _grads(reference), rtol=1e-10)
    # BN running statistics: exactly the reference's, i.e. one update per micro-batch
    _assert_close_dicts(cached.state_dict(), reference.state_dict(), rtol=1e-12)
    for module in _batchnorms(cached):
        assert module.num_batches_tracked.item() == NUM_IMAGES // micro_batch_size


def test_without_restoring_the_statistics_they_would_move_twice(monkeypatch):
    """The check above can fail: the no-graph pass would update the running statistics too."""
    monkeypatch.setattr(
        step_module, "_batchnorm_statistics_kept", lambda model: contextlib.nullcontext()
    )
    cached = _model().train()
    contrastive_backward(cached, _views(), NTXentLoss(TEMPERATURE), micro_batch_size=2)
    assert all(m.num_batches_tracked.item() == 2 * NUM_IMAGES // 2 for m in _batchnorms(cached))


def test_training_mode_differs_from_the_full_batch():
    """Per-micro-batch BN statistics change the result (the documented semantic difference)."""
    views = _views()
    full = _model().train()
    contrastive_backward(full, views, NTXentLoss(TEMPERATURE))
    cached = _model().train()
    contrastive_backward(cached, views, NTXentLoss(TEMPERATURE), micro_batch_size=2)
    conv = "encoder.conv1.weight"
    difference = (_grads(cached)[conv] - _grads(full)[conv]).norm() / _grads(full)[conv].norm()
    assert difference > 1e-3


def test_pretrain_uses_micro_batches(tmp_path):
    """End to end: batch 32 in micro-batches of 8 moves BN statistics 4 times a step."""
    config = load_config("mnist5k", [*TINY, "train.max_steps=2", "train.micro_batch_size=8"])
    pretrain(config, tmp_path / "run", quiet=True)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert state["encoder"]["bn1.num_batches_tracked"].item() == 2 * 32 // 8
    assert state["config"]["train"]["micro_batch_size"] == 8


def test_micro_batch_size_is_validated():
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        TrainConfig(micro_batch_size=0)
    config = load_config("mnist5k", ["train.batch_size=64", "train.micro_batch_size=24"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: 24 does not divide the 32"):
        resolve(config, num_examples=4000, native_image_size=28, in_channels=1, world_size=2)
    fine = load_config("mnist5k", ["train.batch_size=64", "train.micro_batch_size=16"])
    assert resolve(fine, num_examples=4000, native_image_size=28, in_channels=1, world_size=2)


def test_precision_settings(tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        load_config("mnist5k", ["train.precision=fp8"])
    # fp16 needs a CUDA gradient scaler: refused on the CPU before any work is done
    config = load_config("mnist5k", [*TINY, "train.precision=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        pretrain(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    # bf16 autocast reaches the forward pass; fp32 leaves it alone
    layer = torch.nn.Linear(4, 4)
    with step_module._autocast_factory(torch.device("cpu"), "bf16")():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with step_module._autocast_factory(torch.device("cpu"), "fp32")():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
