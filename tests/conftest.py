"""Shared test helpers: a tiny, fast run configuration and checkpoint comparison."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simclrkit.checkpoint import FORMAT_VERSION, atomic_save
from simclrkit.classifier import from_model
from simclrkit.models import build_model

# A run that takes seconds on a 2-core CPU: MNIST-5k at 16 px, an eighth-width ResNet-18.
TINY = [
    "model.width=0.125",
    "data.image_size=16",
    "train.batch_size=32",
    "train.max_steps=8",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "optim.warmup_epochs=0.02",
    "eval.linear=false",
    "eval.run_page=false",  # drawn by tests/test_runpage.py
]


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    """Starts ``python -m simclrkit ARGS`` as a real process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "simclrkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Blocks until metrics.jsonl records ``step`` (or the process ends)."""
    import json

    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.communicate()}")
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", -1) >= step and "loss" in record:
                    return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def assert_states_equal(a: dict, b: dict, path: str = "") -> None:
    """Recursively torch.equal on tensors, == on everything else."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ"
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: tensors differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


def smooth_images(batch: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """(B, C, size, size) uint8 images with structure at several scales."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 6, 6, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    image = image + 0.15 * torch.rand(batch, channels, size, size, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def write_jpeg_tree(
    root: Path, *, classes: int = 2, per_class: int = 12, test_per_class: int = 0,
    size: tuple[int, int] = (64, 48), seed: int = 0,
) -> list[Path]:
    """An imagefolder of real JPEGs (ROOT/train/<class>/..., ROOT/test/... when asked) with
    smooth content and sizes around ``size``; returns the training files, sorted."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    written = []
    splits = [("train", per_class)] + ([("test", test_per_class)] if test_per_class else [])
    for split, count in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width = size[0] + 4 * (i % 3)
                height = size[1] + 4 * (i % 2)
                coarse = torch.rand(3, 4, 5, generator=generator) * 0.6 + 0.4 * (c / classes)
                image = F.interpolate(coarse[None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0]
                pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
                path = folder / f"{i:03d}.jpg"
                Image.fromarray(pixels.numpy()).save(path, quality=90)
                if split == "train":
                    written.append(path)
    return sorted(written)


def teacher_arch(image_size: int = 16) -> dict:
    return {"encoder": "resnet18", "width": 0.125, "in_channels": 1, "cifar_stem": True,
            "image_size": image_size, "head": "nonlinear", "head_layers": 3, "proj_dim": 16,
            "sk_ratio": 0.0, "se_ratio": 0.0}  # fmt: skip


def write_teacher(path, image_size: int = 16, seed: int = 5):
    """A classifier file as fine-tuning writes one (reading head layer 1, as SimCLRv2's),
    with logits large enough that its soft labels are far from uniform."""
    torch.manual_seed(seed)
    arch = teacher_arch(image_size)
    model = build_model(arch).eval()
    network = from_model(model, 1, None, num_classes=10)
    torch.nn.init.normal_(network.classifier.weight, std=2.0)
    atomic_save({"format_version": FORMAT_VERSION, "architecture": arch,
                 **network.state_parts(model.head)}, path)  # fmt: skip
    return path
