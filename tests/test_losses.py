"""Tests for simclrkit.losses: NT-Xent (paper Eq. 1), its global and chunked forms, diagnostics.

The ground truth is a naive implementation written straight from Eq. 1 with Python loops,
in the paper's interleaved view order (views 2k and 2k + 1 are the pair of image k), so it
shares no indexing with the library. Analytic cases pin the absolute value.
"""

from __future__ import annotations

import math

import pytest
import torch

from simclrkit.losses import (
    NTXentLoss,
    contrastive_accuracy,
    contrastive_diagnostics,
    contrastive_entropy,
    nt_xent,
    nt_xent_global,
)

TEMPERATURES = [0.05, 0.1, 0.5, 1.0]


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 term by term: L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    num_images = z1.shape[0]
    views = []
    for k in range(num_images):
        views += [z1[k], z2[k]]
    norms = [torch.linalg.vector_norm(v) for v in views]

    def sim(i: int, j: int) -> torch.Tensor:
        return torch.dot(views[i], views[j]) / (norms[i] * norms[j])

    def pair_loss(i: int, j: int) -> torch.Tensor:
        numerator = torch.exp(sim(i, j) / temperature)
        denominator = sum(
            torch.exp(sim(i, k) / temperature) for k in range(2 * num_images) if k != i
        )
        return -torch.log(numerator / denominator)

    total = sum(
        pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(num_images)
    )
    return total / (2 * num_images)


def random_views(num_images: int, dim: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(num_images, dim, dtype=dtype, generator=generator).requires_grad_()
    z2 = torch.randn(num_images, dim, dtype=dtype, generator=generator).requires_grad_()
    return z1, z2


def loss_and_grads(loss_fn, z1, z2):
    loss = loss_fn(z1, z2)
    grad1, grad2 = torch.autograd.grad(loss, (z1, z2))
    return loss.detach(), grad1, grad2


def assert_close_relative(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| (gradients have entries near 0)."""
    scale = expected.abs().max().clamp_min(1e-300)
    assert (actual - expected).abs().max() <= rel * scale, (actual, expected)


# --------------------------------------------------------------------------------------
# Against Eq. 1
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images, dim", [(1, 3), (2, 16), (7, 3), (7, 128), (64, 16)])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_naive_eq1_values_and_gradients(num_images, dim, temperature):
    z1, z2 = random_views(num_images, dim, seed=num_images * 1000 + dim)
    expected = loss_and_grads(lambda a, b: naive_nt_xent(a, b, temperature), z1, z2)
    actual = loss_and_grads(lambda a, b: nt_xent(a, b, temperature), z1, z2)
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-10)


@pytest.mark.parametrize("num_images, dim, chunk_size", [(2, 16, 1), (7, 3, 3), (7, 128, 5)])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_chunked_path_matches_naive_eq1(num_images, dim, chunk_size, temperature):
    z1, z2 = random_views(num_images, dim, seed=dim)
    expected = loss_and_grads(lambda a, b: naive_nt_xent(a, b, temperature), z1, z2)
    actual = loss_and_grads(lambda a, b: nt_xent(a, b, temperature, chunk_size=chunk_size), z1, z2)
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-10)


@pytest.mark.parametrize("num_images", [1, 4, 33])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_identical_embeddings_give_log_2n_minus_1(num_images, chunk_size, temperature):
    # All similarities are 1: the positive is one of 2N - 1 equal terms, so -log(1 / (2N - 1)).
    z = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64).repeat(num_images, 1)
    loss = nt_xent(z, z.clone(), temperature, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(math.log(2 * num_images - 1), abs=1e-12)


# --------------------------------------------------------------------------------------
# Invariances and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_symmetric_under_swapping_views(chunk_size):
    z1, z2 = random_views(9, 8)
    forward = loss_and_grads(lambda a, b: nt_xent(a, b, 0.2, chunk_size), z1, z2)
    swapped = loss_and_grads(lambda a, b: nt_xent(b, a, 0.2, chunk_size), z1, z2)
    for got, want in zip(swapped, forward):
        assert_close_relative(got, want, 1e-12)


def test_invariant_to_scaling_and_image_order():
    z1, z2 = random_views(9, 8)
    reference = nt_xent(z1, z2, 0.1)
    assert nt_xent(3.0 * z1, 0.01 * z2, 0.1).item() == pytest.approx(reference.item(), rel=1e-12)
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    assert nt_xent(z1[permutation], z2[permutation], 0.1).item() == pytest.approx(
        reference.item(), rel=1e-12
    )


def test_pairing_matters():
    # Breaking the row correspondence must change the loss (guards against a loss that
    # ignores which rows are partners).
    z1, z2 = random_views(9, 8)
    assert nt_xent(z1, z2.roll(1, dims=0), 0.1).item() != pytest.approx(nt_xent(z1, z2, 0.1).item())


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradients_reach_both_views(chunk_size):
    z1, z2 = random_views(6, 5)
    _, grad1, grad2 = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, chunk_size), z1, z2)
    for grad in (grad1, grad2):
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum(dim=1) > 1e-8).all()  # every row receives a gradient


def test_gradient_is_orthogonal_to_each_embedding():
    # The loss is invariant to rescaling each row, so d loss / d z_i must be orthogonal to z_i.
    z1, z2 = random_views(6, 5)
    _, grad1, grad2 = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, 4), z1, z2)
    for z, grad in ((z1, grad1), (z2, grad2)):
        assert (z.detach() * grad).sum(dim=1).abs().max() < 1e-12


# --------------------------------------------------------------------------------------
# Chunked path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 17, 100])  # 2N = 16; 5 does not divide it
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_chunked_equals_dense_float64(chunk_size, temperature):
    z1, z2 = random_views(8, 12, seed=3)
    dense = loss_and_grads(lambda a, b: nt_xent(a, b, temperature), z1, z2)
    chunked = loss_and_grads(lambda a, b: nt_xent(a, b, temperature, chunk_size), z1, z2)
    for got, want in zip(chunked, dense):
        assert_close_relative(got, want, 1e-6)
        assert_close_relative(got, want, 1e-12)  # in fact equal up to rounding


def test_chunked_equals_dense_float32():
    z1, z2 = random_views(48, 32, dtype=torch.float32, seed=4)
    dense = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1), z1, z2)
    chunked = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, chunk_size=7), z1, z2)
    assert chunked[0].dtype == torch.float32
    assert_close_relative(chunked[0], dense[0], 1e-5)
    for got, want in zip(chunked[1:], dense[1:]):
        assert_close_relative(got, want, 1e-4)


def test_chunked_under_no_grad_gives_the_same_value():
    z1, z2 = random_views(8, 12)
    with_graph = nt_xent(z1, z2, 0.1, chunk_size=3)
    with torch.no_grad():
        without_graph = nt_xent(z1, z2, 0.1, chunk_size=3)
    assert not without_graph.requires_grad
    assert without_graph.item() == pytest.approx(with_graph.item(), rel=1e-13)


def test_chunked_loss_scales_gradient_by_upstream_gradient():
    z1, z2 = random_views(8, 12)
    _, grad1, _ = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, 3), z1, z2)
    _, grad1_scaled, _ = loss_and_grads(lambda a, b: -2.5 * nt_xent(a, b, 0.1, 3), z1, z2)
    assert_close_relative(grad1_scaled, -2.5 * grad1, 1e-13)


def largest_saved_tensor(loss_fn, z1, z2) -> int:
    """numel of the largest tensor autograd keeps for backward while building the loss."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(z1, z2).backward()
    return max(sizes)


def test_chunked_path_never_keeps_the_logit_matrix():
    z1, z2 = random_views(32, 4, dtype=torch.float32)
    num_logits = (2 * 32) ** 2
    # The check can fail: the dense path does keep a (2N, 2N) tensor.
    assert largest_saved_tensor(lambda a, b: nt_xent(a, b, 0.1), z1, z2) >= num_logits
    assert largest_saved_tensor(lambda a, b: nt_xent(a, b, 0.1, 16), z1, z2) <= 2 * 32 * 4


def test_automatic_chunking_for_large_batches():
    # (2N)^2 = 1026^2 logits is above the dense limit: chunk_size=None must switch paths.
    num_images = 513
    z1, z2 = random_views(num_images, 2, dtype=torch.float32, seed=5)
    largest = largest_saved_tensor(lambda a, b: nt_xent(a, b, 0.5), z1, z2)
    assert largest <= 2 * num_images * 2
    with torch.no_grad():
        auto = nt_xent(z1, z2, 0.5)
        in_float64 = nt_xent(z1.double(), z2.double(), 0.5, chunk_size=100)
    assert auto.item() == pytest.approx(in_float64.item(), rel=1e-5)


def test_half_precision_inputs_are_computed_in_float32():
    z1, z2 = random_views(8, 16, dtype=torch.bfloat16)
    for chunk_size in (None, 3):
        loss = nt_xent(z1, z2, 0.1, chunk_size)
        assert loss.dtype == torch.float32
        expected = nt_xent(z1.detach().float(), z2.detach().float(), 0.1)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        grad1, _ = torch.autograd.grad(loss, (z1, z2))
        assert grad1.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------
# Global negatives (simulated devices)
# --------------------------------------------------------------------------------------


def test_global_form_with_itself_equals_nt_xent():
    z1, z2 = random_views(7, 5)
    # Clones take the general path (anchors and candidates normalised separately).
    expected = loss_and_grads(lambda a, b: nt_xent(a, b, 0.3), z1, z2)
    actual = loss_and_grads(
        lambda a, b: nt_xent_global(a, b, a.clone(), b.clone(), 0, 0.3), z1, z2
    )
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-12)


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_devices_average_to_the_full_batch_loss(num_devices, chunk_size):
    num_images = 8
    per_device = num_images // num_devices
    z1, z2 = random_views(num_images, 6, seed=7)

    def split_loss(a, b):
        # Each device's gathered tensors are a concatenation of every device's rows, so
        # gradients from the candidates flow back to their owners as a real gather must.
        pieces1, pieces2 = a.split(per_device), b.split(per_device)
        all1, all2 = torch.cat(pieces1), torch.cat(pieces2)
        losses = [
            nt_xent_global(
                pieces1[rank], pieces2[rank], all1, all2, rank * per_device, 0.1, chunk_size
            )
            for rank in range(num_devices)
        ]
        return torch.stack(losses).mean()

    expected = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1), z1, z2)
    actual = loss_and_grads(split_loss, z1, z2)
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-12)


def test_local_loss_depends_on_offset():
    # The offset must select the right partners: a wrong one gives a different value.
    z1, z2 = random_views(8, 6, seed=8)
    right = nt_xent_global(z1[4:], z2[4:], z1, z2, 4, 0.1)
    wrong = nt_xent_global(z1[4:], z2[4:], z1, z2, 0, 0.1)
    assert right.item() != pytest.approx(wrong.item())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_module_with_simulated_gather_matches_full_batch(chunk_size):
    num_devices, per_device = 2, 5
    z1, z2 = random_views(num_devices * per_device, 4, seed=9)

    def device_losses(a, b):
        pieces1, pieces2 = a.split(per_device), b.split(per_device)
        losses = []
        for rank in range(num_devices):

            def gather(local, rank=rank):
                rows = [
                    local if other == rank else torch.cat([pieces1[other], pieces2[other]], 1)
                    for other in range(num_devices)
                ]
                return torch.cat(rows), rank * per_device

            loss_fn = NTXentLoss(temperature=0.2, chunk_size=chunk_size, gather=gather)
            losses.append(loss_fn(pieces1[rank], pieces2[rank]))
        return torch.stack(losses).mean()

    # The module's default scale is the reference's loss_a + loss_b: twice the Eq. 1 mean.
    expected = loss_and_grads(lambda a, b: 2 * nt_xent(a, b, 0.2), z1, z2)
    actual = loss_and_grads(device_losses, z1, z2)
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-12)


def test_module_without_gather_is_nt_xent():
    z1, z2 = random_views(6, 4)
    module = NTXentLoss(temperature=0.5)
    assert module(z1, z2).item() == pytest.approx(2 * nt_xent(z1, z2, 0.5).item(), rel=1e-14)
    mean = NTXentLoss(temperature=0.5, reduction="mean")
    assert mean(z1, z2).item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-14)
    assert "temperature=0.5" in repr(module) and "reduction=reference" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        NTXentLoss(reduction="sum")


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


def one_hot_rows(indices, dim=3):
    return torch.eye(dim, dtype=torch.float64)[indices]


def test_accuracy_on_hand_made_embeddings():
    # Image 0: both views e0 -> correct from both sides. Images 1 and 2: views (e1, e2) and
    # (e2, e1); each positive is orthogonal (sim 0) while a negative equals the anchor.
    z1 = one_hot_rows([0, 1, 2])
    z2 = one_hot_rows([0, 2, 1])
    assert contrastive_accuracy(z1, z2).item() == pytest.approx(2 / 6)
    assert contrastive_accuracy(z1, z1.clone()).item() == 1.0


def test_accuracy_and_entropy_of_identical_embeddings():
    num_images = 5
    z = torch.ones(num_images, 4, dtype=torch.float64)
    diagnostics = contrastive_diagnostics(z, z.clone(), temperature=0.1, chunk_size=3)
    assert diagnostics.accuracy.item() == 0.0  # every negative ties with the positive
    assert diagnostics.entropy.item() == pytest.approx(math.log(2 * num_images - 1), abs=1e-12)
    assert diagnostics.loss.item() == pytest.approx(math.log(2 * num_images - 1), abs=1e-12)


def test_entropy_of_orthogonal_images_matches_closed_form():
    # z1 = z2 = one-hot rows: each anchor sees logits [1/t, 0, 0, 0, 0].
    temperature = 0.5
    z = one_hot_rows([0, 1, 2])
    weights = [math.exp(1 / temperature)] + [1.0] * 4
    probabilities = [w / sum(weights) for w in weights]
    expected_entropy = -sum(p * math.log(p) for p in probabilities)
    assert contrastive_entropy(z, z.clone(), temperature).item() == pytest.approx(
        expected_entropy, rel=1e-12
    )
    diagnostics = contrastive_diagnostics(z, z.clone(), temperature)
    assert diagnostics.loss.item() == pytest.approx(-math.log(probabilities[0]), rel=1e-12)


def test_single_image_has_one_candidate():
    z1, z2 = random_views(1, 4)
    diagnostics = contrastive_diagnostics(z1, z2)
    assert diagnostics.accuracy.item() == 1.0
    assert diagnostics.entropy.item() == pytest.approx(0.0, abs=1e-12)
    assert nt_xent(z1, z2).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_diagnostics_match_a_dense_computation(chunk_size):
    num_images, temperature = 11, 0.2
    z1, z2 = random_views(num_images, 3, seed=11)
    z1, z2 = z1.detach(), z2.detach()
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = views @ views.t() / temperature
    partner = torch.cat([torch.arange(num_images) + num_images, torch.arange(num_images)])
    accuracy, entropy = 0.0, 0.0
    for anchor in range(2 * num_images):
        others = [k for k in range(2 * num_images) if k != anchor]
        row = logits[anchor, others]
        probabilities = torch.softmax(row, dim=0)
        entropy += -(probabilities * probabilities.log()).sum().item()
        accuracy += float(others[int(row.argmax())] == partner[anchor])
    diagnostics = contrastive_diagnostics(z1, z2, temperature, chunk_size)
    assert diagnostics.accuracy.item() == pytest.approx(accuracy / (2 * num_images))
    assert 0 < diagnostics.accuracy.item() < 1  # a non-trivial case
    assert diagnostics.entropy.item() == pytest.approx(entropy / (2 * num_images), rel=1e-12)
    assert diagnostics.loss.item() == pytest.approx(nt_xent(z1, z2, temperature).item(), rel=1e-12)
    assert not diagnostics.loss.requires_grad


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z1, z2, match",
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), "equal shapes"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "equal shapes"),
        (torch.zeros(4), torch.zeros(4), "2-D"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), "floating"),
        (torch.zeros(0, 3), torch.zeros(0, 3), "at least one row"),
    ],
)
def test_rejects_bad_views(z1, z2, match):
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2)
    with pytest.raises(ValueError, match=match):
        contrastive_diagnostics(z1, z2)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_rejects_bad_temperature(temperature):
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, temperature)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=temperature)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_rejects_bad_chunk_size(chunk_size):
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        nt_xent(z, z, 0.1, chunk_size)


def test_global_form_rejects_inconsistent_inputs():
    local, everything = torch.randn(3, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="offset"):
        nt_xent_global(local, local, everything, everything, 6)
    with pytest.raises(ValueError, match="offset"):
        nt_xent_global(local, local, everything, everything, -1)
    with pytest.raises(ValueError, match="feature dimension"):
        nt_xent_global(local, local, torch.randn(8, 5), torch.randn(8, 5), 0)
    with pytest.raises(ValueError, match="equal shapes"):
        nt_xent_global(local, local, everything, torch.randn(7, 4), 0)


def naive_dot_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 with sim(u, v) = u.v (the reference's hidden_norm=False), term by term."""
    views = [v for k in range(z1.shape[0]) for v in (z1[k], z2[k])]
    total = 0
    for i in range(len(views)):
        j = i + 1 if i % 2 == 0 else i - 1
        logits = torch.stack([torch.dot(views[i], views[k]) / temperature
                              for k in range(len(views)) if k != i])
        positive = torch.dot(views[i], views[j]) / temperature
        total = total - (positive - torch.logsumexp(logits, 0))
    return total / len(views)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_without_hidden_norm_is_the_dot_product_form(chunk_size):
    z1, z2 = random_views(6, 5, seed=3)
    z1, z2 = (z.detach().mul(0.3).requires_grad_() for z in (z1, z2))
    got = loss_and_grads(
        lambda a, b: nt_xent(a, b, 0.5, chunk_size=chunk_size, hidden_norm=False), z1, z2
    )
    expected = loss_and_grads(lambda a, b: naive_dot_nt_xent(a, b, 0.5), z1, z2)
    for actual, want in zip(got, expected):
        assert_close_relative(actual, want, 1e-10)
    # and it is not the normalised loss: the scale of z now matters
    normalised = nt_xent(z1, z2, 0.5).detach()
    assert not torch.allclose(got[0], normalised)
    module = NTXentLoss(temperature=0.5, hidden_norm=False, reduction="mean")
    assert torch.allclose(module(z1, z2).detach(), got[0])
