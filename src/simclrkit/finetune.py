"""Fine-tuning on a class-balanced fraction of the labels (paper App. B.5; SimCLRv2 §2).

The whole network, optionally with the first layers of the projection head, trains with BN in
train mode, no weight decay, crop and flip only, under one of two protocols:

* ``v1`` (SimCLR App. B.5): Nesterov SGD, momentum 0.9, lr 0.05 * B / 256;
* ``v2`` (SimCLRv2, the reference README's fine-tuning command): LARS (momentum 0.9, trust
  0.001, BN parameters, biases and the classifier excluded from the trust ratio as its
  ``head_supervised``), lr 0.005 * sqrt(B), usually from the first projection-head layer.

:func:`class_balanced_subset` draws the labelled subset (the paper's 1% / 10% subsets),
:func:`finetune` trains a copy of the network on it and scores the test split. The views,
batching and accuracy helpers are shared with the frozen-feature protocols in ``evaluate.py``;
the orchestration that runs this on a checkpoint is in ``eval_report.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclrkit.classifier import Classifier
from simclrkit.config import ConfigError
from simclrkit.evaluate import (
    Source,
    _batches,
    _test_batches,
    eval_views,
    top_k_accuracies,
)
from simclrkit.optim import WarmupCosineSchedule, build_optimizer, parameter_groups

FINETUNE_PROTOCOLS = ("v1", "v2")
# base learning rate and its scaling with the batch B, per protocol
_PROTOCOL_LR = {"v1": (0.05, lambda b: b / 256), "v2": (0.005, math.sqrt)}


# --------------------------------------------------------------------------------------
# Fine-tuning on a fraction of the labels
# --------------------------------------------------------------------------------------


def class_balanced_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float,
                          seed: int = 0) -> np.ndarray:
    """A class-balanced sample of a labelled split (the paper's 1% / 10% ImageNet subsets).

    Each class contributes round(fraction * its count) images (halves round up), at least one,
    drawn without replacement with ``numpy.random.default_rng(seed)``, class by class in
    increasing label order.

    Args:
        labels: (N,) labels of the split the indices refer to (the training split).
        fraction: 0 < fraction <= 1.
        seed: which images are drawn.

    Returns:
        Sorted (K,) int64 indices into ``labels``.

    Raises:
        ConfigError: when ``fraction`` is outside (0, 1].
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ConfigError(f"label_fraction: got {fraction!r}; allowed: 0 < value <= 1 (0.1 = 10%)")
    labels = np.asarray(labels, dtype=np.int64)
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
        chosen.append(generator.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def finetune_epochs(label_fraction: float, device: torch.device | str) -> int:
    """Default fine-tuning length: the paper's 60 epochs for <= 1% labels, 30 above (App. B.5),
    halved on a CPU (30 / 15) so 10% of MNIST-5k fine-tunes in about ten seconds."""
    epochs = 60 if label_fraction <= 0.01 else 30
    return epochs // 2 if torch.device(device).type == "cpu" else epochs


def finetune(
    encoder: nn.Module,
    train: Source,
    indices: np.ndarray,
    test: Source,
    *,
    image_size: int,
    num_classes: int,
    epochs: int,
    head: nn.Module | None = None,
    proj_selector: int = 0,
    batch_size: int = 256,
    base_lr: float | None = None,
    protocol: str = "v1",
    seed: int = 0,
    device: torch.device | str = "cpu",
    eval_batch_size: int = 512,
) -> dict[str, Any]:
    """Fine-tunes copies of the encoder (and head layers) on ``train[indices]``; scores ``test``.

    Paper App. B.5 / SimCLRv2: the whole network in train mode (BN uses and updates batch
    statistics, as the reference), no weight decay, cosine decay without warmup, crop and flip
    only, under ``protocol`` (module docstring); test images use the test transform with the
    network in eval mode. The caller's modules are not modified.

    Args:
        encoder: the starting encoder (copied).
        train: the labelled training split; ``indices`` (K,) select the labelled subset.
        test: the test split.
        image_size, num_classes: views and classes.
        epochs: passes over the subset (paper: 60 for 1%, 30 for 10%; see
            :func:`finetune_epochs`).
        head: the projection head, needed when ``proj_selector > 0``.
        proj_selector: keep head layers [0, selector) under the classifier.
        batch_size: B (clamped to the subset size); each epoch is split in near-equal batches.
        base_lr: lr before its scaling with B (v1: * B / 256; v2: * sqrt(B)); None: the
            protocol's (0.05 for v1, 0.005 for v2).
        protocol: "v1" (Nesterov SGD) or "v2" (LARS).
        seed: the classifier's initialisation, the shuffling and the crops.
        device: where to train.
        eval_batch_size: batch for the test split.

    Returns:
        ``top1``, ``top5``, ``epochs``, ``batch_size``, ``lr``, ``steps``, ``num_labelled``,
        ``proj_selector``, ``finetune_protocol``, ``predictions`` and ``network`` (the
        fine-tuned :class:`~simclrkit.classifier.Classifier`, in eval mode, on ``device``).
    """
    if protocol not in FINETUNE_PROTOCOLS:
        raise ConfigError(
            f"finetune_protocol: got {protocol!r}; allowed: {', '.join(FINETUNE_PROTOCOLS)}"
        )
    layers = [] if head is None else list(getattr(head, "layers", []))
    if not 0 <= proj_selector <= len(layers):
        raise ConfigError(
            f"ft_proj_selector: got {proj_selector}; allowed: 0 to {len(layers)} "
            "(the number of projection-head layers)"
        )
    indices = np.asarray(indices, dtype=np.int64)
    batch_size = min(batch_size, len(indices))
    generator = torch.Generator().manual_seed(seed)
    network = Classifier(
        copy.deepcopy(encoder), copy.deepcopy(layers[:proj_selector]), num_classes, generator
    ).to(device)
    default_lr, scaling = _PROTOCOL_LR[protocol]
    lr = (default_lr if base_lr is None else base_lr) * scaling(batch_size)
    if protocol == "v2":
        groups = parameter_groups(network, weight_decay=0.0, extra_excluded=[network.classifier])
        optimizer = build_optimizer("lars", groups, lr=lr, momentum=0.9, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, nesterov=True)
    schedule = WarmupCosineSchedule(epochs * math.ceil(len(indices) / batch_size), 0, lr)
    network.train()
    step = 0
    for epoch in range(epochs):
        for batch in _batches(len(indices), batch_size, np.random.default_rng([seed, epoch])):
            chosen = indices[batch]
            views = eval_views(train, chosen, image_size, train=True, seed=seed, epoch=epoch)
            loss = F.cross_entropy(network(views.to(device)), train.labels[chosen].to(device))
            schedule.apply(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    network.eval()
    with torch.no_grad():
        batches = _test_batches(test, image_size, eval_batch_size)
        scores = torch.cat([network(x.to(device)).float().cpu() for _, x in batches])
    top1, top5 = top_k_accuracies(scores, test.labels)
    return {
        "top1": top1,
        "top5": top5,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "steps": step,
        "num_labelled": int(len(indices)),
        "proj_selector": proj_selector,
        "finetune_protocol": protocol,
        "predictions": scores.argmax(dim=1).numpy(),
        "network": network,
    }
