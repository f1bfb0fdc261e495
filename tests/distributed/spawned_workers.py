"""What each of the 2 gloo processes of ``test_collectives.py`` computes (started by torch.multiprocessing.spawn).

Every input is drawn from a fixed seed, so the test process can compute the single-process
reference on the concatenated global batch. Results go to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Tiny encoder: eighth-width ResNet-18 with the CIFAR stem at 8 px, 1 channel; a 2-layer head.
ARCH = {
    "encoder": "resnet18",
    "width": 0.125,
    "in_channels": 1,
    "cifar_stem": True,
    "image_size": 8,
    "head": "nonlinear",
    "head_layers": 2,
    "proj_dim": 16,
}
NUM_IMAGES = 8  # global batch
TEMPERATURE = 0.5


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """(z1, z2), each (8, 16) float64: the global batch's projections for the loss checks."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, NUM_IMAGES, 16, generator=generator, dtype=torch.float64)
    return z[0], z[1]


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """(view1, view2), each (8, 1, 8, 8) float64: the global batch's two views."""
    generator = torch.Generator().manual_seed(1)
    views = torch.rand(2, NUM_IMAGES, 1, 8, 8, generator=generator, dtype=torch.float64)
    return views[0], views[1]


def model():
    from simclrkit.models import build_model

    torch.manual_seed(0)
    return build_model(ARCH).double()


# Two common gather mistakes (wrong gradients, right loss values): the checks must fail them.


def gather_without_gradient(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain all_gather: other processes' rows are constants, own rows get only local terms."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach())
    parts[dist.get_rank()] = local
    return torch.cat(parts), dist.get_rank() * local.shape[0]


class _MeanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        grad /= dist.get_world_size()  # the bug: averaging on top of DDP's averaging
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def gather_with_mean_backward(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    return _MeanBackward.apply(local), dist.get_rank() * local.shape[0]


def _loss_checks(rank: int, world: int) -> dict:
    from simclrkit import distributed
    from simclrkit.losses import NTXentLoss

    z1, z2 = embeddings()
    rows = slice(rank * NUM_IMAGES // world, (rank + 1) * NUM_IMAGES // world)
    gathers = {
        "correct": (distributed.gather_with_grad, None),
        "correct_chunked": (distributed.gather_with_grad, 3),
        "without_gradient": (gather_without_gradient, None),
        "mean_backward": (gather_with_mean_backward, None),
    }
    results = {}
    for name, (gather, chunk_size) in gathers.items():
        local1 = z1[rows].clone().requires_grad_()
        local2 = z2[rows].clone().requires_grad_()
        # The Eq. 1 mean (scale 1), compared with nt_xent on the whole batch.
        loss = NTXentLoss(TEMPERATURE, chunk_size=chunk_size, gather=gather, reduction="mean")(
            local1, local2
        )
        loss.backward()
        results[name] = {"loss": loss.detach(), "grad1": local1.grad, "grad2": local2.grad}
    gathered, offset = distributed.gather_with_grad(torch.cat([z1[rows], z2[rows]], dim=1))
    results["gathered"], results["offset"] = gathered, offset
    return results


def _training_step(rank: int, world: int, *, sync_bn: bool, micro_batch_size: int | None) -> dict:
    """One DDP step of the real training code path on this process's rows."""
    from simclrkit import distributed
    from simclrkit.losses import NTXentLoss
    from simclrkit.step import contrastive_backward

    network = model()
    plain_keys = list(network.state_dict())
    if sync_bn:
        network = distributed.convert_sync_batchnorm(network)
    ddp = distributed.wrap_ddp(network, torch.device("cpu"))
    loss_fn = NTXentLoss(TEMPERATURE, gather=distributed.gather_with_grad)
    view1, view2 = images()
    rows = slice(rank * NUM_IMAGES // world, (rank + 1) * NUM_IMAGES // world)
    views = torch.cat([view1[rows], view2[rows]])
    loss, *_ = contrastive_backward(ddp, views, loss_fn, micro_batch_size=micro_batch_size)
    return {
        "loss": distributed.all_reduce_mean(loss),
        "grads": {name: p.grad.clone() for name, p in network.named_parameters()},
        "state": {k: v.clone() for k, v in network.state_dict().items()},
        "keys_unchanged": list(network.state_dict()) == plain_keys,
        "norm_types": sorted(
            {type(m).__name__ for m in network.modules() if "Norm" in type(m).__name__}
        ),
    }


def run_checks(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from simclrkit import distributed

    info = distributed.init_from_env("cpu", timeout_seconds=60)
    try:
        results = {
            "info": (info.rank, info.world_size, info.local_rank, info.is_main,
                     info.initialized_here),
            "is_main": distributed.is_main(),
            "any_one": distributed.all_reduce_any(rank == 1),
            "any_none": distributed.all_reduce_any(False),
            # a device tensor (rank 0's non-finite check) and a bool (rank 1's stop signal)
            "flags": distributed.all_reduce_flags(
                ~torch.isfinite(torch.tensor(float("nan") if rank == 0 else 1.0)), rank == 1, False
            ),
            "mean": distributed.all_reduce_mean(torch.tensor([float(rank), 10.0])),
            "losses": _loss_checks(rank, world),
            "step_sync_bn": _training_step(rank, world, sync_bn=True, micro_batch_size=None),
            "step_local_bn": _training_step(rank, world, sync_bn=False, micro_batch_size=None),
            "step_micro": _training_step(rank, world, sync_bn=True, micro_batch_size=2),
        }
        # Unequal row counts are refused, not gathered into garbage.
        try:
            distributed.gather_with_grad(torch.zeros(2 + rank, 3))
            results["unequal"] = "accepted"
        except ValueError as error:
            results["unequal"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()
