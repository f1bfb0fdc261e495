"""Evaluation of frozen representations (SPEC §7).

The fast linear protocol: features h are computed once by the frozen encoder in eval mode
(BatchNorm uses its running statistics and nothing is updated), then a multinomial logistic
regression (L-BFGS, scikit-learn) is fitted on the training split with its regularisation
strength chosen on a held-out fifth of it, and scored on the test split.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from simclrkit.augment import apply_eval
from simclrkit.config import ConfigError
from simclrkit.data import ImageArray, ImageFiles, load_dataset

# Inverse regularisation strengths tried on the held-out part of the training split.
_C_GRID = (0.01, 0.1, 1.0, 10.0)


def _eval_batches(
    source: ImageArray | ImageFiles, image_size: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Test-time views (centre crop 0.875 for > 32 px, SPEC §2) in batches of float (B, C, S, S)."""
    for start in range(0, len(source), batch_size):
        stop = min(start + batch_size, len(source))
        if isinstance(source, ImageArray):
            yield apply_eval(source.images[start:stop], image_size, train=False)
        else:
            yield torch.cat(
                [apply_eval(source.read(i)[None], image_size, train=False) for i in range(start, stop)]
            )


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    source: ImageArray | ImageFiles,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """h for every image, computed by the encoder in eval mode; returns (N, D) float32 on CPU.

    The encoder's training flag is restored afterwards; its weights and BatchNorm buffers are
    not modified (eval mode uses the running statistics without updating them).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [
            encoder.forward_features(x.to(device)).float().cpu()
            for x in _eval_batches(source, image_size, batch_size)
        ]
        return torch.cat(chunks)
    finally:
        encoder.train(was_training)


@torch.no_grad()
def recalibrate_batchnorm(
    encoder: torch.nn.Module,
    source: ImageArray | ImageFiles,
    *,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> None:
    """Sets every BatchNorm's running statistics to the exact averages over ``source``.

    Used for the random-initialisation baseline only: a fresh network's running statistics are
    the placeholders (0, 1), which would handicap it for reasons unrelated to its weights.
    """
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: the exact mean over all batches
    encoder.train()
    for x in _eval_batches(source, image_size, batch_size):
        encoder.forward_features(x.to(device))
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    encoder.eval()


def logistic_regression_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Multinomial logistic regression on standardised features; C chosen on held-out data.

    Returns:
        top1, top5 (fractions) on the test set, and the chosen C.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    def fit(features, labels, c):
        model = LogisticRegression(C=c, max_iter=2000, tol=1e-4)
        return model.fit(features, labels)

    scaler = StandardScaler().fit(train_features)
    train_x, test_x = scaler.transform(train_features), scaler.transform(test_features)
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_labels, test_size=0.2, random_state=seed, stratify=train_labels
    )
    scores = {c: fit(fit_x, fit_y, c).score(val_x, val_y) for c in _C_GRID}
    best_c = max(scores, key=lambda c: (scores[c], -c))
    model = fit(train_x, train_labels, best_c)
    probabilities = model.predict_proba(test_x)
    ranked = model.classes_[np.argsort(-probabilities, axis=1)]
    top1 = float(np.mean(ranked[:, 0] == test_labels))
    top5 = float(np.mean((ranked[:, :5] == test_labels[:, None]).any(axis=1)))
    return {"top1": top1, "top5": top5, "C": best_c}


def linear_probe_report(
    encoder: torch.nn.Module,
    make_random_encoder: Callable[[], torch.nn.Module] | None,
    config: Any,
    *,
    image_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, float]:
    """Linear-probe accuracy of ``encoder`` and, for context, of a randomly initialised twin.

    Args:
        encoder: the pretrained encoder (frozen here).
        make_random_encoder: builds the same architecture at random initialisation, or None.
            Its BatchNorm statistics are measured on the training split first
            (:func:`recalibrate_batchnorm`).
        config: the run's config (dataset and eval batch size are read).
        image_size: the side the encoder was trained at.

    Returns:
        ``linear_top1``, ``linear_top5`` and, with a twin, ``random_init_linear_top1/5``;
        empty when the dataset has no labelled train and test splits.
    """
    started = time.perf_counter()
    try:
        train = load_dataset(config.data.dataset, config.data.root, "train", quiet=True)
        test = load_dataset(config.data.dataset, config.data.root, "test", quiet=True)
    except ConfigError as error:
        if not quiet:
            print(f"simclrkit: no linear evaluation: {error}", file=sys.stderr)
        return {}
    if train.labels is None or test.labels is None:
        return {}
    args = dict(image_size=image_size, batch_size=config.eval.batch_size, device=device)

    def probe(model: torch.nn.Module) -> dict[str, float]:
        train_h = extract_features(model, train, **args).numpy()
        test_h = extract_features(model, test, **args).numpy()
        return logistic_regression_probe(
            train_h, train.labels.numpy(), test_h, test.labels.numpy(), seed=seed
        )

    result = probe(encoder)
    report = {"linear_top1": result["top1"], "linear_top5": result["top5"], "linear_C": result["C"]}
    if make_random_encoder is not None and config.eval.random_init_baseline:
        baseline_encoder = make_random_encoder().to(device)
        recalibrate_batchnorm(baseline_encoder, train, **args)
        baseline = probe(baseline_encoder)
        report["random_init_linear_top1"] = baseline["top1"]
        report["random_init_linear_top5"] = baseline["top5"]
    report["eval_seconds"] = time.perf_counter() - started
    if not quiet:
        print(f"simclrkit: linear evaluation done in {report['eval_seconds']:.1f}s", file=sys.stderr)
    return report
