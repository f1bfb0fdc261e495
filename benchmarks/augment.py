"""Throughput of the SimCLR view transform: simclrkit (batched and per-sample) vs lightly.

Counts source images per second, two views each, at 224 px (blur on, colour strength 1.0,
from 256 x 256 uint8 sources) and at 32 px (CIFAR recipe: strength 0.5, no blur). All
contenders run in one process on the same images; each figure is the median of ``--repeats``
timed runs after one warm-up. Machines here are shared and noisy: read the ratios, not the
absolute figures (BENCHMARKS.md).

Contenders:
* simclrkit batched: ``SimCLRAugment.views`` on a (B, 3, H, W) uint8 CPU tensor; and the same
  writing into two reused output tensors (``apply(..., out=)``, as a training loop can).
* simclrkit per-sample: ``SimCLRAugment.__call__`` image by image (the DataLoader-worker path).
* lightly: ``lightly.transforms.SimCLRTransform`` on PIL images, if ``import lightly`` works
  (it is not installed by this script).
* torchvision/PIL proxy: torchvision transforms on PIL images with lightly's SimCLR recipe
  (PIL Gaussian blur, as lightly does), a stand-in when lightly is missing.

Every contender normalises with the ImageNet mean and std, as lightly's transform does.

Usage:
    python benchmarks/augment.py [--threads 1] [--batch-size 64] [--repeats 5]
        [--out benchmarks/results/augment.json]
"""

from __future__ import annotations

import os

# Every contender runs with the allocator setting the simclrkit command picks for itself
# (cli.entry): 2 MB pages for large CPU tensors. Read by PyTorch at its first allocation, so it
# is set before torch is imported; set THP_MEM_ALLOC_ENABLE=0 to measure without it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from simclrkit.augment import cifar_augment, imagenet_augment

IMAGENET_NORMALIZE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def source_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) uint8 crops of scikit-learn's sample photos (or smooth noise)."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images().images
        photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in samples]
    except Exception:  # no scikit-learn or no bundled images: structured noise instead
        coarse = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        photos = list((F.interpolate(coarse, size=(427, 640), mode="bilinear") * 255).byte())
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(200, min(photo.shape[1:]) + 1))
        top = int(rng.integers(photo.shape[1] - side + 1))
        left = int(rng.integers(photo.shape[2] - side + 1))
        crop = photo[:, top : top + side, left : left + side].float().unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        crops.append(crop.round().clamp(0, 255).to(torch.uint8)[0])
    return torch.stack(crops)


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: kernels, caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _PilGaussianBlur:
    """lightly's GaussianBlur: PIL's filter with sigma ~ U(0.1, 2.0), probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return image


def proxy_transform(size: int, strength: float, blur_prob: float):
    """torchvision transforms following lightly's SimCLRTransform recipe, on PIL images."""
    from torchvision import transforms as T

    jitter = T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([jitter], p=0.8),
            T.RandomGrayscale(p=0.2),
            _PilGaussianBlur(blur_prob),
            T.ToTensor(),
            T.Normalize(*IMAGENET_NORMALIZE),
        ]
    )


def lightly_transform(size: int, strength: float, blur_prob: float):
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=size, cj_strength=strength, gaussian_blur=blur_prob)


def bench_size(size: int, source_size: int, batch: int, repeats: int) -> dict:
    images = source_images(batch, source_size)
    indices = torch.arange(batch)
    if size > 32:
        aug = imagenet_augment(size, normalize=IMAGENET_NORMALIZE)
    else:
        aug = cifar_augment(size, normalize=IMAGENET_NORMALIZE)
    strength, blur_prob = aug.color_jitter_strength, aug.blur_prob
    epoch = iter(range(10**9))  # a new epoch each run: fresh parameters, as in training
    results = {}
    seconds = median_seconds(lambda: aug.views(images, 0, next(epoch), indices), repeats)
    results["simclrkit batched"] = batch / seconds
    buffers = [torch.empty(batch, 3, size, size) for _ in range(2)]

    def into_buffers() -> None:
        e = next(epoch)
        for view, buffer in enumerate(buffers):
            params = aug.sample_params(0, e, indices, view, source_size, source_size)
            aug.apply(images, params, out=buffer)

    results["simclrkit batched, reused out="] = batch / median_seconds(into_buffers, repeats)

    def per_sample() -> None:
        e = next(epoch)
        for i in range(batch):
            aug(images[i], 0, e, i)

    results["simclrkit per-sample"] = batch / median_seconds(per_sample, repeats)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    notes = []
    contenders = {"torchvision/PIL proxy": proxy_transform(size, strength, blur_prob)}
    try:
        contenders["lightly"] = lightly_transform(size, strength, blur_prob)
    except ImportError:
        notes.append("lightly not installed: skipped; ratios are against the torchvision/PIL proxy")
    for name, transform in contenders.items():
        if name == "torchvision/PIL proxy":
            two_views = lambda image, t=transform: (t(image), t(image))  # noqa: E731
        else:
            two_views = transform  # SimCLRTransform returns both views
        results[name] = batch / median_seconds(lambda: [two_views(p) for p in pil_images], repeats)
    baseline = "lightly" if "lightly" in results else "torchvision/PIL proxy"
    return {
        "output_size": size,
        "source_size": source_size,
        "batch_size": batch,
        "blur_prob": blur_prob,
        "color_jitter_strength": strength,
        "images_per_second": results,
        "baseline": baseline,
        "ratio_vs_baseline": {k: v / results[baseline] for k, v in results.items()},
        "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/augment.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    runs = [
        bench_size(224, 256, args.batch_size, args.repeats),
        bench_size(32, 32, args.batch_size, args.repeats),
    ]
    try:
        import lightly

        lightly_version = lightly.__version__
    except ImportError:
        lightly_version = None
    report = {
        "benchmark": "augment",
        "unit": "source images per second, two views each (median)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "lightly": lightly_version,
        "repeats": args.repeats,
        "runs": runs,
    }
    print(f"threads={report['threads']}  torch {report['torch']}  lightly {lightly_version}")
    for run in runs:
        print(f"\n{run['output_size']} px from {run['source_size']} px, batch {run['batch_size']}, "
              f"blur p={run['blur_prob']}, strength {run['color_jitter_strength']}")
        print(f"| contender | images/s (2 views) | vs {run['baseline']} |")
        print("| --- | ---: | ---: |")
        for name, value in run["images_per_second"].items():
            print(f"| {name} | {value:.1f} | {run['ratio_vs_baseline'][name]:.2f}x |")
        for note in run["notes"]:
            print(f"note: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
