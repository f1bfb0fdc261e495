"""Accuracy per CPU-minute on Fashion-MNIST: simclrkit vs lightly's recipe at equal wall-clock.

Both methods pretrain the SAME encoder (the ``fashion_mnist_cpu`` recipe's: ResNet-18, width 0.75,
CIFAR stem, 28 px; ``--override model.width=...`` changes it for every method) on the 60,000
Fashion-MNIST training images (labels unused) for the same wall-clock budget, then a linear
classifier (multinomial logistic regression on frozen, standardised h, its regularisation
chosen on a held-out fifth of the labelled set) is scored. Context rows: the same encoder at
random initialisation (BatchNorm statistics measured on the data) and raw pixels.

Each method gets the same treatment: a short calibration run measures its images/s, the
number of steps that fits the budget is derived from it (so each method's learning-rate
schedule ends at the end of its budget), and a timer stops it at the budget regardless.

``--split val`` scores on 10,000 held-out TRAINING images (the linear classifier then learns
from the other 50,000): use it to tune. ``--split test`` scores on the official test set:
use it once, to report.

Usage::

    python benchmarks/accuracy.py --budget-minutes 30 --split test
    python benchmarks/accuracy.py --budget-minutes 5 --split val --variants simclrkit \
        --override loss.temperature=0.2          # tuning

Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist`` or ``--root DIR`` with the four
IDX files) and, for the peer, ``pip install lightly``.
"""

from __future__ import annotations

import os

# Every contender runs with the allocator setting the simclrkit command picks for itself
# (cli.entry): 2 MB pages for large CPU tensors. Read by PyTorch at its first allocation, so it
# is set before torch is imported; set THP_MEM_ALLOC_ENABLE=0 to measure without it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from step import describe_machine  # noqa: E402 - every benchmark describes the machine alike

RECIPE = "fashion_mnist_cpu"
# Each method's step count for the budget comes from its rate over the LAST steps of a throwaway
# calibration run: on some hosts the first ten or so steps run at half speed (a median over
# steps 3-11 of a 12-step run once planned half the budget on an AVX2 host).
CALIBRATION_STEPS, CALIBRATION_TAIL = 24, 8


def _encoder_spec(overrides: list[str]) -> tuple[str, float, int]:
    """(encoder, width, image size) of the recipe with the overrides: every method uses it."""
    from simclrkit.config import load_config

    config = load_config(RECIPE, overrides)
    return config.model.encoder, config.model.width, config.data.image_size or 28


def _labelled_splits(root: str | None, split: str):
    """(train images, train labels, eval images, eval labels) as uint8 (N,1,28,28) / int64."""
    from simclrkit.data import load_dataset

    train = load_dataset("fashion-mnist", root, "train")
    if split == "test":
        test = load_dataset("fashion-mnist", root, "test")
        return train.images, train.labels, test.images, test.labels
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    held, kept = order[:10_000], order[10_000:]
    return train.images[kept], train.labels[kept], train.images[held], train.labels[held]


def _linear_probe(encoder, split_data, image_size: int) -> dict[str, float]:
    from simclrkit.data import ImageArray
    from simclrkit.evaluate import extract_features, logistic_regression_probe

    train_x, train_y, eval_x, eval_y = split_data
    args = dict(image_size=image_size, batch_size=1024)
    train_h = extract_features(encoder, ImageArray(train_x, train_y), **args).numpy()
    eval_h = extract_features(encoder, ImageArray(eval_x, eval_y), **args).numpy()
    result = logistic_regression_probe(train_h, train_y.numpy(), eval_h, eval_y.numpy())
    return {k: v for k, v in result.items() if isinstance(v, (int, float, bool))}


# ---------------------------------------------------------------------------------------------
# simclrkit
# ---------------------------------------------------------------------------------------------


def _simclrkit_run(run_dir: Path, overrides: list[str], steps: int, budget_s: float | None) -> float:
    """Runs `simclrkit pretrain` as a real process; SIGTERM at the budget. Returns train seconds."""
    command = [
        sys.executable, "-m", "simclrkit", "pretrain", "--config", RECIPE, "--run-dir", str(run_dir),
        "--quiet", f"train.max_steps={steps}", "eval.linear=false", *overrides,
    ]
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=budget_s * 1.5 + 120 if budget_s else None)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait()
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["train_seconds"]
    return float("nan")


def _simclrkit(args, split_data) -> dict:
    from simclrkit.checkpoint import load_checkpoint
    from simclrkit.config import load_config
    from simclrkit.models import build_model
    from simclrkit.report import read_metrics

    config = load_config(RECIPE, args.override)
    budget_s = args.budget_minutes * 60
    with tempfile.TemporaryDirectory() as scratch:
        calibration = Path(scratch) / "calibration"
        _simclrkit_run(calibration, [*args.override, "train.log_every=1"], CALIBRATION_STEPS, None)
        rows = read_metrics(calibration / "metrics.jsonl")[-CALIBRATION_TAIL:]
        rate = statistics.median(r["images_per_second"] for r in rows)
        steps = max(1, int(budget_s * rate / config.train.batch_size * 0.97))
        run_dir = Path(scratch) / "run"
        started = time.perf_counter()
        train_seconds = _simclrkit_run(run_dir, args.override, steps, budget_s)
        wall = time.perf_counter() - started
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        model = build_model(state["architecture"])
        model.encoder.load_state_dict(state["encoder"])
        probe = _linear_probe(model.encoder, split_data, state["architecture"]["image_size"])
    epochs = state["step"] * config.train.batch_size / 60_000
    return {
        "top1": probe["top1"], "top5": probe["top5"], "steps": state["step"], "epochs": epochs,
        "train_seconds": train_seconds, "process_seconds": wall, "calibrated_images_per_second": rate,
        "overrides": args.override,
    }


# ---------------------------------------------------------------------------------------------
# lightly's recipe on the same encoder
# ---------------------------------------------------------------------------------------------


def _lightly(args, split_data) -> dict:
    import torchvision  # noqa: F401 - lightly imports it; fail early with a clear message
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    from simclrkit.data import load_dataset
    from simclrkit.models import build_encoder

    images = load_dataset("fashion-mnist", args.root, "train").images[:, 0].numpy()

    class FashionPIL(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, index: int):
            return self.transform(Image.fromarray(images[index]).convert("RGB")), 0

    batch = 256
    torch.manual_seed(0)
    name, width, size = _encoder_spec(args.override)
    encoder = build_encoder(name, width=width, in_channels=3, image_size=size)
    head = SimCLRProjectionHead(encoder.feature_dim, encoder.feature_dim, 128)
    params = list(encoder.parameters()) + list(head.parameters())
    lr = 0.06 * batch / 128
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    criterion = NTXentLoss(temperature=0.5)
    transform = SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)
    loader = torch.utils.data.DataLoader(
        FashionPIL(transform), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0,
    )

    def train(max_steps: int, budget_s: float, scheduled: bool) -> tuple[int, float, list[float]]:
        step, rates, started = 0, [], time.perf_counter()
        last = started
        while step < max_steps:
            for (x0, x1), _ in loader:
                if scheduled:  # cosine over the budgeted steps, as lightly's benchmarks do
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / max_steps))
                z0, z1 = head(encoder(x0)), head(encoder(x1))
                loss = criterion(z0, z1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                now = time.perf_counter()
                rates.append(batch / (now - last))
                last, step = now, step + 1
                if step >= max_steps or now - started > budget_s:
                    return step, now - started, rates
        return step, time.perf_counter() - started, rates

    # calibration on a throwaway copy of the weights
    snapshot = ([p.detach().clone() for p in params], [b.clone() for b in encoder.buffers()])
    _, _, rates = train(CALIBRATION_STEPS, float("inf"), scheduled=False)
    rate = statistics.median(rates[-CALIBRATION_TAIL:])
    with torch.no_grad():
        for p, saved in zip(params, snapshot[0]):
            p.copy_(saved)
        for b, saved in zip(encoder.buffers(), snapshot[1]):
            b.copy_(saved)
    optimizer.state.clear()
    budget_s = args.budget_minutes * 60
    steps = max(1, int(budget_s * rate / batch * 0.97))
    done, seconds, _ = train(steps, budget_s, scheduled=True)
    probe = _linear_probe(encoder, _as_rgb(split_data), size)
    return {
        "top1": probe["top1"], "top5": probe["top5"], "steps": done, "epochs": done * batch / 60_000,
        "train_seconds": seconds, "calibrated_images_per_second": rate,
        "recipe": "SimCLRTransform(cj_strength=0.5, no blur), SGD 0.06*B/128 momentum 0.9 wd 5e-4, "
        "cosine, NTXentLoss(0.5), batch 256, SimCLRProjectionHead",
    }


def _as_rgb(split_data):
    train_x, train_y, eval_x, eval_y = split_data
    return train_x.expand(-1, 3, -1, -1), train_y, eval_x.expand(-1, 3, -1, -1), eval_y


# ---------------------------------------------------------------------------------------------
# context
# ---------------------------------------------------------------------------------------------


def _random_init(args, split_data) -> dict:
    from simclrkit.data import ImageArray
    from simclrkit.evaluate import recalibrate_batchnorm
    from simclrkit.models import build_encoder

    torch.manual_seed(0)
    name, width, size = _encoder_spec(args.override)
    encoder = build_encoder(name, width=width, in_channels=1, image_size=size)
    recalibrate_batchnorm(encoder, ImageArray(split_data[0], split_data[1]), image_size=size)
    return _linear_probe(encoder, split_data, size)


def _raw_pixels(args, split_data) -> dict:
    from simclrkit.evaluate import logistic_regression_probe

    train_x, train_y, eval_x, eval_y = split_data
    flat = lambda x: x.reshape(len(x), -1).float().numpy() / 255  # noqa: E731
    result = logistic_regression_probe(flat(train_x), train_y.numpy(), flat(eval_x), eval_y.numpy())
    return {k: v for k, v in result.items() if isinstance(v, (int, float, bool))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--variants", default="simclrkit,lightly,random_init,raw_pixels")
    parser.add_argument("--override", action="append", default=[], help="simclrkit KEY=VALUE")
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    args = parser.parse_args()

    split_data = _labelled_splits(args.root, args.split)
    runners = {
        "simclrkit": _simclrkit, "lightly": _lightly, "random_init": _random_init,
        "raw_pixels": _raw_pixels,
    }
    results = {}
    for name in args.variants.split(","):
        started = time.perf_counter()
        results[name] = runners[name](args, split_data)
        results[name]["seconds_total"] = time.perf_counter() - started
        print(f"{name}: top-1 {results[name]['top1']:.4f}", flush=True)
    report = {
        "split": args.split,
        "budget_minutes": args.budget_minutes,
        "encoder": "{} width {}, CIFAR stem, {} px".format(*_encoder_spec(args.override)),
        "results": results,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "machine": describe_machine(),
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"| method | {args.split} top-1 | epochs | train s |\n| --- | --- | --- | --- |")
    for name, result in results.items():
        print(
            f"| {name} | {result['top1']:.4f} | {result.get('epochs', float('nan')):.1f} "
            f"| {result.get('train_seconds', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
