"""Watching the representation while it trains: an online linear probe and cheap monitors.

The loss and the contrastive accuracy say how well the network solves its own task, not
whether h is becoming a good representation, nor whether it is collapsing. Two things here do:

* :class:`OnlineProbe`: a linear classifier on ``stop_gradient(h)`` of the training views,
  trained by the same optimiser as the network, as in the reference's TF2 code
  (``lineareval_while_pretraining``, on by default there; paper App. B.6 finds it equal to the
  offline linear evaluation). The stopped gradient means it cannot change the representation:
  the network's weights are bit-identical with and without it (tested). Its parameter group
  has no LARS and no trust ratio, as the reference excludes ``head_supervised``; its weight
  decay is the reference's ``weight_decay * l2_loss(kernel)`` on the kernel, added to the
  probe's loss here because the optimiser applies none to that group. Under several
  processes its gradients are averaged over them (one all-reduce of (D + 1) x classes
  numbers per step: 8 MB for ResNet-50 on ImageNet), so every copy stays equal.
* Monitors, every ``eval.monitor_every`` steps, from the step's own embeddings and a small
  fixed labelled subset:

  - ``alignment`` (mean squared distance between the two views' normalised z) and
    ``uniformity`` (log of the mean Gaussian potential between normalised z; Wang & Isola
    2020, "Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere", with t = 2), from the step's batch;
  - ``rankme``: the effective rank of h (Garrido et al. 2023, "RankMe"), exp of the entropy
    of its normalised singular values, from the step's batch (both views). A rank that falls
    towards 1 is dimensional collapse, visible without labels;
  - with labels: ``knn_top1`` (weighted kNN as the final evaluation's, with k = half of a
    class's share of the bank, at most 200, of a fixed class-balanced query subset against a
    fixed bank of training images, eval-mode h) and
    ``probe_top1`` (the online probe on the same queries).

  Each measurement logs its own cost (``seconds``).

  Cost: the kNN features of ``bank + queries`` images (768 by default, forward passes in
  eval mode) and one SVD of the batch's h. On the CPU default that is well under a second per
  measurement, ten measurements per run by default (1.2 s of 264 s of training, 0.5%: the sum
  of the ``seconds`` its monitor lines record, docs/benchmarks.md). At ImageNet size
  on a GPU (an estimate: no GPU has run it), 768 images take under a second and
  the SVD of a (2B x 2048) h milliseconds; the queries come from the run's labelled test split
  (``load_run_data``), listed once at the start.

Everything here is measured on the main process only, except the probe's training, which
runs everywhere. The monitors change no weight, buffer or random state.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclrkit import distributed

__all__ = ["OnlineProbe", "TrainingMonitor", "alignment", "effective_rank", "uniformity"]


# --------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------


def alignment(z1: Tensor, z2: Tensor) -> float:
    """Mean ||u - v||^2 of the L2-normalised positive pairs (Wang & Isola, alpha = 2); 0 is
    perfect alignment, 4 the opposite."""
    u, v = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return float((u - v).pow(2).sum(dim=1).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """log mean_{i < j} exp(-t ||u_i - u_j||^2) of the L2-normalised rows (Wang & Isola);
    lower is more uniform, 0 is every row equal (complete collapse)."""
    u = F.normalize(z.float(), dim=1)
    if u.shape[0] < 2:
        return float("nan")
    distances = torch.pdist(u, p=2).pow(2)
    return float(torch.logsumexp(-t * distances, dim=0) - np.log(distances.numel()))


def effective_rank(h: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp(-sum p_k log p_k) with p_k = s_k / sum(s) + eps over
    the singular values s of h (rows: samples). Between 1 (collapsed) and min(h.shape)."""
    singular = torch.linalg.svdvals(h.float())
    p = singular / singular.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * p.log()).sum()))


# --------------------------------------------------------------------------------------
# Online probe
# --------------------------------------------------------------------------------------


class OnlineProbe(nn.Module):
    """Linear classifier on the detached h of the training views (module notes).

    Zero-initialised, and the random state is put back after nn.Linear's default draw, so
    building it changes no other random draw of the run. It keeps the running sums of its training loss and accuracy between
    log steps as tensors on the device (no host sync per step).

    Args:
        feature_dim: size of h.
        num_classes: number of labels.
        weight_decay: the reference's L2 on the kernel (its ``weight_decay`` flag).
    """

    def __init__(self, feature_dim: int, num_classes: int, weight_decay: float) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws its default init
            self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.weight_decay = float(weight_decay)
        self.register_buffer("sums", torch.zeros(3, dtype=torch.float64))  # loss, correct, seen

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h.detach().float())

    def backward_step(self, h: Tensor, labels: Tensor, scaler: Any = None) -> None:
        """Gradients of the probe's loss on (h, labels) into its parameters, averaged over
        processes; the optimiser's step applies them with the network's."""
        logits = self(h)
        loss = F.cross_entropy(logits, labels)
        # The reference's weight_decay * tf.nn.l2_loss(kernel): wd * |W|^2 / 2.
        total = loss + 0.5 * self.weight_decay * self.linear.weight.pow(2).sum()
        (scaler.scale(total) if scaler is not None else total).backward()
        if distributed.is_initialized():
            grads = [p.grad for p in self.parameters()]
            flat = distributed.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()
            self.sums[0] += loss.double() * len(labels)
            self.sums[1] += correct
            self.sums[2] += len(labels)

    def window(self) -> dict[str, float]:
        """Mean training loss and accuracy since the last call, over every process; resets."""
        sums = distributed.all_reduce_mean(self.sums)
        self.sums.zero_()
        seen = float(sums[2])
        if seen == 0:
            return {}
        return {"probe_loss": float(sums[0]) / seen, "probe_train_acc": float(sums[1]) / seen}


# --------------------------------------------------------------------------------------
# What the loop calls
# --------------------------------------------------------------------------------------


class TrainingMonitor:
    """The probe and the monitors of one run, behind the few calls the loop makes.

    Args:
        probe: the online probe, or None (no labels, or ``eval.online_probe=false``).
        labels: (N,) labels of the pretraining images, or None.
        every: measure every this many steps (0: never).
        bank, queries: labelled image sources for the kNN monitor, or None.
        image_size, device, batch_size, autocast: how the kNN features are computed
            (``autocast`` makes the training's autocast context: bf16 halves their cost).
        is_main: whether this process measures and logs.
    """

    def __init__(
        self, probe: OnlineProbe | None, labels: Tensor | None, every: int,
        bank: Any = None, queries: Any = None, *, image_size: int, device: torch.device,
        batch_size: int, is_main: bool, autocast: Any = contextlib.nullcontext,
    ) -> None:  # fmt: skip
        self.probe, self.labels, self.every = probe, labels, every
        self.bank, self.queries = bank, queries
        self.image_size, self.device, self.batch_size = image_size, device, batch_size
        self.autocast = autocast
        self.is_main = is_main
        self.latest: dict[str, float] = {}  # the newest measurement, for the progress line

    @classmethod
    def build(cls, config: Any, plan: Any, model: nn.Module, train_data: Any,
              device: torch.device, info: Any, quiet: bool, *, with_probe: bool,
              autocast: Any = contextlib.nullcontext) -> TrainingMonitor:  # fmt: skip
        """From the run's settings: the probe (``with_probe``) where the pretraining images
        have labels, the kNN monitor where a labelled test split exists too."""
        labels = train_data.labels
        num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
        probe = None
        if with_probe and num_classes > 1:
            probe = OnlineProbe(model.encoder.feature_dim, num_classes,
                                config.optim.weight_decay).to(device)  # fmt: skip
        bank = queries = None
        every = plan.monitor_every
        if every and num_classes > 1 and info.is_main:
            bank, queries = _knn_sets(config, train_data, config.eval.monitor_images, quiet)
        return cls(probe, labels, every, bank, queries, image_size=plan.image_size,
                   device=device, batch_size=config.eval.batch_size, is_main=info.is_main,
                   autocast=autocast)  # fmt: skip

    # -- the loop's calls --------------------------------------------------------------------

    def modules(self) -> tuple[nn.Module, ...]:
        """Modules the optimiser trains beside the network (its "probe" group)."""
        return (self.probe,) if self.probe is not None else ()

    def train_probe(self, h: Tensor, indices: Tensor, scaler: Any = None) -> None:
        """One probe backward on this step's h (both views) and its images' labels."""
        if self.probe is None:
            return
        labels = self.labels[indices]
        if h.device.type == "cuda":
            labels = labels.pin_memory()  # a pageable copy could wait for the stream: a sync
        labels = labels.to(h.device, non_blocking=True)
        self.probe.backward_step(h, torch.cat([labels, labels]), scaler)

    def log_values(self) -> dict[str, float]:
        """The probe's training loss and accuracy over the log window (every process calls)."""
        return self.probe.window() if self.probe is not None else {}

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    @torch.no_grad()
    def measure(self, encoder: nn.Module, h: Tensor, z1: Tensor, z2: Tensor) -> dict[str, float]:
        """The monitors at this step (every process calls: h and z are gathered to the main
        process, which alone measures and returns them)."""
        started = time.perf_counter()
        h_all = distributed.gather_rows(h.float())
        z_all = distributed.gather_rows(torch.cat([z1, z2], dim=1).float())
        if not self.is_main:
            return {}
        z1_all, z2_all = z_all.split(z1.shape[1], dim=1)
        values = {
            "alignment": alignment(z1_all, z2_all),
            "uniformity": uniformity(torch.cat([z1_all, z2_all])),
            "rankme": effective_rank(h_all),
        }
        if self.bank is not None and self.queries is not None:
            # The feature loader draws its base seed from the global generator: put it back,
            # so a watched run's random state (saved in checkpoints) is an unwatched run's.
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                values.update(self._knn(encoder))
        values["seconds"] = time.perf_counter() - started  # what watching costs, logged
        self.latest = values
        return values

    def _knn(self, encoder: nn.Module) -> dict[str, float]:
        from simclrkit.evaluate import compute_features, knn_probe, top_k_accuracies

        args = dict(image_size=self.image_size, batch_size=self.batch_size, device=self.device)
        # skip_bad: a file that stopped decoding mid-run costs a measurement row, not the run
        with self.autocast():
            bank_h, bank_rows, _ = compute_features(encoder, self.bank, skip_bad=True, **args)
            query_h, query_rows, _ = compute_features(encoder, self.queries, skip_bad=True,
                                                      **args)  # fmt: skip
        if not (len(bank_rows) and len(query_rows)):
            return {}
        query_labels = self.queries.labels[query_rows]
        bank_labels = self.bank.labels[bank_rows]
        # k = 200 (the final evaluation's) on a bank of a few hundred images would let most of
        # the bank vote; half of a class's share of the bank keeps the vote local.
        classes = int(bank_labels.max()) + 1
        k = max(1, min(200, len(bank_rows) // (2 * classes)))
        knn = knn_probe(bank_h, bank_labels, query_h, query_labels, k=k)
        values = {"knn_top1": knn["top1"]}
        if self.probe is not None:
            logits = self.probe(query_h.to(self.device)).cpu()
            values["probe_top1"] = top_k_accuracies(logits, query_labels)[0]
        return values

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe.state_dict()} if self.probe is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.probe is not None and state and "probe" in state:
            self.probe.load_state_dict(state["probe"])


def _knn_sets(config: Any, train_data: Any, count: int, quiet: bool) -> tuple[Any, Any]:
    """(bank, queries): fixed class-balanced subsets of the training images (``count``) and
    of the run's labelled test split (``count // 2``), or (None, None) without one."""
    from simclrkit.config import ConfigError
    from simclrkit.data import load_run_data
    from simclrkit.evaluate import select_images
    from simclrkit.runeval import balanced_order

    try:
        test = load_run_data(config, "test")
    except (ConfigError, OSError, ValueError) as error:
        if not quiet:
            print(f"simclrkit: no kNN monitor: {error}", file=sys.stderr)
        return None, None
    if test.labels is None or not len(test):
        return None, None

    def subset(source: Any, size: int) -> Any:
        rows = np.sort(balanced_order(source.labels.numpy(), config.seed)[:size])
        return select_images(source, rows)

    return subset(train_data, count), subset(test, max(1, count // 2))
