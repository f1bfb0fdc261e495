"""The evaluation that ends a pretraining run: linear probe and kNN, bounded in time.

After pretraining, ``pretrain`` measures how linearly separable and how well clustered h is
(``eval.linear``): L-BFGS logistic regression and weighted kNN on frozen features, next to the
same network at its random initialisation. On a large dataset the complete protocols take
hours (``simclrkit evaluate`` runs them, under torchrun too); this one is bounded: it never
takes longer than ``max(eval.max_share x the run's training time, eval.min_seconds)``.

1. A fixed class-balanced subsample: at most ``eval.max_train_images`` and
   ``eval.max_test_images``, taken round-robin over the classes in a seeded order, so the
   same images are used by every run of the same data (all of them when the splits are
   smaller; the default MNIST-5k run evaluates on its whole 4,000/1,000 split).
2. The cost of features is measured on one batch, and the subsample is shrunk (still
   class-balanced: a prefix of the round-robin order) until the features of every network fit
   in 70% of the budget; if even two training images per class do not fit, the baseline is
   dropped, then the evaluation, with a line saying so.
3. Every process computes the features of its share of the images, the main process gathers
   them and fits; the others are done. (The baseline's BatchNorm statistics are measured on
   the same first images by every process, so its features agree everywhere.)
4. L-BFGS is capped to the time left: one iteration costs about four products of the
   (n x d) feature matrix with a (d x classes) matrix, timed before fitting; the iteration cap
   and, if needed, the C grid are cut to fit, and the report says so.

At ImageNet size (1.28M images, 1,000 classes, ResNet-50) the default caps give 50 training
and 10 test images per class: the features of 60,000 images (twice that with the baseline),
forward passes only, shared by every process; the fit of 50,000 x 2,048 features with 1,000
classes is what the cap in step 4 bounds. (Not measured here: no GPU has run this.)
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrkit import distributed
from simclrkit.config import Config, ConfigError
from simclrkit.data import BadImageWarning, load_run_data
from simclrkit.evaluate import (
    Source,
    compute_features,
    knn_probe,
    logistic_regression_probe,
    raw_pixel_features,
    recalibrate_batchnorm,
    select_images,
    shared_features,
)

_FEATURE_SHARE = 0.7  # of the budget, for computing features; the rest for the fits
_RECALIBRATION_BATCHES = 10  # baseline BN statistics from at most this many batches


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every position, ordered round-robin over the classes (a seeded order within each):
    any prefix is as class-balanced as its length allows."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 20200213])
    rank = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[rng.permutation(members)] = np.arange(len(members))
    return np.lexsort((labels, rank))


def _subsample(order: np.ndarray, count: int) -> np.ndarray:
    return np.sort(order[:count])


def _features(
    encoder: nn.Module, source: Source, positions: np.ndarray, info: distributed.DistInfo,
    args: dict[str, Any],
) -> tuple[torch.Tensor, np.ndarray] | None:  # fmt: skip
    """Features of ``source[positions]`` shared by every process; on the main process (h, the
    positions that decoded), None elsewhere."""
    part = select_images(source, positions)
    result = shared_features(encoder, part, info, **args)
    if result is None:
        return None
    h, kept, bad = result
    for index, reason in bad:
        warnings.warn(f"skipping image {part.path(index)}: {reason}", BadImageWarning,
                      stacklevel=2)  # fmt: skip
    return h, positions[kept.numpy()]


def evaluate_run(
    encoder: nn.Module,
    make_random_encoder: Callable[[], nn.Module] | None,
    config: Config,
    *,
    image_size: int,
    train_seconds: float,
    device: torch.device | str = "cpu",
    info: distributed.DistInfo | None = None,
    workers: int = 0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Bounded linear-probe (L-BFGS) and kNN accuracy of ``encoder`` and its random twin.

    Every process of the run calls it; the main process returns the report, the others {}.

    Args:
        encoder: the pretrained encoder (frozen here).
        make_random_encoder: builds the same architecture at random initialisation, or None.
        config: the run's config (dataset, ``eval`` section).
        image_size: the side the encoder was trained at.
        train_seconds: the run's training time, which sets the budget.
        device, workers: where the encoder runs; loader processes for image files.
        info: this process's place in the job (None: a single process).
        seed: the subsample's and the held-out split's randomness.

    Returns:
        ``linear_top1``, ``linear_top5``, ``linear_C``, ``knn_top1``, ``knn_top5`` and with a
        twin the same prefixed ``random_init_``; ``eval_train_images``,
        ``eval_test_images``, ``eval_budget_seconds``, ``eval_seconds`` and ``eval_notes``
        (what the budget cut, if anything). Empty when the dataset has no labelled train and
        test splits, or nothing fits the budget.
    """
    info = info or distributed.DistInfo()
    started = time.perf_counter()
    settings = config.eval
    budget = max(settings.max_share * train_seconds, settings.min_seconds)

    def say(message: str) -> None:
        if not quiet and info.is_main:
            print(f"simclrkit: {message}", file=sys.stderr)

    try:
        train = load_run_data(config, "train")
        test = load_run_data(config, "test")
    except ConfigError as error:
        say(f"no linear evaluation: {error}")
        return {}
    if train.labels is None or test.labels is None:
        return {}
    args = dict(image_size=image_size, batch_size=settings.batch_size, device=device,
                workers=workers)  # fmt: skip
    train_order = balanced_order(train.labels.numpy(), seed)[: settings.max_train_images]
    test_order = balanced_order(test.labels.numpy(), seed)[: settings.max_test_images]
    baseline = make_random_encoder is not None and settings.random_init_baseline
    plan = None
    if info.is_main:
        plan = _plan(encoder, train, train_order, test_order, args, budget, baseline,
                     info.world_size, time.perf_counter() - started)  # fmt: skip
    plan = distributed.broadcast_object(plan)
    if plan["train"] == 0:
        say(f"no linear evaluation: its features alone would take more than its budget of "
            f"{budget:.0f}s (eval.max_share, eval.min_seconds)")
        return {}
    train_ids, test_ids = (_subsample(o, plan[k]) for o, k in ((train_order, "train"),
                                                               (test_order, "test")))

    def probe(model: nn.Module, prefix: str) -> dict[str, Any]:
        train_part = _features(model, train, train_ids, info, args)
        test_part = _features(model, test, test_ids, info, args)
        if train_part is None:
            return {}
        (train_h, train_used), (test_h, test_used) = train_part, test_part
        train_y, test_y = train.labels[train_used], test.labels[test_used]
        deadline = started + budget * (0.5 if baseline and not prefix else 1.0)
        linear = logistic_regression_probe(
            train_h.numpy(), train_y.numpy(), test_h.numpy(), test_y.numpy(), seed=seed,
            deadline=deadline,
        )
        knn = knn_probe(train_h, train_y, test_h, test_y)
        used.update(train=len(train_used), test=len(test_used))  # files that decoded
        notes.extend(f"{prefix or 'pretrained '}{note}" for note in linear.get("notes", []))
        return {
            f"{prefix}linear_top1": linear["top1"],
            f"{prefix}linear_top5": linear["top5"],
            f"{prefix}linear_C": linear["C"],
            f"{prefix}knn_top1": knn["top1"],
            f"{prefix}knn_top5": knn["top5"],
        }

    notes: list[str] = list(plan["notes"])
    used = {"train": len(train_ids), "test": len(test_ids)}
    report = probe(encoder, "")
    if plan["baseline"]:
        twin = make_random_encoder().to(device)
        calibration = select_images(train, train_ids[: _RECALIBRATION_BATCHES * settings.batch_size])
        recalibrate_batchnorm(twin, calibration, image_size=image_size,
                              batch_size=settings.batch_size, device=device)  # fmt: skip
        report.update(probe(twin, "random_init_"))
    if info.is_main and settings.raw_pixels_baseline and report:
        report.update(_raw_pixels(train, train_ids, test, test_ids, image_size, seed,
                                  started + budget))  # fmt: skip
    if not info.is_main:
        return {}
    seconds = time.perf_counter() - started
    report.update(
        eval_train_images=used["train"], eval_test_images=used["test"],
        eval_budget_seconds=float(budget), eval_seconds=float(seconds), eval_notes=notes,
    )
    say(f"linear evaluation done in {seconds:.1f}s on {used['train']} train / {used['test']} "
        f"test images" + (f" ({'; '.join(notes)})" if notes else ""))
    return report


def _raw_pixels(
    train: Source, train_ids: np.ndarray, test: Source, test_ids: np.ndarray, image_size: int,
    seed: int, deadline: float,
) -> dict[str, Any]:  # fmt: skip
    """The same two probes on pixels (resized to at most 32 px): what no learning gives.

    Pixels need no forward pass, so this costs the fits alone (the L-BFGS fit shares the
    evaluation's deadline; at ImageNet size, 50,000 x 3,072 pixel features)."""
    try:
        train_x = raw_pixel_features(select_images(train, train_ids), image_size=image_size)
        test_x = raw_pixel_features(select_images(test, test_ids), image_size=image_size)
    except (OSError, ValueError) as error:  # a bad file: the baseline is context, not the result
        return {"raw_pixels_notes": [f"raw-pixel baseline skipped: {error}"]}
    train_y, test_y = train.labels[train_ids], test.labels[test_ids]
    linear = logistic_regression_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(),
                                       test_y.numpy(), seed=seed, deadline=deadline)  # fmt: skip
    knn = knn_probe(train_x, train_y, test_x, test_y)
    return {"raw_pixels_linear_top1": linear["top1"], "raw_pixels_linear_top5": linear["top5"],
            "raw_pixels_knn_top1": knn["top1"], "raw_pixels_knn_top5": knn["top5"]}  # fmt: skip


def _plan(
    encoder: nn.Module, train: Source, train_order: np.ndarray, test_order: np.ndarray,
    args: dict[str, Any], budget: float, baseline: bool, world_size: int, spent: float,
) -> dict[str, Any]:  # fmt: skip
    """How many images fit: the cost of one batch of features, measured, scaled up."""
    probe_ids = np.sort(train_order[: args["batch_size"]])
    tick = time.perf_counter()
    compute_features(encoder, select_images(train, probe_ids), skip_bad=True, **args)
    per_image = (time.perf_counter() - tick) / max(1, len(probe_ids))
    classes = len(np.unique(np.asarray(train.labels)[train_order])) if len(train_order) else 1
    available = _FEATURE_SHARE * budget - spent - (time.perf_counter() - tick)
    notes: list[str] = []

    def cost(n_train: int, n_test: int, with_baseline: bool) -> float:
        calibration = min(n_train, _RECALIBRATION_BATCHES * args["batch_size"])
        images = n_train + n_test
        if with_baseline:
            images += n_train + n_test + calibration * world_size  # every process calibrates
        return per_image * images / world_size

    n_train, n_test = len(train_order), len(test_order)
    for with_baseline in ([True, False] if baseline else [False]):
        full = cost(n_train, n_test, with_baseline)
        scale = min(1.0, available / full) if full > 0 else 1.0
        fitted_train = int(n_train * scale)
        if fitted_train >= min(n_train, 2 * classes):
            if scale < 1.0:
                notes.append(f"subsample shrunk to {scale:.0%} to fit the time budget")
            if baseline and not with_baseline:
                notes.append("random-initialisation baseline dropped to fit the time budget")
            return {"train": fitted_train, "test": max(1, int(n_test * scale)),
                    "baseline": with_baseline, "notes": notes}  # fmt: skip
    return {"train": 0, "test": 0, "baseline": False, "notes": notes}
