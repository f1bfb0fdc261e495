"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR (paper Eq. 1, §2.1).

For a batch of N images seen as 2N views, with z L2-normalised and
``sim(u, v) = u.v / (|u| |v|)``, the loss of anchor i whose partner view is j is::

    l(i, j) = -log( exp(sim(z_i, z_j) / temperature)
                    / sum_{k != i} exp(sim(z_i, z_k) / temperature) )

and the batch loss is the mean of l over all 2N anchors (both directions of every pair); the
reference, and :class:`NTXentLoss` by default, use twice that (see "Scale" below).

What lives here is pure maths: no ``torch.distributed``, no device placement.

* :func:`nt_xent` - the loss of one batch.
* :func:`nt_xent_global` - local anchors contrasted against an already gathered global batch
  (paper §2.2, reference ``objective.py``: every device uses all devices' views as negatives).
  It communicates nothing; :class:`NTXentLoss` takes a ``gather`` callable for that.
* :func:`contrastive_diagnostics` / :func:`contrastive_accuracy` /
  :func:`contrastive_entropy` - the contrastive accuracy and softmax entropy the reference
  logs (paper Table 5), computed without gradients.

Two ways to compute the loss, with equal values and gradients:

* dense: the (2n, 2N) logit matrix and ``F.cross_entropy`` with autograd; simplest, and
  twice differentiable. Used automatically for small batches (2N <= 1024).
* chunked (:class:`_ChunkedNTXent`): anchors are processed ``chunk_size`` rows at a time, so
  peak memory grows with ``chunk_size * 2N`` instead of ``(2n) * 2N``. Because the loss is a
  scalar, the gradient is computed during the forward pass (backward only multiplies it by
  the incoming scalar), which needs three matrix products in total - the same as autograd on
  the dense matrix - and never stores the matrix. At N = 8192, 2N x 2N logits would be 1 GiB
  in float32 per copy.

Differences from the reference (google-research/simclr ``objective.py``):

* Scale. The reference returns ``loss_a + loss_b``, the SUM of the two directions' means
  (view-1 anchors against all candidates, then view-2 anchors), which is **2x** the mean over
  the 2N anchors of Eq. 1. The functions here return the Eq. 1 mean (pure maths);
  :class:`NTXentLoss`, which training uses, returns the reference's scale by default
  (``reduction="reference"``). The factor is not cosmetic: LARS's trust ratio normalises the
  size of ``g + wd * w`` but not the ratio of the gradient to the weight decay, so with the
  mean a run at weight decay wd takes the reference's step at weight decay 2 * wd on every
  weight LARS adapts, and the parameters LARS leaves unadapted (BatchNorm, biases) and plain
  SGD take half the reference's step. ``reduction="mean"`` keeps the Eq. 1 mean (what
  lightly's ``NTXentLoss`` returns).
* The reference masks a view's own similarity by subtracting 1e9; we overwrite it with a
  large finite negative (never ``-inf``, so no ``-inf * 0`` NaN can appear).
* The reference's logged ``contrast_acc``/``contrast_entropy`` look only at view-1 anchors
  and the N cross-view candidates; ours use all 2N anchors and all 2N - 1 candidates, the
  same candidate set as the loss.
* Half-precision inputs are upcast to float32 and autocast is disabled inside the loss:
  with temperature 0.05 a float16 cosine error of 1e-3 is a 0.02 logit error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ContrastiveDiagnostics",
    "NTXentLoss",
    "contrastive_accuracy",
    "contrastive_diagnostics",
    "contrastive_entropy",
    "nt_xent",
    "nt_xent_global",
]

# Written over a view's similarity with itself. Finite on purpose: exp() of it minus any
# real logit is exactly 0, and 0 * _MASK_VALUE is 0, whereas 0 * -inf is NaN.
_MASK_VALUE = -1.0e9

# chunk_size=None: the dense path up to a 1024 x 1024 logit matrix, the chunked path above
# it, with chunks of about 2**25 logits (128 MiB in float32; 2048 anchor rows at 2N = 16384,
# large enough for the matrix products to run at full speed). The chunked path is also the
# faster one (2-core CPU, D = 128, float32, forward + backward: N = 512: 6 ms vs 10 ms;
# N = 2048: 111 ms / 122 MiB vs 254 ms / 241 MiB), so the dense path is kept only where time
# does not matter and its generality (double backward, torch.func) costs nothing.
_DENSE_MAX_LOGITS = 1024 * 1024
_CHUNK_LOGITS = 2**25

Gather = Callable[[Tensor], tuple[Tensor, int]]

# What NTXentLoss multiplies the Eq. 1 mean by: the reference's loss_a + loss_b is the sum of
# the two directions' means, i.e. twice the mean over all 2N anchors (module notes).
REDUCTION_SCALES = {"reference": 2.0, "mean": 1.0}


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, Tensor) or not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")


def _check_views(z1: Tensor, z2: Tensor, name1: str, name2: str) -> None:
    for name, z in ((name1, z1), (name2, z2)):
        if not isinstance(z, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {z.dtype}")
        if z.shape[0] < 1 or z.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and column, got {tuple(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"{name1} and {name2} are two views of the same images and must have equal shapes, "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )


def _normalize(z: Tensor, hidden_norm: bool = True) -> Tensor:
    """L2-normalises rows (unless ``hidden_norm`` is False: the reference's
    ``hidden_norm=False``, the dot product of Table 5's unnormalised rows), upcasting
    float16/bfloat16 to float32 first (see module notes)."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if not hidden_norm:
        return z
    # eps guards an all-zero row: it stays zero (cosine 0 with everything) instead of NaN.
    return F.normalize(z, dim=1, eps=1e-12)


def _partner_indices(
    num_local: int, num_global: int, offset: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Columns of each anchor's own view and of its positive among the 2N candidates.

    Anchors are ``[local view 1; local view 2]`` (2n rows), candidates are
    ``[global view 1; global view 2]`` (2N rows) and local image r is global image
    ``offset + r``. So the view-1 anchor r is candidate ``offset + r`` and its partner is
    ``N + offset + r``; for the view-2 anchor r it is the other way round.
    """
    global_rows = torch.arange(offset, offset + num_local, device=device)
    self_index = torch.cat([global_rows, global_rows + num_global])
    positive_index = torch.cat([global_rows + num_global, global_rows])
    return self_index, positive_index


def _resolve_chunk_size(
    chunk_size: int | None, num_anchors: int, num_candidates: int
) -> int | None:
    """Anchor rows per chunk, or None for the dense path."""
    if chunk_size is None:
        if num_anchors * num_candidates <= _DENSE_MAX_LOGITS:
            return None
        return max(1, min(num_anchors, _CHUNK_LOGITS // num_candidates))
    return min(chunk_size, num_anchors)


# --------------------------------------------------------------------------------------
# The two computations
# --------------------------------------------------------------------------------------


def _dense_nt_xent(
    anchors: Tensor,
    candidates: Tensor,
    self_index: Tensor,
    positive_index: Tensor,
    temperature: float,
) -> Tensor:
    """Eq. 1 on the full (2n, 2N) logit matrix with autograd."""
    logits = anchors @ candidates.t() / temperature
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    # Out-of-place index_put keeps autograd happy; k != i in Eq. 1.
    logits = logits.index_put((rows, self_index), logits.new_tensor(_MASK_VALUE))
    return F.cross_entropy(logits, positive_index)


def _chunked_loss_and_grads(
    anchors: Tensor,
    candidates: Tensor,
    self_index: Tensor,
    positive_index: Tensor,
    temperature: float,
    chunk_size: int,
    need_anchor_grad: bool,
    need_candidate_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss and its gradients w.r.t. the normalised anchors and candidates, chunk by chunk.

    Gradient. Write M = 2n anchors, a_i the anchors, c_k the candidates,
    l_ik = a_i.c_k / temperature, s(i) the anchor's own column and p(i) its positive. Then

        loss   = (1/M) sum_i [ log sum_{k != s(i)} exp(l_ik) - l_i,p(i) ]
        d loss / d l_ik = (P_ik - Y_ik) / M,

    with P the softmax of row i over k != s(i) (P_i,s(i) = 0) and Y_ik = [k == p(i)]. The
    chain rule through l_ik = a_i.c_k / temperature gives, with g = 1 / (M temperature),

        d loss / d a_i = g * sum_k (P_ik - Y_ik) c_k = g * (P @ C)_i - g * c_p(i)
        d loss / d c_k = g * sum_i (P_ik - Y_ik) a_i = g * (P^T @ A)_k - g * sum_{i: p(i)=k} a_i.

    Both only need the rows of P of one chunk of anchors at a time. Writing P = E / r with
    E = exp(l - max) and r the row sums, the 1/r factor is applied to the small (c, D)
    operands instead of the (c, 2N) matrix, which saves a full pass over it.

    Args:
        anchors: (2n, D) L2-normalised local views.
        candidates: (2N, D) L2-normalised global views.
        self_index: (2n,) column of each anchor's own view.
        positive_index: (2n,) column of each anchor's partner view.
        temperature: tau in Eq. 1.
        chunk_size: anchor rows per chunk.
        need_anchor_grad: whether to compute d loss / d anchors.
        need_candidate_grad: whether to compute d loss / d candidates.

    Returns:
        The scalar loss, the (2n, D) anchor gradient or None, the (2N, D) candidate
        gradient or None.
    """
    num_anchors = anchors.shape[0]
    # Folding 1/temperature into the (2n, D) anchors makes each matmul yield logits directly.
    scaled_anchors = anchors / temperature
    grad_scale = 1.0 / (num_anchors * temperature)

    loss_sum = anchors.new_zeros(())
    grad_anchors = torch.empty_like(anchors) if need_anchor_grad else None
    grad_candidates = torch.zeros_like(candidates) if need_candidate_grad else None
    # One (chunk, 2N) buffer reused by every chunk: rebinding a fresh matmul result each
    # iteration would keep two alive at once (the old one is freed only after the new one).
    buffer = anchors.new_empty(min(chunk_size, num_anchors), candidates.shape[0])

    for start in range(0, num_anchors, chunk_size):
        stop = min(start + chunk_size, num_anchors)
        rows = torch.arange(stop - start, device=anchors.device)
        self_cols = self_index[start:stop]
        positive_cols = positive_index[start:stop]

        logits = torch.mm(scaled_anchors[start:stop], candidates.t(), out=buffer[: stop - start])
        positive_logits = logits[rows, positive_cols]  # (c,), a copy: read before exp_ below
        logits[rows, self_cols] = _MASK_VALUE  # k != i
        # Subtracting the row maximum keeps exp() from overflowing (logsumexp trick).
        row_max = logits.amax(dim=1, keepdim=True)  # (c, 1)
        # In place: the buffer becomes E = exp(l - max); the self column becomes exactly 0.
        exp_logits = logits.sub_(row_max).exp_()
        row_sums = exp_logits.sum(dim=1, keepdim=True)  # (c, 1)
        # Per-anchor loss: logsumexp_{k != i} l_ik - l_i,pos = max + log(r_i) - l_i,pos.
        loss_sum += (row_max + row_sums.log()).sum() - positive_logits.sum()

        if not (need_anchor_grad or need_candidate_grad):
            continue
        row_weights = grad_scale / row_sums  # (c, 1): g * P = E * row_weights
        chunk_anchors = anchors[start:stop]
        if grad_anchors is not None:
            chunk_grad = grad_anchors[start:stop]  # contiguous row block, written in place
            torch.mm(exp_logits, candidates, out=chunk_grad)
            chunk_grad.mul_(row_weights)
            chunk_grad.sub_(candidates[positive_cols], alpha=grad_scale)
        if grad_candidates is not None:
            grad_candidates.addmm_(exp_logits.t(), chunk_anchors * row_weights)
            grad_candidates.index_add_(0, positive_cols, chunk_anchors, alpha=-grad_scale)

    return loss_sum / num_anchors, grad_anchors, grad_candidates


class _ChunkedNTXent(torch.autograd.Function):
    """NT-Xent over anchor chunks; the gradient is computed in forward (the loss is a scalar).

    Backward is once-differentiable: use the dense path (small batches, or the default)
    for double backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        anchors: Tensor,
        candidates: Tensor,
        self_index: Tensor,
        positive_index: Tensor,
        temperature: float,
        chunk_size: int,
    ) -> Tensor:
        need_anchor_grad, need_candidate_grad = ctx.needs_input_grad[:2]
        loss, grad_anchors, grad_candidates = _chunked_loss_and_grads(
            anchors,
            candidates,
            self_index,
            positive_index,
            temperature,
            chunk_size,
            need_anchor_grad,
            need_candidate_grad,
        )
        ctx.save_for_backward(grad_anchors, grad_candidates)
        return loss

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_anchors, grad_candidates = ctx.saved_tensors
        # d(grad_output * loss) = grad_output * d loss: the stored gradients just scale.
        if grad_anchors is not None:
            grad_anchors = grad_anchors * grad_output
        if grad_candidates is not None:
            grad_candidates = grad_candidates * grad_output
        return grad_anchors, grad_candidates, None, None, None, None


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    hidden_norm: bool = True,
) -> Tensor:
    """NT-Xent loss of one batch (paper Eq. 1), averaged over all 2N anchors.

    The reference (``objective.py``) returns the sum of the two per-view means, i.e. 2x this
    value; :class:`NTXentLoss` returns that scale by default (module notes).

    Args:
        z1: (N, D) projections of the first view of N images (not necessarily normalised).
        z2: (N, D) projections of the second view; row r is the partner of ``z1[r]``.
        temperature: tau in Eq. 1 (paper: 0.1 for ImageNet, 0.5 for CIFAR-10).
        chunk_size: anchor rows per chunk for the memory-lean path; None picks the dense
            path for small batches (at most 1024^2 logits, i.e. 2N <= 1024) and an automatic
            chunk above.
            Any int forces the chunked path. Values and gradients are the same either way.
        hidden_norm: L2-normalise z first (the paper's cosine similarity; the reference's
            default). False uses the raw dot product, as the reference's ``hidden_norm=False``
            (paper Table 5, rows without l2 normalisation).

    Returns:
        0-dim loss tensor (float32 for half-precision inputs, else the input dtype).

    Raises:
        ValueError: if z1, z2 are not 2-D floating tensors of equal shape, temperature is not
            a finite number > 0, or chunk_size is not None or a positive int.
    """
    _check_views(z1, z2, "z1", "z2")
    return nt_xent_global(
        z1, z2, z1, z2, 0, temperature=temperature, chunk_size=chunk_size,
        hidden_norm=hidden_norm,
    )


def nt_xent_global(
    z_local1: Tensor,
    z_local2: Tensor,
    z_all1: Tensor,
    z_all2: Tensor,
    offset: int,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    hidden_norm: bool = True,
) -> Tensor:
    """NT-Xent of local anchors against the gathered global batch (paper §2.2, Eq. 1).

    Each of the 2n local views is an anchor; its candidates are all 2N gathered views but
    itself, its positive is the other view of the same image. This is what each device does
    in the reference's multi-device loss. Nothing is communicated here: the caller gathers.

    Gradients flow into both the local tensors (as anchors) and the gathered ones (as
    candidates); a gather that routes the latter back to their owners, followed by averaging
    gradients over devices, yields the gradient of the global mean. With equal n on every
    device, the mean of the devices' returned values is the loss of the global batch.
    ``nt_xent(z1, z2, t) == nt_xent_global(z1, z2, z1, z2, 0, t)``.

    Args:
        z_local1: (n, D) this device's first views.
        z_local2: (n, D) this device's second views.
        z_all1: (N, D) first views of all devices; rows [offset, offset + n) are this
            device's (the same values as ``z_local1``).
        z_all2: (N, D) second views of all devices, in the same image order.
        offset: row of this device's first image in the gathered tensors.
        temperature: tau in Eq. 1.
        chunk_size: see :func:`nt_xent`; chunks are taken over the 2n local anchors.
        hidden_norm: see :func:`nt_xent`.

    Returns:
        0-dim loss averaged over the 2n LOCAL anchors.

    Raises:
        ValueError: on inconsistent shapes, an offset outside [0, N - n], a temperature
            that is not a finite number > 0, or a bad chunk_size.
    """
    _check_views(z_local1, z_local2, "z_local1", "z_local2")
    _check_views(z_all1, z_all2, "z_all1", "z_all2")
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    num_local, dim = z_local1.shape
    num_global = z_all1.shape[0]
    if z_all1.shape[1] != dim:
        raise ValueError(
            f"local and gathered views must have the same feature dimension, got {dim} and "
            f"{z_all1.shape[1]}"
        )
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"offset must be an int, got {offset!r}")
    if not 0 <= offset <= num_global - num_local:
        raise ValueError(
            f"offset must lie in [0, N - n] = [0, {num_global - num_local}] so that the "
            f"{num_local} local rows fit in the {num_global} gathered rows, got {offset}"
        )

    device = z_local1.device
    # The loss runs in float32/float64 whatever autocast is doing outside (module notes).
    with torch.autocast(device_type=device.type, enabled=False):
        anchors = torch.cat(  # (2n, D)
            [_normalize(z_local1, hidden_norm), _normalize(z_local2, hidden_norm)]
        )
        if z_all1 is z_local1 and z_all2 is z_local2:
            candidates = anchors  # single process: don't normalise twice
        else:
            candidates = torch.cat(  # (2N, D)
                [_normalize(z_all1, hidden_norm), _normalize(z_all2, hidden_norm)]
            )
        if candidates.dtype != anchors.dtype:
            raise ValueError(
                f"local and gathered views must share a dtype, got {anchors.dtype} and "
                f"{candidates.dtype}"
            )
        self_index, positive_index = _partner_indices(num_local, num_global, offset, device)
        rows_per_chunk = _resolve_chunk_size(chunk_size, 2 * num_local, 2 * num_global)

        if rows_per_chunk is None:
            return _dense_nt_xent(anchors, candidates, self_index, positive_index, temperature)
        if torch.is_grad_enabled() and (anchors.requires_grad or candidates.requires_grad):
            return _ChunkedNTXent.apply(
                anchors, candidates, self_index, positive_index, float(temperature), rows_per_chunk
            )
        # No graph wanted (evaluation, torch.no_grad): skip the gradient products.
        loss, _, _ = _chunked_loss_and_grads(
            anchors,
            candidates,
            self_index,
            positive_index,
            float(temperature),
            rows_per_chunk,
            need_anchor_grad=False,
            need_candidate_grad=False,
        )
        return loss


# --------------------------------------------------------------------------------------
# Diagnostics (Table 5; reference ``contrast_acc`` / ``contrast_entropy``)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContrastiveDiagnostics:
    """Statistics of the contrastive prediction task over all 2N anchors (0-dim tensors).

    Attributes:
        loss: NT-Xent (Eq. 1), the same value :func:`nt_xent` returns.
        accuracy: fraction of anchors whose positive is strictly more similar than every
            one of the 2N - 2 negatives (ties count as wrong).
        entropy: mean entropy (nats) of the softmax over the 2N - 1 candidates; log(2N - 1)
            is the uniform maximum, small values mean confident predictions (paper Table 5
            relates it to the temperature).
    """

    loss: Tensor
    accuracy: Tensor
    entropy: Tensor


@torch.no_grad()
def contrastive_diagnostics(
    z1: Tensor, z2: Tensor, temperature: float = 0.1, chunk_size: int | None = None
) -> ContrastiveDiagnostics:
    """Loss, contrastive accuracy and softmax entropy of one batch, without gradients.

    Computed over anchor chunks, so memory grows with ``chunk_size * 2N``, never (2N)^2.
    Accuracy does not depend on the temperature; loss and entropy do.

    Args:
        z1: (N, D) first views.
        z2: (N, D) second views.
        temperature: tau in Eq. 1.
        chunk_size: anchor rows per chunk; None picks about 2**24 logits per chunk
            (two such buffers are live, so 128 MiB in float32).

    Returns:
        A :class:`ContrastiveDiagnostics` of 0-dim tensors.

    Raises:
        ValueError: as :func:`nt_xent`.
    """
    _check_views(z1, z2, "z1", "z2")
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    num_images = z1.shape[0]
    num_views = 2 * num_images
    with torch.autocast(device_type=z1.device.type, enabled=False):
        views = torch.cat([_normalize(z1), _normalize(z2)])  # (2N, D)
        self_index, positive_index = _partner_indices(num_images, num_images, 0, z1.device)
        if chunk_size is None:
            chunk_size = max(1, _CHUNK_LOGITS // (2 * num_views))
        scaled_views = views / temperature

        loss_sum = views.new_zeros(())
        entropy_sum = views.new_zeros(())
        correct = views.new_zeros((), dtype=torch.long)  # a tensor: no host sync per chunk
        # Two reused (chunk, 2N) buffers: centred logits and their exponentials.
        logit_buffer = views.new_empty(min(chunk_size, num_views), num_views)
        exp_buffer = torch.empty_like(logit_buffer)
        for start in range(0, num_views, chunk_size):
            stop = min(start + chunk_size, num_views)
            rows = torch.arange(stop - start, device=views.device)
            self_cols = self_index[start:stop]
            positive_cols = positive_index[start:stop]

            logits = torch.mm(scaled_views[start:stop], views.t(), out=logit_buffer[: stop - start])
            logits[rows, self_cols] = _MASK_VALUE
            positive_logits = logits[rows, positive_cols]  # a copy
            # Hide the positive to find the best negative, then put it back.
            logits[rows, positive_cols] = _MASK_VALUE
            best_negative = logits.amax(dim=1)
            logits[rows, positive_cols] = positive_logits
            correct += (positive_logits > best_negative).sum()

            # Entropy of softmax p = E / r with E = exp(l - m):
            #   H = -sum_k p_k log p_k = log r - sum_k E_k (l_k - m) / r.
            # The masked column has E = 0 and a finite (l - m), so it adds exactly 0.
            row_max = torch.maximum(best_negative, positive_logits)
            centred = logits.sub_(row_max.unsqueeze(1))
            exp_logits = torch.exp(centred, out=exp_buffer[: stop - start])
            row_sums = exp_logits.sum(dim=1)
            log_row_sums = row_sums.log()
            weighted = exp_logits.mul_(centred).sum(dim=1)
            entropy_sum += (log_row_sums - weighted / row_sums).sum()
            loss_sum += (row_max + log_row_sums - positive_logits).sum()

    return ContrastiveDiagnostics(
        loss=loss_sum / num_views,
        accuracy=correct.to(views.dtype) / num_views,
        entropy=entropy_sum / num_views,
    )


def contrastive_accuracy(z1: Tensor, z2: Tensor, chunk_size: int | None = None) -> Tensor:
    """Fraction of the 2N anchors whose positive beats all 2N - 2 negatives (no gradient).

    Args:
        z1: (N, D) first views.
        z2: (N, D) second views.
        chunk_size: see :func:`contrastive_diagnostics`.

    Returns:
        0-dim tensor in [0, 1].
    """
    return contrastive_diagnostics(z1, z2, temperature=1.0, chunk_size=chunk_size).accuracy


def contrastive_entropy(
    z1: Tensor, z2: Tensor, temperature: float = 0.1, chunk_size: int | None = None
) -> Tensor:
    """Mean entropy of each anchor's softmax over its 2N - 1 candidates (paper Table 5).

    Args:
        z1: (N, D) first views.
        z2: (N, D) second views.
        temperature: tau in Eq. 1.
        chunk_size: see :func:`contrastive_diagnostics`.

    Returns:
        0-dim tensor in nats, between 0 and log(2N - 1).
    """
    return contrastive_diagnostics(z1, z2, temperature=temperature, chunk_size=chunk_size).entropy


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------


class NTXentLoss(nn.Module):
    """NT-Xent as a module, optionally with negatives from every device (paper §2.2, Eq. 1).

    The module stays free of ``torch.distributed``: multi-device training passes a
    ``gather`` callable (built by ``simclrkit.distributed``) that maps this device's
    (n, K) rows to ``(all rows (N, K), offset)``, with gradients flowing back to their
    owners. Without one, the batch is contrasted with itself.

    Args:
        temperature: tau in Eq. 1.
        chunk_size: see :func:`nt_xent`.
        gather: None (single process) or the callable described above.
        hidden_norm: see :func:`nt_xent`.
        reduction: ``"reference"`` (default): the reference's ``loss_a + loss_b``, twice the
            Eq. 1 mean, so gradients, LARS and weight decay take the reference's steps;
            ``"mean"``: the Eq. 1 mean over the 2N anchors (module notes).

    Raises:
        ValueError: if temperature, chunk_size or reduction is invalid.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        chunk_size: int | None = None,
        gather: Gather | None = None,
        hidden_norm: bool = True,
        reduction: str = "reference",
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_chunk_size(chunk_size)
        if reduction not in REDUCTION_SCALES:
            raise ValueError(
                f"reduction must be one of {sorted(REDUCTION_SCALES)}, got {reduction!r}"
            )
        self.reduction = reduction
        self.scale = REDUCTION_SCALES[reduction]
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.gather = gather
        self.hidden_norm = bool(hidden_norm)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Loss of the local anchors against the (gathered) batch.

        Args:
            z1: (n, D) first views on this device.
            z2: (n, D) second views on this device.

        Returns:
            0-dim loss of the 2n local anchors: their mean times :attr:`scale` (2 for the
            reference's ``loss_a + loss_b``, 1 for ``reduction="mean"``).
        """
        return self.scale * self._mean(z1, z2)

    def _mean(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.gather is None:
            return nt_xent(z1, z2, self.temperature, self.chunk_size, self.hidden_norm)
        _check_views(z1, z2, "z1", "z2")
        dim = z1.shape[1]
        # One collective instead of two: stacking the views side by side keeps one row per
        # image, so the offset is the same for both and the columns split back cleanly.
        gathered, offset = self.gather(torch.cat([z1, z2], dim=1))
        if gathered.dim() != 2 or gathered.shape[1] != 2 * dim:
            raise ValueError(
                f"gather must return (N, {2 * dim}) rows for (n, {2 * dim}) input, got shape "
                f"{tuple(gathered.shape)}"
            )
        z_all1, z_all2 = gathered.split(dim, dim=1)
        return nt_xent_global(
            z1, z2, z_all1, z_all2, int(offset), self.temperature, self.chunk_size,
            self.hidden_norm,
        )

    def extra_repr(self) -> str:
        gather = "none" if self.gather is None else getattr(self.gather, "__name__", "custom")
        return (
            f"temperature={self.temperature}, chunk_size={self.chunk_size}, gather={gather}, "
            f"hidden_norm={self.hidden_norm}, reduction={self.reduction}"
        )
