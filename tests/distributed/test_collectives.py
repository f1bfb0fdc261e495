"""2 gloo processes vs 1 process on the concatenated batch: the gather, SyncBN, DDP, reductions.

The two processes (``workers.py``, started once by ``torch.multiprocessing.spawn``) each hold
half of a fixed global batch. The references here are single-process computations on the
whole batch, in float64 so that the tolerances can be tight.

How the gradients compare. Process r's loss is the mean over ITS anchors, and the global loss
is the mean over processes, L = (1/W) sum_r loss_r. The gradient that reaches process r's rows
is d(sum_s loss_s)/d z_r (the gather's summed backward), so dL/dz_r = that / W. For parameters
DDP applies the 1/W itself, so DDP's gradients must equal the single-process ones directly.
"""

from __future__ import annotations

import socket

import pytest
import spawned_workers as workers
import torch
import torch.multiprocessing as mp

from simclrkit import distributed
from simclrkit.losses import NTXentLoss, nt_xent
from simclrkit.step import contrastive_backward

WORLD = 2
ROWS = workers.NUM_IMAGES // WORLD


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("collectives")
    mp.spawn(workers.run_checks, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference_step(*, micro_batch_size=None, order=None) -> dict:
    """The training step of one process on the whole global batch (``order`` permutes images)."""
    network = workers.model()
    view1, view2 = workers.images()
    if order is not None:
        view1, view2 = view1[order], view2[order]
    loss, *_ = contrastive_backward(
        network, torch.cat([view1, view2]), NTXentLoss(workers.TEMPERATURE),
        micro_batch_size=micro_batch_size,
    )
    return {
        "loss": loss,
        "grads": {name: p.grad for name, p in network.named_parameters()},
        "state": network.state_dict(),
    }


def _max_relative_error(a: dict, b: dict) -> float:
    worst = 0.0
    for key, value in b.items():
        if value.is_floating_point():
            scale = value.abs().max().clamp(min=1e-12)
            worst = max(worst, ((a[key] - value).abs().max() / scale).item())
        else:
            assert torch.equal(a[key], value), key
    return worst


def test_process_info_and_reductions(ranks):
    for rank, result in enumerate(ranks):
        assert result["info"] == (rank, WORLD, rank, rank == 0, True)
        assert result["is_main"] == (rank == 0)
        assert result["any_one"] is True  # only rank 1 said True: both see True
        assert result["any_none"] is False
        assert result["flags"] == [True, True, False]  # each flag agreed on, in one reduction
        assert torch.equal(result["mean"], torch.tensor([0.5, 10.0]))
        assert "same number of rows" in result["unequal"]


def test_gather_returns_all_rows_in_rank_order_with_the_offset(ranks):
    z1, z2 = workers.embeddings()
    for rank, result in enumerate(ranks):
        assert torch.equal(result["losses"]["gathered"], torch.cat([z1, z2], dim=1))
        assert result["losses"]["offset"] == rank * ROWS


@pytest.mark.parametrize("variant", ["correct", "correct_chunked"])
def test_gathered_loss_and_gradients_equal_one_process_on_the_whole_batch(ranks, variant):
    z1, z2 = (z.clone().requires_grad_() for z in workers.embeddings())
    loss = nt_xent(z1, z2, workers.TEMPERATURE)
    loss.backward()
    losses = [r["losses"][variant]["loss"] for r in ranks]
    torch.testing.assert_close(sum(losses) / WORLD, loss.detach(), rtol=1e-12, atol=0)
    for rank, result in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(result["losses"][variant]["grad1"] / WORLD, z1.grad[rows],
                                   rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(result["losses"][variant]["grad2"] / WORLD, z2.grad[rows],
                                   rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variant", ["without_gradient", "mean_backward"])
def test_the_known_gather_bugs_fail_the_same_comparison(ranks, variant):
    """The check above can fail: the two gathers popular ports shipped give other gradients."""
    z1, z2 = (z.clone().requires_grad_() for z in workers.embeddings())
    nt_xent(z1, z2, workers.TEMPERATURE).backward()
    worst = 0.0
    for rank, result in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        got = torch.cat([result["losses"][variant]["grad1"], result["losses"][variant]["grad2"]])
        want = torch.cat([z1.grad[rows], z2.grad[rows]])
        worst = max(worst, ((got / WORLD - want).norm() / want.norm()).item())
    assert worst > 0.05
    # the forward value is right in every variant: only a gradient test catches these bugs
    losses = [r["losses"][variant]["loss"] for r in ranks]
    assert torch.allclose(sum(losses) / WORLD, nt_xent(*workers.embeddings(), workers.TEMPERATURE))


def test_ddp_step_with_sync_bn_equals_one_process_on_the_whole_batch(ranks):
    reference = _reference_step()
    for result in ranks:
        step = result["step_sync_bn"]
        assert step["norm_types"] == ["CpuSyncBatchNorm"] and step["keys_unchanged"]
        torch.testing.assert_close(step["loss"], reference["loss"], rtol=1e-12, atol=0)
        assert _max_relative_error(step["grads"], reference["grads"]) < 1e-9
        # running statistics too (they are what evaluation uses)
        assert _max_relative_error(step["state"], reference["state"]) < 1e-9


def test_local_batchnorm_breaks_the_equivalence(ranks):
    """Without SyncBN each process normalises with its own half-batch: measurably different."""
    reference = _reference_step()
    step = ranks[0]["step_local_bn"]
    assert step["norm_types"] != ["CpuSyncBatchNorm"]
    assert _max_relative_error(step["grads"], reference["grads"]) > 1e-3


def test_gradient_caching_under_ddp_equals_one_process_on_the_same_micro_batches(ranks):
    """2 processes x 2 micro-batches of 2 images vs 1 process x 2 micro-batches of 4.

    With SyncBN the k-th micro-batch of the job is rank 0's k-th pair of images plus rank 1's;
    one process sees the same sets when the images are reordered so, and the loss does not
    depend on the order. This covers DDP's no_sync accumulation over micro-batches too.
    """
    order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])
    reference = _reference_step(micro_batch_size=4, order=order)
    for result in ranks:
        step = result["step_micro"]
        torch.testing.assert_close(step["loss"], reference["loss"], rtol=1e-12, atol=0)
        assert _max_relative_error(step["grads"], reference["grads"]) < 1e-9
        assert _max_relative_error(step["state"], reference["state"]) < 1e-9
    # and it is not the full-batch step: BN statistics per micro-batch differ
    assert _max_relative_error(ranks[0]["step_micro"]["grads"], _reference_step()["grads"]) > 1e-3


def test_flags_without_a_process_group_are_the_flags():
    flags = distributed.all_reduce_flags(torch.tensor(False), True, torch.tensor(1.0) > 0, False)
    assert flags == [False, True, True, False]


def test_helpers_are_the_identity_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_initialized()
    assert distributed.init_from_env("cpu") == distributed.DistInfo(0, 1, 0, True, False)
    x = torch.randn(3, 4)
    gathered, offset = distributed.gather_with_grad(x)
    assert gathered is x and offset == 0
    mean = distributed.all_reduce_mean(x)
    assert torch.equal(mean, x) and mean is not x
    assert distributed.all_reduce_any(True) is True and distributed.all_reduce_any(False) is False
    network = workers.model()
    assert distributed.convert_sync_batchnorm(network) is network
    assert not any("Sync" in type(m).__name__ for m in network.modules())
    assert distributed.wrap_ddp(network, torch.device("cpu")) is network
    distributed.barrier()
    assert distributed.is_main()
