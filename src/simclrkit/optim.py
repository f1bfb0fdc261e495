"""Optimisation for SimCLR: LARS, parameter groups, learning-rate scaling and schedule.

Everything here follows the paper's recipe (Chen et al., 2020, §2.3 and App. B.1) and the
reference implementation (google-research/simclr, ``lars_optimizer.py`` and
``model_util.py``):

* :class:`LARS`, layer-wise adaptive rate scaling (You et al., 2017) with classic momentum,
  the learning rate kept inside the momentum buffer exactly as the reference does it.
* :func:`parameter_groups` splits a model into the weights that get weight decay and trust
  scaling and the parameters the reference excludes (batch-norm parameters, biases, the
  supervised head).
* :func:`scale_learning_rate`: ``lr = 0.3 * B / 256`` (linear) or ``0.075 * sqrt(B)``
  (square root; better for small batches and short runs, Table B.1).
* :func:`warmup_cosine` / :class:`WarmupCosineSchedule`: linear warmup from 0, then cosine
  decay without restarts, as a pure function of the iteration (stepped every iteration, not
  every epoch).
* :func:`build_optimizer` picks LARS, SGD or AdamW by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "LARS",
    "WarmupCosineSchedule",
    "build_optimizer",
    "parameter_groups",
    "scale_learning_rate",
    "warmup_cosine",
]

OPTIMIZER_NAMES = ("lars", "sgd", "adamw")
LEARNING_RATE_SCALINGS = ("linear", "sqrt", "none")

# Module types whose parameters are "batch normalisation" in the reference's sense. The
# reference matches variable names containing 'batch_normalization'; we match by type so a
# renamed attribute cannot silently move a norm parameter into the decayed group.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm{1,2,3}d, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with classic momentum, as in the SimCLR reference.

    For each parameter tensor ``w`` with gradient ``g`` in a group with ``lars=True``
    (paper §2.3; reference ``LARSOptimizer`` with ``classic_momentum=True``)::

        g     <- g + weight_decay * w
        trust <- trust_coefficient * |w| / (|g| + eps)   if |w| > 0 and |g| > 0, else 1
        v     <- momentum * v + lr * trust * g
        w     <- w - v

    where ``|.|`` is the L2 norm of the whole tensor. In a group with ``lars=False`` (the
    reference's exclusion of batch norm, biases and the supervised head) neither weight decay
    nor the trust ratio is applied: ``v <- momentum * v + lr * g; w <- w - v``. Momentum is
    heavy-ball, never Nesterov (the reference's default ``use_nesterov=False``).

    The learning rate lives INSIDE the momentum buffer, as in the reference, unlike
    ``torch.optim.SGD`` which keeps ``v`` free of ``lr`` and applies ``w <- w - lr * v``.
    Consequence: changing ``lr`` (warmup, cosine decay) only scales the new contributions to
    ``v``; what is already in the buffer decays with ``momentum`` at the learning rate it was
    added with. Under a schedule the two forms therefore give different trajectories; this
    one is the reference's.

    The gradients in ``p.grad`` are not modified (the weight-decay term is added to a copy).
    Parameters whose ``grad`` is ``None`` are skipped, their buffer untouched. The step runs
    as a few ``torch._foreach_*`` kernels per (group, device, dtype), so its cost does not
    grow with the number of small tensors (a ResNet-50 has ~160). The per-tensor norms stay
    on the device: the step never synchronises with the host.

    Per-group options: ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient``,
    ``eps`` and ``lars`` (bool, default True). Extra keys (``name``, ``lr_scale``) are kept.
    The momentum buffers are ``state[p]["momentum_buffer"]`` and round-trip through
    ``state_dict()`` / ``load_state_dict()``.

    Args:
        params: parameters or parameter-group dicts (see :func:`parameter_groups`).
        lr: learning rate (already scaled, e.g. by :func:`scale_learning_rate`).
        momentum: momentum coefficient ``m`` in ``[0, 1)``; the paper uses 0.9.
        weight_decay: L2 coefficient added to the gradient of ``lars=True`` groups; the paper
            uses 1e-6 (v1), the v2 code 1e-4.
        trust_coefficient: the reference's ``eeta``, 0.001.
        eps: added to ``|g|`` in the trust ratio's denominator. The reference has none, hence
            the default 0.0.

    Raises:
        ValueError: on a negative ``lr``, ``weight_decay`` or ``eps``, a ``momentum`` outside
            ``[0, 1)`` or a non-positive ``trust_coefficient``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Performs one LARS update on every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            RuntimeError: if a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and dtype per call.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets.setdefault((param.device, param.dtype), []).append(param)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Applies the update of one group to ``params`` (same device and dtype, with grads)."""
        lr = group["lr"]
        momentum = group["momentum"]
        grads = [param.grad for param in params]

        if group["lars"]:
            if group["weight_decay"] != 0.0:
                # Out of place: the caller's p.grad must stay the loss gradient.
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            weight_norms = torch.stack(torch._foreach_norm(params))
            grad_norms = torch.stack(torch._foreach_norm(grads))
            # Trust ratio (You et al., 2017): the step's size relative to the weight's is
            # trust_coefficient * lr, whatever the gradient's scale. Where a norm is 0 the
            # ratio is undefined (0/0) or would freeze the weight; the reference then uses 1.
            # torch.where discards the inf/nan of those lanes.
            ratio = group["trust_coefficient"] * weight_norms / (grad_norms + group["eps"])
            trust = torch.where((weight_norms > 0) & (grad_norms > 0), ratio, 1.0)
            # One 0-dim scale per tensor; kept on the device to avoid a host sync.
            scaled_grads = torch._foreach_mul(grads, list((lr * trust).unbind()))
        else:
            scaled_grads = torch._foreach_mul(grads, lr)

        buffers = []
        for param, scaled_grad in zip(params, scaled_grads):
            state = self.state[param]
            if "momentum_buffer" not in state:
                # v starts at 0 in the reference; 0 * m + lr * trust * g needs no extra kernel.
                state["momentum_buffer"] = torch.zeros_like(param)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, scaled_grads)
        torch._foreach_sub_(params, buffers)


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_bias_and_bn: bool = True,
    extra_excluded: Sequence[nn.Module] = (),
) -> list[dict[str, Any]]:
    """Splits parameters into the groups the reference's LARS treats differently.

    The reference excludes from both weight decay and trust scaling every variable whose
    name contains ``'batch_normalization'``, ``'bias'`` or ``'head_supervised'``
    (``model_util.get_optimizer``; paper §2.3). Here:

    * ``"weights"``: every other parameter (conv and linear weights): ``lars=True`` with
      ``weight_decay``.
    * ``"norm_and_bias"``: parameters of normalisation modules (BatchNorm, SyncBatchNorm,
      InstanceNorm, GroupNorm, LayerNorm, RMSNorm: found by module type, not by name) and
      every parameter whose name ends in ``bias``: ``lars=False``, ``weight_decay=0``.
    * ``"probe"``: all parameters of the modules in ``extra_excluded`` (a classifier trained
      beside the network, as the reference's ``head_supervised``): ``lars=False``,
      ``weight_decay=0``. These modules may be submodules of ``model`` or separate modules
      trained by the same optimiser; their parameters are included either way.

    Deviation from the reference: the reference does add an L2 loss on the supervised head's
    kernel (``model_util.add_weight_decay``). The probe trains on a stopped gradient and
    cannot affect the representation, so the probe group carries no weight decay here;
    callers who want it can set the group's ``weight_decay`` and use SGD or AdamW.

    A parameter shared by several modules appears once, in the group of its first
    occurrence (probe membership takes precedence). Empty groups are left out. Frozen
    parameters are included: optimisers skip them while their gradient is ``None``.

    Args:
        model: the network whose parameters to split.
        weight_decay: weight decay of the ``"weights"`` group.
        exclude_bias_and_bn: if False, norm parameters and biases go to ``"weights"`` too
            (decayed and trust-scaled); the probe group is still separate.
        extra_excluded: modules whose parameters form the ``"probe"`` group.

    Returns:
        A list of parameter-group dicts, each with keys ``params``, ``name``, ``lars`` and
        ``weight_decay``, in the order weights, norm_and_bias, probe (empty ones omitted).

    Raises:
        ValueError: if ``weight_decay`` is negative.
    """
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    seen: set[int] = set()
    probe: list[nn.Parameter] = []
    for module in extra_excluded:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                probe.append(param)

    weights: list[nn.Parameter] = []
    norm_and_bias: list[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if exclude_bias_and_bn and (is_norm or name.endswith("bias")):
                norm_and_bias.append(param)
            else:
                weights.append(param)

    groups = [
        {"params": weights, "name": "weights", "lars": True, "weight_decay": weight_decay},
        {"params": norm_and_bias, "name": "norm_and_bias", "lars": False, "weight_decay": 0.0},
        {"params": probe, "name": "probe", "lars": False, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def scale_learning_rate(base_lr: float, global_batch_size: int, scaling: str) -> float:
    """Scales a base learning rate with the global batch size (paper App. B.1).

    ``linear``: ``base_lr * B / 256`` (the paper's 0.3 * B / 256). ``sqrt``:
    ``base_lr * sqrt(B)`` (0.075 * sqrt(B) in the paper, 0.1 * sqrt(B) for SimCLRv2);
    Table B.1 shows it is better for small batches and short runs. ``none``: ``base_lr``.

    Args:
        base_lr: learning rate before scaling; > 0.
        global_batch_size: number of images (not views) per step over all devices; > 0.
        scaling: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
        The scaled learning rate.

    Raises:
        ValueError: on an unknown ``scaling`` or a non-positive ``base_lr`` or batch size.
    """
    if scaling not in LEARNING_RATE_SCALINGS:
        raise ValueError(f"scaling must be one of {LEARNING_RATE_SCALINGS}, got {scaling!r}")
    if not base_lr > 0:  # also rejects NaN
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if not global_batch_size > 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    if scaling == "linear":
        return base_lr * global_batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    return float(base_lr)


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0
) -> float:
    """Learning rate at an iteration: linear warmup from 0, then cosine decay (App. B.1).

    Follows the reference ``WarmUpAndCosineDecay`` (TF2) / ``learning_rate_schedule`` (TF1)::

        step <  warmup_steps:  peak_lr * step / warmup_steps
        step >= warmup_steps:  cosine_decay(peak_lr, step - warmup_steps,
                                            total_steps - warmup_steps)

    with TensorFlow's ``cosine_decay(lr, t, T, alpha) = lr * ((1 - alpha) * c + alpha)``,
    ``c = (1 + cos(pi * min(t, T) / T)) / 2``, and ``alpha = final_lr / peak_lr``, i.e.
    ``final_lr + (peak_lr - final_lr) * c``. The reference decays to 0 (``final_lr=0``).
    The first step (``step=0``) therefore has learning rate 0, as in the reference. Meant to
    be evaluated every iteration, not every epoch.

    Edge cases: ``warmup_steps=0`` starts at ``peak_lr``; for ``step >= total_steps``
    (including ``total_steps == warmup_steps``, where the reference divides 0 by 0) the
    result is ``final_lr``.

    Args:
        step: the iteration, counted from 0; >= 0.
        total_steps: number of iterations of the run, warmup included.
        warmup_steps: number of warmup iterations, ``0 <= warmup_steps <= total_steps``.
        peak_lr: learning rate reached at the end of warmup.
        final_lr: learning rate at ``total_steps`` and beyond.

    Returns:
        The learning rate for this step.

    Raises:
        ValueError: if ``step`` or ``warmup_steps`` is negative, or
            ``warmup_steps > total_steps``.
    """
    _check_schedule(total_steps, warmup_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if step >= total_steps:
        return float(final_lr)
    decay_steps = total_steps - warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
    return final_lr + (peak_lr - final_lr) * cosine


def _check_schedule(total_steps: int, warmup_steps: int) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
        )


class WarmupCosineSchedule:
    """Sets every parameter group's ``lr`` from :func:`warmup_cosine` at a given step.

    Stateless apart from its constructor arguments: resuming a run needs only the step.
    A group may carry ``"lr_scale"`` (default 1.0), a multiplier on the scheduled rate (a
    group that should follow the same schedule at another rate).

    Args:
        total_steps: number of iterations of the run, warmup included.
        warmup_steps: number of linear-warmup iterations (paper: 10 epochs' worth).
        peak_lr: learning rate at the end of warmup (the scaled learning rate).
        final_lr: learning rate at the end of the run (paper: 0).

    Raises:
        ValueError: if ``warmup_steps`` is negative or exceeds ``total_steps``.
    """

    def __init__(
        self, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0
    ) -> None:
        _check_schedule(total_steps, warmup_steps)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.peak_lr = peak_lr
        self.final_lr = final_lr

    def __call__(self, step: int) -> float:
        """Returns the unscaled learning rate at ``step``."""
        return warmup_cosine(
            step, self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets ``group["lr"] = lr(step) * group.get("lr_scale", 1.0)`` for every group.

        Call it before ``optimizer.step()`` of iteration ``step``.

        Args:
            optimizer: the optimiser whose groups to update.
            step: the iteration about to be taken, counted from 0.

        Returns:
            The unscaled learning rate at ``step`` (for logging).
        """
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, float]:
        """Returns the constructor arguments (the schedule's whole state)."""
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "peak_lr": self.peak_lr,
            "final_lr": self.final_lr,
        }

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restores the arguments saved by :meth:`state_dict`.

        Raises:
            ValueError: if the saved warmup and total steps are inconsistent.
        """
        _check_schedule(state_dict["total_steps"], state_dict["warmup_steps"])
        self.total_steps = state_dict["total_steps"]
        self.warmup_steps = state_dict["warmup_steps"]
        self.peak_lr = state_dict["peak_lr"]
        self.final_lr = state_dict["final_lr"]


def build_optimizer(
    name: str,
    param_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """Builds an optimiser by name.

    * ``"lars"``: :class:`LARS` (the paper's choice for pretraining).
    * ``"sgd"``: ``torch.optim.SGD`` with heavy-ball momentum, not Nesterov. Its ``lr``
      multiplies the buffer, unlike LARS (see :class:`LARS`). The ``lars`` key of a group is
      ignored, so pass groups from :func:`parameter_groups` to keep norm parameters and
      biases free of weight decay.
    * ``"adamw"``: ``torch.optim.AdamW`` with its default betas (``momentum`` is unused);
      its weight decay is decoupled, so the same number means a different strength.

    A group's own ``weight_decay`` (as set by :func:`parameter_groups`) overrides the
    ``weight_decay`` argument, which applies to groups without one. The group dicts are
    copied, so the same list can build several optimisers.

    Args:
        name: ``"lars"``, ``"sgd"`` or ``"adamw"``.
        param_groups: parameters or parameter-group dicts.
        lr: learning rate (the schedule overwrites it every step).
        momentum: momentum for LARS and SGD.
        weight_decay: default weight decay.
        trust_coefficient: LARS's trust coefficient (ignored by the others).

    Returns:
        The optimiser.

    Raises:
        ValueError: on an unknown ``name``.
    """
    # torch's add_param_group writes the defaults into the dicts it is given; copying them
    # lets the caller build several optimisers from one parameter_groups() result.
    param_groups = [dict(group) if isinstance(group, dict) else group for group in param_groups]
    if name == "lars":
        return LARS(
            param_groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    if name == "sgd":
        return torch.optim.SGD(
            param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
        )
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {name!r}")
