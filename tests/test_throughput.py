"""Model FLOPs per training image against a count written out from the layers' shapes, and the
step-time breakdown's arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simclrkit.models import build_model
from simclrkit.throughput import breakdown, peak_flops, training_flops_per_image


def _multiply_adds(model: nn.Module, images: torch.Tensor) -> list[int]:
    """Multiply-adds of each convolution and linear layer in one forward pass of one image,
    in the order they run, from the output shapes that forward hooks see (no flop counter)."""
    counts = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            counts.append(output.numel() * module.in_channels // module.groups * kernel)
        else:
            counts.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    model(images)
    for hook in hooks:
        hook.remove()
    return [c // images.shape[0] for c in counts]


@pytest.mark.parametrize("encoder,width,size,cifar", [
    ("resnet18", 0.25, 32, True), ("resnet50", 0.25, 64, False),
])  # fmt: skip
def test_training_flops_are_two_views_of_forward_and_backward_of_every_layer(
    encoder, width, size, cifar
):
    arch = {"encoder": encoder, "width": width, "in_channels": 3, "cifar_stem": cifar,
            "image_size": size, "head": "nonlinear", "head_layers": 2, "proj_dim": 128}  # fmt: skip
    macs = _multiply_adds(build_model(arch), torch.rand(2, 3, size, size))
    # 2 FLOPs per multiply-add; the backward pass costs twice the forward (the input's and
    # the weight's gradients), except that the first layer needs no input gradient.
    per_view = 2 * (3 * sum(macs) - macs[0])
    assert training_flops_per_image(arch) == pytest.approx(2 * per_view, rel=1e-9)
    assert training_flops_per_image(arch, views=1) == pytest.approx(per_view, rel=1e-9)


def test_resnet50_at_224_is_about_4_1_giga_multiply_adds_a_view():
    arch = {"encoder": "resnet50", "width": 1.0, "in_channels": 3, "cifar_stem": False,
            "image_size": 224, "head": "nonlinear", "head_layers": 2, "proj_dim": 128}  # fmt: skip
    # torchvision lists ResNet-50 at 4.09 G multiply-adds; the head adds 2048^2 + 2048 x 128
    per_view = training_flops_per_image(arch, views=1) / 3 / 2
    assert 4.05e9 < per_view < 4.15e9


def test_breakdown_of_a_window():
    values = breakdown(seconds=2.0, steps=4, images=100, data_wait=0.5, feed=0.2,
                       h2d_bytes=8e6, flops_per_image=1e9, peak=1e12)  # fmt: skip
    assert values == pytest.approx({"step_ms": 500.0, "data_wait_share": 0.25, "feed_ms": 50.0,
                                    "h2d_mb_per_step": 2.0, "model_tflops": 0.05,
                                    "mfu": 0.05})  # fmt: skip
    assert "mfu" not in breakdown(seconds=1.0, steps=1, images=1, data_wait=0.0, feed=0.0,
                                  flops_per_image=1.0, peak=None)  # fmt: skip
    assert peak_flops(torch.device("cpu"), "bf16") is None
