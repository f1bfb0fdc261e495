"""What a training run will allocate, checked against what the machine has, before anything
is built.

A config can pass every bound in ``config.py`` and still ask for far more memory than the
machine has: ResNet-152 at 4096 px, say, each setting legal alone. Without this check such a
run builds the model, loads the data and then dies in its first step (a CUDA out-of-memory
traceback, or the kernel's OOM killer on a CPU, which leaves no message at all).
:func:`check_training_memory` estimates the bytes instead, from a model built on the ``meta``
device (shapes without storage), and refuses the run with one line that says what to lower.

The estimate counts what dominates training memory:

* parameters, their gradients and one optimiser buffer per parameter (the momentum of LARS and
  SGD), all float32; AdamW keeps a second buffer, which is not counted (parameters are a few
  percent of the total at the sizes where this check matters);
* the activations that autograd saves for the backward pass, measured by a meta forward of one
  image's two views and scaled to the images of one forward pass;
* with micro-batches, the whole per-device batch of views as well (float32).

It leaves out the loss's working memory (at most a few hundred MB: ``losses.py`` chunks large
batches), the gradients of activations alive during the backward pass, kernel workspaces and
allocator fragmentation, so the real peak is usually somewhat higher; a run the check admits
can still run out of memory near the limit. It is meant to catch the settings that ask for
several times what there is, not to tune a batch size to the last gigabyte.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from simclrkit.config import ConfigError

_FLOAT32_BYTES = 4
_GB = 1e9


def check_training_memory(
    arch: dict[str, Any],
    *,
    batch_per_device: int,
    micro_batch_size: int | None,
    device: torch.device,
    precision: str,
) -> int:
    """Estimates the bytes one training process allocates and refuses what cannot fit.

    Costs a meta build and a meta forward of one image (two views): no memory and
    milliseconds, well under a second even for ResNet-152 at 4096 px. At ImageNet size
    (ResNet-50, 224 px, batch 512 per GPU, bf16) the estimate is 44.4 GB: 44.1 GB of saved
    activations (172 MB per image of two views in float32, half that in bf16) and 0.34 GB of
    parameters, gradients and momentum (28.0 M parameters). That fits an 80 GB GPU and is
    refused on a 40 GB one; at fp32 it is 88.4 GB, and with ``micro_batch_size=64`` in bf16
    6.5 GB.

    Args:
        arch: the model, as :func:`simclrkit.train.architecture` describes it.
        batch_per_device: images (pairs of views) per process and step.
        micro_batch_size: images per forward pass with gradient caching, or None for the
            whole per-device batch at once.
        device: where the run trains (``cuda``, ``cuda:N`` or ``cpu``).
        precision: ``fp32``, ``bf16`` or ``fp16`` (``auto`` is counted as fp32).

    Returns:
        The estimated bytes.

    Raises:
        ConfigError: the estimate exceeds the device's memory (a GPU's total memory; on the
            CPU, the physical memory shared by the ``LOCAL_WORLD_SIZE`` processes of this
            machine).
    """
    parameter_bytes, activation_bytes_per_image = _model_bytes(arch)
    images_per_forward = min(micro_batch_size or batch_per_device, batch_per_device)
    activations = activation_bytes_per_image * images_per_forward
    if precision in ("bf16", "fp16"):
        # Autocast runs convolutions, matrix products and (following their inputs) BatchNorm
        # and ReLU in 16 bits, so nearly every saved activation takes half the bytes; a few
        # stay float32 (the input of the first convolution, the loss), hence "roughly".
        activations //= 2
    views = 0
    if images_per_forward < batch_per_device:
        side = arch["image_size"]
        views = 2 * batch_per_device * arch["in_channels"] * side * side * _FLOAT32_BYTES
    # Weights, gradients and the momentum buffer (buffers such as BN statistics are in
    # parameter_bytes once).
    estimate = 3 * parameter_bytes + activations + views
    available, where = _available_bytes(device)
    if estimate > available:
        raise ConfigError(
            f"memory: this run needs about {estimate / _GB:,.1f} GB per process "
            f"({arch['encoder']} width {arch['width']:g} at {arch['image_size']} px, "
            f"{images_per_forward} images per forward pass, {precision}) but only "
            f"{available / _GB:,.1f} GB is available ({where}); lower train.batch_size, set "
            "train.micro_batch_size, or lower data.image_size or model.width"
        )
    return estimate


def _model_bytes(arch: dict[str, Any]) -> tuple[int, int]:
    """(float32 bytes of the parameters, bytes autograd saves per image of two views)."""
    from simclrkit.models import build_model

    with torch.device("meta"):
        model = build_model(arch)
    model.train()  # BatchNorm saves what it saves in training
    state = [*model.parameters(), *model.buffers()]
    parameter_bytes = sum(t.numel() for t in state if t.is_floating_point()) * _FLOAT32_BYTES
    # A storage is the unit of memory: the same activation is often saved by two operations
    # (a ReLU's output and the next convolution's input), and views share their base's.
    state_storages = {_storage_key(t) for t in state}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in state_storages:
            saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    side = arch["image_size"]
    views = torch.empty(2, arch["in_channels"], side, side, device="meta")
    # The graph (held by z) keeps every saved storage alive until the sum is taken, so no two
    # of them can share an address (the key).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, z = model(views)
    activation_bytes = sum(saved.values())
    del z
    return parameter_bytes, activation_bytes


def _storage_key(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage object: the same for every view of it, and for
    meta tensors too, whose data pointer is always 0 (``_cdata`` is private, but the only
    identity a storage exposes)."""
    return tensor.untyped_storage()._cdata


def _available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes the run may use, the device in words)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"the memory of GPU {device}"
    processes = _local_world_size()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if processes > 1:
        return total // processes, f"this machine's RAM shared by {processes} processes"
    return total, "this machine's RAM"


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:  # torchrun sets it; anything else is not ours to judge here
        return 1
