"""Everything that knows about process groups: setup, the gradient-carrying gather, SyncBN, DDP.

This is the only module that imports ``torch.distributed``. Every helper is the identity (or a
no-op) when no process group is initialised, so single-process code calls them unconditionally.

Multi-process SimCLR needs two things the paper spells out (§2.2) and the reference does on TPUs
(``objective.py``'s ``tpu_cross_replica_concat``, ``resnet.py``'s cross-replica BN):

* **Global negatives.** Every process contrasts its local anchors against the views of ALL
  processes. :func:`gather_with_grad` gathers them so that gradients flow back to the process
  that computed each row (see :class:`_GatherWithGrad` for why the backward sums).
* **Global BatchNorm.** Batch statistics over the whole global batch, or a process can use its
  local statistics to tell its own positives apart (paper §2.2). :func:`convert_sync_batchnorm`
  swaps every BatchNorm for PyTorch's ``nn.SyncBatchNorm`` on CUDA and, because that one
  supports accelerators only, for :class:`CpuSyncBatchNorm`, an exact two-pass version, on CPU.

How the gradients add up. Process r holds n images (2n views) and computes
``loss_r`` = mean over its 2n anchors of Eq. 1 against all 2N gathered views. With equal n
everywhere the global loss is ``L = (1/W) sum_r loss_r`` (the mean over all 2N anchors). DDP
averages parameter gradients over the W processes, i.e. it applies the 1/W; what each process
must therefore hand to DDP is ``d(sum_r loss_r)/d theta`` restricted to its own rows, and that is
exactly what the summing backward of the gather (and of SyncBN's statistics) provides.
``tests/distributed`` checks 2 processes against 1 process on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CpuSyncBatchNorm",
    "DistInfo",
    "all_gather_objects",
    "all_reduce_any",
    "all_reduce_flags",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "gather_rows",
    "gather_with_grad",
    "init_from_env",
    "is_initialized",
    "is_main",
    "no_sync",
    "shutdown",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        is_main: rank 0: the process that writes files and prints.
        initialized_here: :func:`init_from_env` created the process group (and so the caller
            should :func:`shutdown` it); False for one process or a group the caller made.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    initialized_here: bool = False


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def init_from_env(device_type: str, timeout_seconds: float = 300.0) -> DistInfo:
    """Joins the job torchrun (or SLURM + torchrun) describes in the environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Uses
    NCCL on CUDA (after selecting GPU ``LOCAL_RANK``) and gloo on the CPU. Without
    ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` this is a plain single process and nothing is
    initialised. An already initialised group (made by the caller) is used as it is.

    Args:
        device_type: "cuda" or "cpu", the training device's type.
        timeout_seconds: bound on every collective: a process that waits longer for the others
            (a hung or vanished peer) fails with an error instead of waiting forever. It must
            exceed the longest pause one process takes alone between collectives (rank 0
            writing a checkpoint).

    Returns:
        The :class:`DistInfo` of this process.
    """
    if is_initialized():
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, dist.get_world_size(), local_rank, rank == 0, False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_seconds)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    restart_count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart_count is not None:
        # torchrun's workers share the agent's key-value store across restarts, so the
        # restarted group would read the dead workers' addresses (gloo: "connection refused";
        # NCCL: a stale unique id; pytorch/pytorch#135712). Each attempt gets its own keys.
        store = dist.PrefixStore(f"simclrkit/attempt-{restart_count}", store)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        # device_id binds the communicator to this GPU up front (no guessing in barrier()).
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=world_size, timeout=timeout,
            device_id=torch.device("cuda", local_rank),
        )
    else:
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    return DistInfo(rank, world_size, local_rank, rank == 0, True)


def shutdown() -> None:
    """Destroys the default process group, if any."""
    if is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return _rank() == 0


def barrier() -> None:
    """Waits until every process arrives (no-op in a single process)."""
    if _world_size() > 1:
        dist.barrier()


# torch 2.14 renamed all_gather_into_tensor (deprecated there) to all_gather_single; the
# package supports torch >= 2.4, which has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all processes (a new, detached tensor; a copy alone)."""
    result = tensor.detach().clone()
    if _world_size() > 1:
        dist.all_reduce(result)
        result /= dist.get_world_size()
    return result


def all_reduce_any(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one.

    Used where all processes must take the same branch: a non-finite loss seen by one process
    skips or stops the step everywhere; a stop signal delivered to one process stops all of
    them at the same step.
    """
    return all_reduce_flags(bool(flag))[0]


def all_reduce_flags(*flags: Tensor | bool) -> list[bool]:
    """Each flag True on every process when it is True on at least one, in ONE host sync.

    Flags may be device tensors (a finiteness check computed on the GPU) or Python bools;
    they are stacked where the collective runs and read back together, so a training step
    that needs several agreements waits for the device once.
    """
    device = _collective_device() if _world_size() > 1 else None
    if device is None:
        device = next((f.device for f in flags if isinstance(f, Tensor)), torch.device("cpu"))
    values = torch.stack([
        f.detach().to(device, torch.float32).reshape(()) if isinstance(f, Tensor)
        # a fill kernel: torch.tensor(value, device=cuda) would copy from pageable memory,
        # which waits for the stream, a second sync
        else torch.full((), 1.0 if f else 0.0, device=device)
        for f in flags
    ])  # fmt: skip
    if _world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [v > 0 for v in values.tolist()]


def all_reduce_sum(values: Sequence[int]) -> list[int]:
    """Element-wise sums of small integer counts over all processes (the values themselves in
    a single process)."""
    if _world_size() <= 1:
        return [int(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable, small), in rank order; ``[obj]`` in one process.

    Meant for rare, small messages (the bad files a log interval found); it pickles.
    """
    if _world_size() <= 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself in one process)."""
    if _world_size() <= 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(local: Tensor) -> Tensor | None:
    """All processes' rows in rank order on rank 0 (None elsewhere); ``local`` alone when
    single. Rows may differ in number between processes. For evaluation features: a
    collective of one tensor, padded to the largest count."""
    if _world_size() <= 1:
        return local
    device = _collective_device()
    counts = all_gather_objects(int(local.shape[0]))
    padded = local.new_zeros((max(counts), *local.shape[1:])).to(device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    if dist.get_rank() != 0:
        return None
    return torch.cat([part[:count].cpu() for part, count in zip(parts, counts)])


# --------------------------------------------------------------------------------------
# Global negatives (paper §2.2)
# --------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward pass; the summed gradient of this process's rows backward.

    Forward: every process's (n, K) rows, stacked in rank order -> (W n, K).

    Backward: process s receives ``d loss_s / d all`` for the whole gathered tensor, because its
    loss uses every process's rows as candidates. The rows of process r enter the loss of EVERY
    process, so the gradient of the summed loss ``sum_s loss_s`` with respect to them is
    ``sum_s d loss_s / d rows_r``: an all-reduce (sum) of the incoming gradients, of which
    process r keeps its own slice. Two common mistakes, both caught by ``tests/distributed``:
    averaging here instead scales every candidate term by 1/W on top of DDP's averaging; a
    plain ``all_gather`` (its output carries no gradient) drops the terms of the other
    processes' losses altogether. Either way the loss VALUE is unchanged, only gradients differ.

    The all-reduce runs on every backend; a reduce-scatter would move half the data, but this
    tensor holds the batch's embeddings (2 x 128 floats per image), negligible next to DDP's
    gradient all-reduce.
    """

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local = local.contiguous()
        gathered = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local)
        ctx.rows = (rank * local.shape[0], (rank + 1) * local.shape[0])
        return gathered

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad)
        start, stop = ctx.rows
        return grad[start:stop]


def gather_with_grad(local: Tensor) -> tuple[Tensor, int]:
    """Rows of all processes, with gradients flowing back to their owners.

    This is the ``gather`` that :class:`simclrkit.losses.NTXentLoss` takes: it maps this
    process's (n, K) rows to ``(all rows (W n, K), offset)``, where rows
    ``[offset, offset + n)`` are this process's own. Every process must hold the same n
    (checked; the batch pipeline guarantees it). Without a process group: ``(local, 0)``.

    Args:
        local: (n, K) tensor, e.g. ``cat([z1, z2], dim=1)``.

    Returns:
        (gathered (W n, K), offset = rank * n).

    Raises:
        ValueError: when processes hold different numbers of rows.
    """
    if _world_size() <= 1:
        return local, 0
    counts = torch.tensor([local.shape[0]], device=local.device)
    all_counts = counts.new_empty(dist.get_world_size())
    _all_gather_single(all_counts, counts)
    if not bool((all_counts == local.shape[0]).all()):
        raise ValueError(
            f"gather_with_grad needs the same number of rows on every process, got "
            f"{all_counts.tolist()}"
        )
    return _GatherWithGrad.apply(local), dist.get_rank() * local.shape[0]


# --------------------------------------------------------------------------------------
# Synchronised BatchNorm (paper §2.2: "global BN")
# --------------------------------------------------------------------------------------


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over processes; backward sums the gradients (the sum feeds every process's loss)."""

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        total = local.contiguous().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes, for CPU (gloo) training.

    PyTorch's ``nn.SyncBatchNorm`` runs on accelerators only (and DDP refuses it on a CPU
    model), so CPU runs use this one; CUDA runs use PyTorch's. The statistics are computed in
    two passes over the global batch: the mean from all-reduced per-channel sums, then the
    (biased) variance from all-reduced sums of squared deviations from that mean. Two passes,
    not ``E[x^2] - E[x]^2``, so a 2-process run matches one process's ``F.batch_norm`` to float
    rounding. The running variance uses the unbiased estimate over the global count, as
    ``F.batch_norm`` does. Outside training, or without a multi-process group, it is a plain
    BatchNorm. Any input of 2 or more dimensions (B, C, ...) is accepted.

    The state dict is that of the BatchNorm it replaces (same keys), so checkpoints load into
    a plain model.
    """

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - PyTorch's argument name
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        if not (self.training and _world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        # Statistics in float32 at least (bf16 autocast inputs), as cuDNN does.
        values = input if input.dtype in (torch.float32, torch.float64) else input.float()
        local_count = values.new_tensor([input.numel() // input.shape[1]])
        sums = _AllReduceSumWithGrad.apply(torch.cat([values.sum(dims), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = values - mean.view(shape)
        var = _AllReduceSumWithGrad.apply(centred.square().sum(dims)) / count
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            output = output * self.weight.view(shape)
        if self.bias is not None:
            output = output + self.bias.view(shape)

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased_var = var * (count / (count - 1).clamp(min=1))
                # The update F.batch_norm makes: (1 - factor) * running + factor * batch.
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(
                    unbiased_var.to(self.running_var.dtype) * factor
                )
        return output.to(input.dtype)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _to_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, _BATCHNORMS):
        converted = CpuSyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            # The same Parameter objects (bias may be None: a BN without beta stays so).
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _to_cpu_sync_batchnorm(child))
    return converted


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Makes every BatchNorm of ``model`` normalise over the global batch (multi-process only).

    On CUDA (judged by the model's parameters) this is ``nn.SyncBatchNorm``, on the CPU
    :class:`CpuSyncBatchNorm`. Parameters and buffers are shared, not copied, so an optimiser
    built on the model's parameters stays valid. Returns ``model`` (modified in place) unless
    ``model`` itself is a BatchNorm. Identity without a multi-process group.
    """
    if _world_size() <= 1:
        return model
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_cpu_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)``, or ``model`` itself in a single process.

    Buffers are not broadcast from rank 0 at every forward when the model has SyncBatchNorm:
    its running statistics are already identical everywhere (computed from the same global
    statistics), and the broadcast is a collective per forward pass. Every parameter takes part
    in the loss, so ``find_unused_parameters`` stays off.
    """
    if _world_size() <= 1:
        return model
    has_sync_bn = any(
        isinstance(m, (nn.SyncBatchNorm, CpuSyncBatchNorm)) for m in model.modules()
    )
    # torch 2.14 renamed broadcast_buffers (deprecated there) to forward_sync_buffers; both
    # leave the initial synchronisation on.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        buffer_option = {"forward_sync_buffers": not has_sync_bn}
    else:
        buffer_option = {"broadcast_buffers": not has_sync_bn}
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **buffer_option,
    )


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` (gradients accumulate locally, no all-reduce) for a DDP model;
    a null context otherwise. A compiled DDP model (``torch.compile(DDP(model))``) counts as
    the DDP model it wraps."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
