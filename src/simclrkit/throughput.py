"""What a training step is made of: model FLOPs, achieved FLOP/s, MFU and the time breakdown.

The FLOPs of one training image (two views, forward and backward of encoder and head) are
counted once, on the meta device (``torch.utils.flop_counter``: shapes only, no memory, ~0.2 s
for a ResNet-50), so they are the model's FLOPs, not whatever the kernels happened to do
(MFU as in PaLM, App. B). ResNet-50 at 224 px: 24.3 GFLOP per view, 48.6 per image.

MFU divides the achieved model FLOP/s by the device's dense peak for the run's precision,
from the vendors' data sheets; a device not in the table gets none (the achieved TFLOP/s are
still logged).
"""

from __future__ import annotations

from typing import Any

import torch

# Dense (no sparsity) peak FLOP/s by precision, from the NVIDIA data sheets. Matched against
# torch.cuda.get_device_name() by substring, first match wins (so "H100 PCIe" before "H100").
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H20", {"bf16": 148e12, "fp16": 148e12, "fp32": 44e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
)


def training_flops_per_image(architecture: dict[str, Any], views: int = 2) -> float:
    """Model FLOPs of one training image: ``views`` forward and backward passes of the
    encoder and head, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from simclrkit.models import build_model

    size, channels = architecture["image_size"], architecture["in_channels"]
    with torch.device("meta"):
        model = build_model(architecture)
        images = torch.empty(2, channels, size, size)  # two: BatchNorm needs more than one
    with FlopCounterMode(display=False) as counter:
        _, z = model(images)
        z.sum().backward()
    return counter.get_total_flops() / 2 * views


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s at ``precision``, or None where it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in _PEAKS:
        if key in name:
            return peaks.get(precision)
    return None


def breakdown(
    *, seconds: float, steps: int, images: int, data_wait: float, feed: float,
    h2d_bytes: float = 0.0, flops_per_image: float, peak: float | None,
) -> dict[str, float]:  # fmt: skip
    """One log window's step-time breakdown.

    Args:
        seconds: the window's wall time; steps: trained in it; images: images this process
            trained in it (its share of the global batches).
        data_wait: seconds the loop blocked waiting for the host's batches.
        feed: seconds of host->device copies and device-side augmentation (on CUDA they run
            on a side stream beside the previous step, so they are not a part of ``seconds``).
        h2d_bytes: pixel bytes this process moved to the device in the window.
        flops_per_image: :func:`training_flops_per_image`; peak: :func:`peak_flops` or None.

    Returns:
        ``step_ms`` (wall per step), ``data_wait_share`` (of the wall time), ``feed_ms`` (per
        step), ``h2d_mb_per_step`` (uint8 where the device finishes the views), ``model_tflops`` (model TFLOP/s this process's device achieved) and ``mfu``
        (that over the device's peak, when the peak is known).
    """
    seconds = max(seconds, 1e-9)
    achieved = flops_per_image * images / seconds
    result = {
        "step_ms": 1000.0 * seconds / max(steps, 1),
        "data_wait_share": min(1.0, data_wait / seconds),
        "feed_ms": 1000.0 * feed / max(steps, 1),
        "h2d_mb_per_step": h2d_bytes / 1e6 / max(steps, 1),
        "model_tflops": achieved / 1e12,
    }
    if peak:
        result["mfu"] = achieved / peak
    return result
