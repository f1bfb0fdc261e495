"""One contrastive step: the forward pass of both views, NT-Xent and the backward pass.

:func:`contrastive_backward` runs the step whole or in micro-batches (gradient caching, for
``train.micro_batch_size``); beside it are the helpers the loop calls around it: the autocast
precision, the check that the loss and gradients are finite, and the contrastive accuracy over
the global batch. The loop itself is :func:`simclrkit.train.pretrain`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from simclrkit import distributed
from simclrkit.losses import contrastive_accuracy

# --------------------------------------------------------------------------------------
# Forward and backward of one step, whole or in micro-batches (gradient caching)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Puts every BatchNorm running statistic back as it was when the block ends."""
    buffers = [
        buffer
        for module in model.modules()
        # _NormBase: every BatchNorm (plain, Sync, CPU sync) and InstanceNorm, as in optim.py.
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class StepOutput(NamedTuple):
    """What one contrastive step leaves behind, detached: the 0-dim loss of this process's
    anchors, the (n, D) embeddings of each view and h (2n, F) of both views."""

    loss: Tensor
    z1: Tensor
    z2: Tensor
    h: Tensor


def contrastive_backward(
    model: nn.Module,
    views: Tensor,
    loss_fn: nn.Module,
    *,
    micro_batch_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> StepOutput:
    """Forward pass of both views, NT-Xent (paper Eq. 1) and backward; gradients accumulate.

    Without micro-batches: one forward pass of all 2n views (BatchNorm over both views).

    With ``micro_batch_size`` m < n, gradient caching (Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup"): the loss couples every
    embedding with every other one, so it cannot be split, but the network can.

    1. z of all views, m images (2m views: both views of each) per forward pass, WITHOUT a
       graph: activation memory of one micro-batch.
    2. The loss on the whole batch with z as a leaf, and its gradient d loss / d z (2n x D
       numbers); through the loss's gather this includes the other processes' losses.
    3. Each micro-batch again WITH a graph, backpropagating its slice of d loss / d z; the
       parameter gradients add up to those of the whole batch. Under DDP only the last
       micro-batch's backward all-reduces (``no_sync`` for the others).

    The model has no dropout, so pass 3 recomputes exactly the z of pass 1. BatchNorm: each
    micro-batch is normalised with its own statistics in both passes (consistent, but unlike
    the full batch, where all 2n views share them); the running statistics are restored after
    pass 1, so they are updated once per micro-batch, by pass 3.

    Args:
        model: maps images (B, C, H, W) to (h, z) (a :class:`SimCLR`, possibly wrapped in DDP
            or compiled).
        views: (2n, C, H, W): this process's n first views, then the n second views.
        loss_fn: maps (z1, z2) to the scalar loss (:class:`NTXentLoss`).
        micro_batch_size: images per forward pass; None (or >= n) for one pass.
        autocast: makes the autocast context of the forward passes.
        scaler: fp16 gradient scaler; the backward then starts from the scaled loss.

    Returns:
        A :class:`StepOutput` (h of micro-batches is pass 1's, equal to pass 3's).
    """
    num_images = views.shape[0] // 2

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if micro_batch_size is None or micro_batch_size >= num_images:
        with autocast():
            h, z = model(views)
        z1, z2 = z[:num_images], z[num_images:]
        loss = loss_fn(z1, z2)
        backward(loss)
        return StepOutput(loss.detach(), z1.detach(), z2.detach(), h.detach())

    starts = range(0, num_images, micro_batch_size)

    def micro_views(start: int) -> Tensor:
        stop = start + micro_batch_size
        return torch.cat([views[start:stop], views[num_images + start : num_images + stop]])

    # 1. Embeddings without a graph; BN statistics untouched (pass 3 updates them).
    with torch.no_grad(), _batchnorm_statistics_kept(model), autocast():
        micro = [model(micro_views(start)) for start in starts]
    micro_z = [z for _, z in micro]
    z1 = torch.cat([z[: len(z) // 2] for z in micro_z]).requires_grad_()
    z2 = torch.cat([z[len(z) // 2 :] for z in micro_z]).requires_grad_()
    # h in the same order as the views: every first view, then every second view
    h = torch.cat([h[: len(h) // 2] for h, _ in micro] + [h[len(h) // 2 :] for h, _ in micro])
    # 2. The loss of the whole batch and d loss / d z.
    loss = loss_fn(z1, z2)
    backward(loss)
    # 3. Re-forward with a graph, one micro-batch at a time, and backpropagate its gradient.
    for number, start in enumerate(starts):
        last = number == len(starts) - 1
        with contextlib.nullcontext() if last else distributed.no_sync(model):
            with autocast():
                _, z = model(micro_views(start))
            stop = start + micro_batch_size
            grad = torch.cat([z1.grad[start:stop], z2.grad[start:stop]])
            torch.autograd.backward(z, grad.to(z.dtype))
    return StepOutput(loss.detach(), z1.detach(), z2.detach(), h)
def _nonfinite(loss: Tensor, model: nn.Module, gradients: bool = True) -> Tensor:
    """A 0-dim bool tensor on the loss's device: the loss (and, with ``gradients``, the
    global gradient norm) is NaN or infinite. Reduced on the device: reading it is the
    step's one host sync.

    ``clip_grad_norm_`` with an infinite bound is the public way to get the total norm in one
    fused pass; it leaves the gradients unchanged (it scales them by 1).
    """
    total = loss.detach().float()
    params = [p for p in model.parameters() if p.grad is not None] if gradients else []
    if params:
        total = total + torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return ~torch.isfinite(total)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Maps ``auto`` to the fastest precision the device computes natively.

    bf16 autocast doubles a ResNet's training speed on CPUs with AVX512-BF16 or AMX
    (``benchmarks/step.py``) but is slower than fp32 on CPUs without them, hence the check.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "mps":
        return "fp32"  # bf16 on MPS depends on the macOS version: asked for, it is checked
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else "fp32"


def _autocast_factory(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _contrastive_accuracy(z1: Tensor, z2: Tensor) -> float:
    """Accuracy over the GLOBAL batch (every process's views are candidates), as the loss."""
    with torch.no_grad():
        gathered, _ = distributed.gather_with_grad(torch.cat([z1, z2], dim=1))
        all1, all2 = gathered.split(z1.shape[1], dim=1)
        return float(contrastive_accuracy(all1, all2))
