"""Evaluation protocols for learned representations (SPEC §7; paper §4 and App. B.5-B.6).

Frozen-feature protocols never change the encoder: it runs in eval mode under ``no_grad``,
so BatchNorm normalises with its running statistics and updates nothing (weights and buffers
stay bit-identical; the tests check it).

* Linear evaluation, two ways:

  - ``lbfgs`` (fast, the default): h is computed once, standardised, and a multinomial
    logistic regression (scikit-learn, L-BFGS) is fitted, its inverse regularisation C picked
    on a held-out stratified fifth of the training split, then refitted on all of it.
  - ``sgd`` (the paper's protocol): a plain ``Linear`` layer with bias on frozen h, trained
    with Nesterov SGD (momentum 0.9, lr 0.1 * B / 256, no weight decay, cosine decay) on
    crop-and-flip views of the training images, drawn afresh every epoch.

* Weighted kNN on L2-normalised h (InstDisc, Wu et al. 2018): the k nearest training
  features vote for their class with weight exp(similarity / temperature).
* The bounded evaluation that ends a pretraining run is in ``runeval.py``.
* Fine-tuning on a class-balanced fraction of the labels (paper App. B.5; SimCLRv2 §2) is in
  ``finetune.py``; it reuses the views and helpers defined here.

The orchestration that runs these on a checkpoint and writes the report is in
``eval_report.py``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclrkit.augment import EvalAugment, apply_eval
from simclrkit.config import ConfigError
from simclrkit.data import BadImageError, BadImageWarning, ImageArray, ImageFiles
from simclrkit.optim import WarmupCosineSchedule

Source = ImageArray | ImageFiles

# Inverse regularisation strengths tried on the held-out part of the training split, in
# increasing order so each fit warm-starts from the more regularised (easier) previous one.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


# --------------------------------------------------------------------------------------
# Images and features
# --------------------------------------------------------------------------------------


def eval_views(
    source: Source,
    indices: Sequence[int] | np.ndarray | torch.Tensor,
    image_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> torch.Tensor:
    """Evaluation views of some images: crop + flip (``train``) or the test centre crop.

    The random crops are keyed on (seed, epoch, image index), so every epoch draws new
    views and a rerun draws the same ones. Image files are decoded at the smallest JPEG scale
    that covers the crop (``filebatches.largest_reduction``).

    Args:
        source: the dataset.
        indices: (B,) image indices into ``source``.
        image_size: side S of the output.
        train: random resized crop and flip (SPEC §2) or the deterministic test transform.
        seed, epoch: randomness key for ``train``.

    Returns:
        (B, C, S, S) float32 in [0, 1].

    Raises:
        BadImageError: a file that does not decode.
    """
    indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    keys = dict(seed=seed, epoch=epoch)
    if isinstance(source, ImageArray):
        return apply_eval(source.images[indices], image_size, train, indices=indices, **keys)
    # Files differ in size, so each is cropped on its own before they are stacked.
    return torch.cat([_file_view(source, int(i), image_size, train, **keys) for i in indices])


def _file_view(
    source: ImageFiles, index: int, image_size: int, train: bool, *, seed: int, epoch: int
) -> torch.Tensor:
    """(1, 3, S, S) evaluation view of one file, decoded at the scale its crop allows."""
    from simclrkit.filebatches import largest_reduction, scale_boxes

    transform = EvalAugment(output_size=image_size)
    drawn: dict[str, Any] = {}

    def reduction_for(height: int, width: int) -> int:
        drawn["params"] = transform.sample_params(train, height, width, seed, epoch, [index])
        return largest_reduction(drawn["params"], image_size)

    pixels, full = source.read_reduced(index, reduction_for)
    params = drawn.get("params") or transform.sample_params(train, *full, seed, epoch, [index])
    params = scale_boxes(params, full, tuple(pixels.shape[-2:]))
    return transform.apply(pixels[None], params)


def select_images(source: Source, positions: Sequence[int] | np.ndarray) -> Source:
    """The images ``positions`` of ``source`` (in that order) as a source of their own."""
    positions = np.asarray(positions, dtype=np.int64)
    if isinstance(source, ImageArray):
        chosen = torch.from_numpy(positions)
        labels = None if source.labels is None else source.labels[chosen]
        return replace(source, images=source.images[chosen], labels=labels)
    return ImageFiles(
        source.index.select(positions), name=source.name, split=source.split,
        max_image_pixels=source.max_image_pixels, reduced_decode=source.reduced_decode,
    )


class _TestBatches(Dataset):
    """Item ``b`` -> (positions, test views, bad files) of the b-th batch of a source.

    A file that does not decode is left out of its batch and reported as (position, reason),
    so that a DataLoader's workers can decode while the encoder runs.
    """

    def __init__(self, source: Source, image_size: int, batch_size: int) -> None:
        self.source, self.image_size, self.batch_size = source, image_size, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    def __getitem__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        start = batch * self.batch_size
        positions = np.arange(start, min(start + self.batch_size, len(self.source)))
        if isinstance(self.source, ImageArray):
            views = eval_views(self.source, positions, self.image_size, train=False)
            return torch.from_numpy(positions), views, []
        kept, views, bad = [], [], []
        for i in positions.tolist():
            try:
                views.append(_file_view(self.source, i, self.image_size, False, seed=0, epoch=0))
                kept.append(i)
            except BadImageError as error:
                bad.append((i, error.reason))
        channels = self.source.num_channels
        stacked = torch.cat(views) if views else torch.empty(0, channels, self.image_size,
                                                              self.image_size)
        return torch.tensor(kept, dtype=torch.int64), stacked, bad


def _test_batches(
    source: Source, image_size: int, batch_size: int, *, workers: int = 0,
    bad: list | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(positions, test-time views) batches in order (centre crop 0.875 above 32 px).

    Files that do not decode are left out and appended to ``bad`` as (position, reason); with
    ``bad`` None they raise :class:`BadImageError`. ``workers`` DataLoader processes decode
    ahead (files only).
    """
    from simclrkit.pipeline import worker_init

    dataset = _TestBatches(source, image_size, batch_size)
    use_workers = workers if isinstance(source, ImageFiles) else 0
    loader = DataLoader(
        dataset, batch_size=None, num_workers=use_workers,
        worker_init_fn=worker_init if use_workers else None,
    )
    for positions, views, failed in loader:
        if failed:
            if bad is None:
                index, reason = failed[0]
                raise BadImageError(source.path(index), reason)
            bad.extend(failed)
        if len(positions):
            yield positions, views


@torch.no_grad()
def compute_features(
    encoder: nn.Module,
    source: Source,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    workers: int = 0,
    skip_bad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """h of the images, by the encoder in eval mode: (h (M, D) float32 on CPU, positions (M,)
    of the images the rows belong to, bad files as (position, reason)).

    Without ``skip_bad`` a file that does not decode raises :class:`BadImageError` (then M
    is N and positions are 0..N-1). The encoder's training flag is restored afterwards; its
    weights and BatchNorm buffers are not modified (eval mode uses the running statistics).
    """
    was_training = encoder.training
    encoder.eval()
    bad: list[tuple[int, str]] | None = [] if skip_bad else None
    try:
        rows, positions = [], []
        for kept, x in _test_batches(source, image_size, batch_size, workers=workers, bad=bad):
            rows.append(encoder.forward_features(x.to(device)).float().cpu())
            positions.append(kept)
        dim = _feature_dim(encoder)
        h = torch.cat(rows) if rows else torch.empty(0, dim)
        kept_positions = torch.cat(positions) if positions else torch.empty(0, dtype=torch.int64)
        return h, kept_positions, bad or []
    finally:
        encoder.train(was_training)


def extract_features(
    encoder: nn.Module,
    source: Source,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> torch.Tensor:
    """h for every image (N, D) float32 on CPU; see :func:`compute_features`.

    Raises:
        BadImageError: a file that does not decode (:func:`readable_features` leaves such
            files out instead).
    """
    return compute_features(
        encoder, source, image_size=image_size, batch_size=batch_size, device=device,
        workers=workers,
    )[0]


def shared_features(
    encoder: nn.Module,
    source: Source,
    info: Any,
    **args: Any,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]] | None:
    """:func:`compute_features` of every image that decodes, shared by the processes of a job:
    process r computes images r, r + W, ...; the main process receives (h, positions, bad) in
    the source's order, the others None. ``info`` is a ``distributed.DistInfo``."""
    from simclrkit import distributed

    mine = np.arange(info.rank, len(source), info.world_size)
    part = select_images(source, mine) if info.world_size > 1 else source
    h, kept, bad = compute_features(encoder, part, skip_bad=True, **args)
    if info.world_size <= 1:
        return h, kept, bad
    rows = distributed.gather_rows(h)
    used = distributed.gather_rows(torch.from_numpy(mine)[kept].view(-1, 1))
    failed = distributed.all_gather_objects([(int(mine[i]), reason) for i, reason in bad])
    if rows is None:
        return None
    order = torch.argsort(used.view(-1))
    return rows[order], used.view(-1)[order], sorted(e for part in failed for e in part)


def readable_features(
    encoder: nn.Module,
    source: Source,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    workers: int = 0,
    max_bad_fraction: float = 1.0,
    info: Any = None,
) -> tuple[torch.Tensor | None, Source]:
    """h of every image that decodes, and the source without those that do not.

    Evaluation finds bad files while it computes the first features; the protocols after it
    then run on the returned source, whose labels match the rows. Each bad file gets one
    :class:`~simclrkit.imagefiles.BadImageWarning`. Under several processes (``info``, a
    ``distributed.DistInfo``) each computes its share; every process returns the same
    source, the main process the features and the others None.

    Raises:
        ConfigError: more than ``max_bad_fraction`` of the images did not decode (on every
            process alike).
    """
    from simclrkit import distributed

    info = info or distributed.DistInfo()
    result = shared_features(encoder, source, info, image_size=image_size,
                             batch_size=batch_size, device=device, workers=workers)  # fmt: skip
    h, positions, bad = result if result is not None else (None, None, [])
    outcome = None
    if info.is_main:
        for index, reason in bad:
            warnings.warn(f"skipping image {source.path(index)}: {reason}", BadImageWarning,
                          stacklevel=2)  # fmt: skip
        if len(bad) > max_bad_fraction * len(source):
            named = "; ".join(f"{source.path(i)}: {r}" for i, r in bad[:5])
            outcome = ("error", (
                f"data.max_bad_fraction: {len(bad)} of {len(source)} images of {source.name}/"
                f"{source.split} ({len(bad) / len(source):.2%}) could not be decoded, more than "
                f"the allowed {max_bad_fraction:.2%} ({named}); fix or remove them, or raise "
                "data.max_bad_fraction"
            ))  # fmt: skip
        else:
            outcome = ("ok", positions.numpy() if bad else None)
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    return h, source if outcome[1] is None else select_images(source, outcome[1])


def raw_pixel_features(source: Source, *, image_size: int, max_size: int = 32) -> torch.Tensor:
    """Flattened test-transform pixels, the no-learning baseline; returns (N, C * S * S).

    Images are resized to ``min(image_size, max_size)`` so the baseline stays cheap for large
    images (224 px would give 150,528 dimensions).
    """
    size = min(image_size, max_size)
    return torch.cat([x.flatten(1) for _, x in _test_batches(source, size, 512)])


@torch.no_grad()
def recalibrate_batchnorm(
    encoder: nn.Module,
    source: Source,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> None:
    """Sets every BatchNorm's running statistics to the exact averages over ``source``.

    Used for the random-initialisation baseline only: a fresh network's running statistics are
    the placeholders (0, 1), which would handicap it for reasons unrelated to its weights.
    Leaves the encoder in eval mode.
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: the exact mean over all batches
    encoder.train()
    for _, x in _test_batches(source, image_size, batch_size):
        encoder.forward_features(x.to(device))
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    encoder.eval()


def few_threads(work: float) -> Any:
    """Limits BLAS/OpenMP to one thread for scikit-learn problems below ~1e8 multiply-adds.

    For small problems thread hand-offs cost more than the arithmetic, and on a CPU shared
    with other jobs the spin-waiting threads made L-BFGS on 4,000 x 128 features about 100
    times slower (measured: 65 s instead of 0.5 s). Larger problems keep every thread.
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1) if work < 1e8 else nullcontext()


def _batches(count: int, batch_size: int, generator: np.random.Generator) -> list[np.ndarray]:
    """A shuffled epoch in near-equal batches of at most ``batch_size`` (none of size 1 when
    count > 1, so BatchNorm in train mode always sees at least two samples)."""
    order = generator.permutation(count)
    return np.array_split(order, math.ceil(count / batch_size))


def top_k_accuracies(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of class scores (N, C) against labels (N,).

    With fewer than 5 classes top-5 counts the top ``C`` (and is therefore 1).
    """
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = ranked == labels.to(ranked.device)[:, None]
    return float(hits[:, 0].float().mean()), float(hits.any(dim=1).float().mean())


# --------------------------------------------------------------------------------------
# Linear evaluation
# --------------------------------------------------------------------------------------


def logistic_regression_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Multinomial logistic regression on standardised features; C chosen on held-out data.

    Standardising (train mean and std) makes one C grid fit every encoder and raw pixels.
    A stratified 20% of the training split picks C; the final model is refitted on all of it.
    Fits run over the grid in increasing C, each warm-started from the previous solution.

    Args:
        train_features, test_features: (N, D) and (M, D).
        train_labels, test_labels: (N,) and (M,) integer class labels.
        seed: the held-out split's randomness.
        c_grid: inverse regularisation strengths to try.
        deadline: a ``time.perf_counter()`` value to finish by (None: no limit). The cost of
            an iteration is estimated first (:func:`iteration_seconds`); the iteration cap,
            then the grid (C = 1 alone) are cut so that the fits end in time.

    Returns:
        ``top1``, ``top5`` (fractions), the chosen ``C``, ``validation_top1`` per C,
        ``converged`` (whether every L-BFGS run met its tolerance), ``notes`` (what a deadline
        cut) and ``predictions`` ((M,) int64 numpy array; remove it before serialising).
    """
    with few_threads(np.size(train_features) * len(np.unique(train_labels))):
        return _logistic_regression_probe(
            train_features, train_labels, test_features, test_labels, seed=seed, c_grid=c_grid,
            deadline=deadline,
        )


def _logistic_regression_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int,
    c_grid: Sequence[float],
    deadline: float | None = None,
) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    train_labels = np.asarray(train_labels)
    scaler = StandardScaler().fit(train_features)
    train_x = scaler.transform(train_features).astype(np.float32)
    test_x = scaler.transform(test_features).astype(np.float32)
    classes, counts = np.unique(train_labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"logistic regression needs at least 2 classes, got {len(classes)}")
    converged = True

    def fit(model: Any, features: np.ndarray, labels: np.ndarray) -> Any:
        nonlocal converged
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(features, labels)
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model

    # A stratified split needs two members per class; with fewer, C cannot be chosen fairly.
    can_select = counts.min() >= 2 and len(train_labels) * 0.2 >= len(classes)
    validation: dict[float, float] = {}
    max_iter, notes = 1000, []
    if deadline is not None:
        per_iteration = iteration_seconds(*train_x.shape, len(classes))
        grid_fits = 0.8 * len(c_grid) if can_select and len(c_grid) > 1 else 0.0
        remaining = max(0.0, deadline - time.perf_counter())
        if per_iteration * max_iter * (grid_fits + 1) > remaining:
            max_iter = int(remaining / (per_iteration * (grid_fits + 1)))
            if max_iter < 100 and grid_fits:
                can_select, grid_fits = False, 0.0
                notes.append("C grid skipped (C = 1) to fit the time budget")
                max_iter = int(remaining / per_iteration)
            max_iter = max(10, min(1000, max_iter))
            if max_iter < 1000:
                notes.append(f"L-BFGS capped at {max_iter} iterations to fit the time budget")
    if can_select and len(c_grid) > 1:
        fit_x, val_x, fit_y, val_y = train_test_split(
            train_x, train_labels, test_size=0.2, random_state=seed, stratify=train_labels
        )
        model = LogisticRegression(max_iter=max_iter, tol=1e-4, warm_start=True)
        for c in sorted(c_grid):
            validation[c] = fit(model.set_params(C=c), fit_x, fit_y).score(val_x, val_y)
        # Ties go to the stronger regularisation (smaller C).
        best_c = max(validation, key=lambda c: (validation[c], -c))
    else:
        best_c = 1.0 if 1.0 in c_grid or not c_grid else float(np.median(c_grid))
    final = fit(LogisticRegression(C=best_c, max_iter=max_iter, tol=1e-4), train_x, train_labels)
    # Columns of predict_proba follow model.classes_; scatter them into all label values so
    # a class missing from the training split simply never wins.
    probabilities = final.predict_proba(test_x)
    num_classes = int(max(classes.max(), np.max(test_labels))) + 1
    scores = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    scores[:, torch.as_tensor(final.classes_)] = torch.as_tensor(probabilities, dtype=torch.float64)
    top1, top5 = top_k_accuracies(scores, torch.as_tensor(np.asarray(test_labels)))
    return {
        "top1": top1,
        "top5": top5,
        "C": float(best_c),
        "validation_top1": {str(c): float(v) for c, v in validation.items()},
        "converged": bool(converged),
        "notes": notes,
        "predictions": scores.argmax(dim=1).numpy(),
    }


def iteration_seconds(num_samples: int, num_features: int, num_classes: int) -> float:
    """Seconds one L-BFGS iteration of multinomial logistic regression takes, about: four
    products of the (n x d) features with a (d x classes) matrix, timed here in float64."""
    rows = min(num_samples, 4096)
    x = np.random.default_rng(0).standard_normal((rows, num_features))
    w = np.zeros((num_features, max(num_classes, 2)))
    tick = time.perf_counter()
    for _ in range(2):
        x @ w
    per_product = (time.perf_counter() - tick) / 2 * (num_samples / rows)
    return 4 * per_product + 1e-6 * math.log2(max(num_samples, 2))


def linear_sgd_probe(
    encoder: nn.Module,
    train: Source,
    test: Source,
    *,
    image_size: int,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 256,
    base_lr: float = 0.1,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    feature_batch_size: int = 512,
) -> dict[str, Any]:
    """The paper's linear evaluation: a linear layer on frozen h, trained with Nesterov SGD.

    Paper App. B.6 / reference ``finetune`` with ``fine_tune_after_block=4``: momentum 0.9,
    lr = ``base_lr`` * B / 256, no weight decay, cosine decay to 0 without warmup, crop and
    flip views of the training images drawn afresh each epoch (so h cannot be cached). The
    paper trains 90 epochs on ImageNet; the default 30 keeps small datasets within a minute
    or two on a CPU. The head is a plain ``Linear`` with bias, weights from N(0, 0.01^2) as the
    reference's ``LinearLayer``. The encoder stays in eval mode under ``no_grad``: its BN
    statistics are used, never updated (the reference uses batch statistics here).

    Args:
        encoder: frozen; ``forward_features(x) -> h`` (B, D).
        train, test: labelled splits.
        image_size: side of the views.
        num_classes: C.
        epochs, batch_size, base_lr: the optimisation (B = ``batch_size``).
        augment: crop + flip each epoch; False computes h once and trains on cached features
            (much faster, slightly weaker).
        seed: the head's initialisation, the shuffling and the crops.
        device: where the encoder and head run.
        feature_batch_size: batch for computing test (and cached) features.

    Returns:
        ``top1``, ``top5``, ``epochs``, ``batch_size``, ``lr``, ``augment``, ``steps`` and
        ``predictions`` ((M,) numpy array).
    """
    was_training = encoder.training
    encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(_feature_dim(encoder), num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    head = head.to(device)
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = WarmupCosineSchedule(epochs * steps_per_epoch, 0, lr)
    labels = train.labels
    cached = None
    if not augment:
        cached = extract_features(
            encoder, train, image_size=image_size, batch_size=feature_batch_size, device=device
        )
    step = 0
    try:
        for epoch in range(epochs):
            for indices in _batches(len(train), batch_size, np.random.default_rng([seed, epoch])):
                if cached is None:
                    views = eval_views(
                        train, indices, image_size, train=True, seed=seed, epoch=epoch
                    )
                    with torch.no_grad():
                        h = encoder.forward_features(views.to(device)).float()
                else:
                    h = cached[indices].to(device)
                loss = F.cross_entropy(head(h), labels[indices].to(device))
                schedule.apply(optimizer, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        test_h = extract_features(
            encoder, test, image_size=image_size, batch_size=feature_batch_size, device=device
        )
    finally:
        encoder.train(was_training)
    with torch.no_grad():
        scores = head(test_h.to(device)).cpu()
    top1, top5 = top_k_accuracies(scores, test.labels)
    return {
        "top1": top1,
        "top5": top5,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augment": augment,
        "steps": step,
        "predictions": scores.argmax(dim=1).numpy(),
    }


def _feature_dim(encoder: nn.Module) -> int:
    if hasattr(encoder, "feature_dim"):
        return int(encoder.feature_dim)
    raise AttributeError("the encoder needs a feature_dim attribute (the size of h)")


# --------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Weighted kNN votes on L2-normalised features (InstDisc; lightly and solo-learn monitors).

    For a test feature q, with s_i = cos(q, x_i) over its k most similar training features,
    class c receives sum_{i in top-k, y_i = c} exp(s_i / temperature). The votes are returned
    normalised to sum to 1 per row; they are computed as exp((s_i - s_max) / temperature), the
    same ratios without overflow for small temperatures.

    Args:
        train_features: (N, D).
        train_labels: (N,) int64 in [0, num_classes).
        test_features: (M, D).
        k: neighbours per test feature (clamped to N).
        temperature: the vote weights' temperature (0.1 by default, as InstDisc).
        num_classes: C; None: ``train_labels.max() + 1``.
        chunk_size: test rows per similarity block; None keeps blocks near 16M entries, so
            memory stays bounded for large sets.

    Returns:
        (M, C) float32 vote shares; rank them (``topk``) for top-1 / top-5 predictions.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train.shape[0])
    chunk_size = chunk_size or max(1, 2**24 // max(train.shape[0], 1))
    votes = []
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk.to(train.device) @ train.T).topk(k, dim=1)  # (m, k)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        scores = torch.zeros(chunk.shape[0], num_classes, device=train.device)
        scores.scatter_add_(1, labels[neighbours], weights)
        votes.append(scores / scores.sum(dim=1, keepdim=True))
    return torch.cat(votes)


def knn_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 of :func:`knn_classify` on a labelled test set; adds ``predictions``."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes)
    top1, top5 = top_k_accuracies(scores, test_labels)
    return {"top1": top1, "top5": top5, "k": min(k, len(train_features)),
            "temperature": temperature, "predictions": scores.argmax(dim=1).numpy()}
