"""Tests for simclrkit.budget: the memory estimate against real CPU training, and refusals.

The real side runs a small model's forward, NT-Xent, backward and optimiser step on the CPU
and measures memory two deterministic ways (no timing, no process RSS): the bytes autograd
actually saves plus the real parameter, gradient and momentum tensors, and the peak of live
tensor memory the PyTorch profiler records over the step.
"""

from __future__ import annotations

import contextlib
import json
import types
import warnings

import pytest
import torch

from simclrkit import budget
from simclrkit.budget import check_training_memory
from simclrkit.config import ConfigError
from simclrkit.losses import nt_xent
from simclrkit.models import build_model

CPU = torch.device("cpu")
SMALL = {
    "encoder": "resnet18", "width": 0.25, "in_channels": 3, "cifar_stem": True,
    "image_size": 32, "head": "nonlinear", "head_layers": 2, "proj_dim": 32,
}
# What the mnist5k recipe trains: ResNet-18 at a quarter width on 28 px digits, batch 256.
MNIST = dict(SMALL, in_channels=1, image_size=28, proj_dim=128)
RESNET50_IMAGENET = {
    "encoder": "resnet50", "width": 1.0, "in_channels": 3, "cifar_stem": False,
    "image_size": 224, "head": "nonlinear", "head_layers": 2, "proj_dim": 128,
}


def _estimate(arch, batch, micro=None, precision="fp32", device=CPU):
    return check_training_memory(
        arch, batch_per_device=batch, micro_batch_size=micro, device=device, precision=precision
    )


def _model_and_views(arch, batch):
    torch.manual_seed(0)
    model = build_model(arch).train()
    side = arch["image_size"]
    views = torch.randn(2 * batch, arch["in_channels"], side, side)
    return model, views


def _autocast(precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _real_step_bytes(arch, batch, precision):
    """Saved activations of a real step (by storage, each once) + real weights, gradients
    and momentum after the optimiser step."""
    model, views = _model_and_views(arch, batch)
    state = [*model.parameters(), *model.buffers()]
    state_pointers = {t.untyped_storage().data_ptr() for t in state}
    saved: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in state_pointers:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with _autocast(precision):
            _, z = model(views)
        loss = nt_xent(z[:batch].float(), z[batch:].float(), 0.1)
    activations = sum(saved.values())
    loss.backward()
    optimizer.step()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    momentum = sum(
        value.nbytes for entry in optimizer.state.values() for value in entry.values()
        if isinstance(value, torch.Tensor)
    )
    weights = sum(t.nbytes for t in state)
    return activations, weights + grads + momentum


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [16, 32])
def test_estimate_is_within_a_factor_two_of_the_real_saved_tensors_and_state(batch, precision):
    activations, state = _real_step_bytes(SMALL, batch, precision)
    assert activations > state  # the measurement sees the batch, not only the weights
    estimate = _estimate(SMALL, batch, precision=precision)
    assert 0.5 <= estimate / (activations + state) <= 2.0, (estimate, activations, state)


def test_estimate_is_within_a_factor_two_of_the_profiled_peak(tmp_path):
    # The allocator's view: every tensor the step creates and frees, including what the
    # estimate leaves out (activation gradients, the loss), at the moment the sum is largest.
    from torch.profiler import ProfilerActivity, profile

    batch = 8
    model, views = _model_and_views(SMALL, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        _, z = model(views)
        nt_xent(z[:batch], z[batch:], 0.1).backward()
        optimizer.step()
    if not hasattr(prof, "export_memory_timeline"):  # pragma: no cover - a future torch
        pytest.skip("this torch's profiler has no memory timeline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, not yet removed
        path = tmp_path / "memory_timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())  # per event: live bytes by category
    peak = max(sum(at) for at in sizes)
    estimate = _estimate(SMALL, batch)
    assert 0.5 <= estimate / peak <= 2.0, (estimate, peak)


def test_bf16_halves_the_activations_and_micro_batches_cut_them():
    fp32 = _estimate(SMALL, 16)
    parameters = _estimate(SMALL, 1) - (_estimate(SMALL, 2) - _estimate(SMALL, 1))
    assert _estimate(SMALL, 16, precision="bf16") - parameters == pytest.approx(
        (fp32 - parameters) / 2, rel=1e-6
    )
    # Micro-batches of 4: the activations of 4 images, plus the whole batch of views.
    views = 2 * 16 * 3 * 32 * 32 * 4
    assert _estimate(SMALL, 16, micro=4) == _estimate(SMALL, 4) + views
    assert _estimate(SMALL, 16, micro=16) == fp32  # one micro-batch is no micro-batch


def test_a_normal_mnist_sized_run_passes():
    estimate = _estimate(MNIST, 256)
    assert 10e6 < estimate < 4e9


def test_a_forged_huge_config_is_refused_with_the_estimate_and_the_fix():
    # Each setting within config.py's bounds, together petabytes; built on the meta device,
    # so refusing it allocates nothing.
    huge = dict(RESNET50_IMAGENET, width=16.0, image_size=4096)
    with pytest.raises(ConfigError) as info:
        _estimate(huge, 4096)
    message = str(info.value)
    assert "\n" not in message
    for word in ("GB", "resnet50", "4096 px", "train.batch_size", "train.micro_batch_size",
                 "data.image_size", "model.width", "RAM"):
        assert word in message, (word, message)


def test_imagenet_resnet50_fits_an_80_gb_gpu_not_a_40_gb_one(monkeypatch):
    # The docstring's numbers; the GPU's size is forged, so no GPU is needed.
    gpu = types.SimpleNamespace(total_memory=80 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    cuda = torch.device("cuda", 0)
    estimate = _estimate(RESNET50_IMAGENET, 512, precision="bf16", device=cuda)
    assert 40e9 < estimate < 50e9
    gpu.total_memory = 40 * 10**9
    with pytest.raises(ConfigError, match=r"44\.4 GB .* 40\.0 GB .*GPU cuda:0"):
        _estimate(RESNET50_IMAGENET, 512, precision="bf16", device=cuda)


def test_the_cpu_share_is_the_ram_over_the_local_processes(monkeypatch):
    estimate = _estimate(MNIST, 256)
    ram, _ = budget._available_bytes(CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * ram // estimate))
    with pytest.raises(ConfigError, match="shared by"):
        _estimate(MNIST, 256)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert _estimate(MNIST, 256) == estimate
