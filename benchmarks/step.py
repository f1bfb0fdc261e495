"""Training-step throughput: simclrkit's full step vs the bare model vs lightly's recipe.

All three run in one invocation, on the same encoder (ResNet-18 with the CIFAR stem, 32 px,
width 1) and the same batch, interleaved over repeats; the figure reported is the median
source images per second of each, and the ratios are taken between them, never against a
figure from another run (a shared 2-core machine drifts by several times between runs).

* ``simclrkit``: the real ``pretrain`` loop on a CIFAR-10-format folder of generated images:
  batch assembly, augmentation, forward over both views, NT-Xent, backward, LARS, schedule,
  logging. Data loading included.
* ``simclrkit_bf16`` / ``bare_channels_last_bf16``: the same with bf16 autocast
  (``train.precision=bf16``), which CPUs with AVX512-BF16 run about twice as fast.
* ``simclrkit_bf16_no_prefetch`` (opt-in): bf16 with ``data.prefetch=false``: the next
  batch is made after the step instead of during it.
* ``simclrkit_compile`` (opt-in, ``--variants ...,simclrkit_compile``): fp32 with
  ``train.compile=true``; needs a C++ compiler, and the warm-up steps absorb the compilation.
* ``bare_channels_last`` / ``bare_nchw``: forward + backward of the same SimCLR model and loss
  on fixed tensors already in memory: the ceiling for any training loop.
* ``lightly``: lightly's documented SimCLR recipe: ``SimCLRTransform`` in DataLoader workers
  over PIL images, torchvision ResNet-18 with the CIFAR stem, ``SimCLRProjectionHead``,
  ``NTXentLoss``, SGD; each view forwarded separately, as its examples do.

Usage::

    python benchmarks/step.py --batch 128 --steps 6 --repeats 3 --out benchmarks/results/step.json

``python benchmarks/step.py --profile bf16 --steps 6`` instead prints a cProfile of simclrkit's
step with ``data.prefetch=false`` (where the time goes: batch, forward, backward, optimiser,
logging).

Appends a markdown table with the machine's description to ``docs/benchmarks.md``
(``--no-docs`` to skip).
"""

from __future__ import annotations

import os

# Every contender runs with the allocator setting the simclrkit command picks for itself
# (cli.entry): 2 MB pages for large CPU tensors. Read by PyTorch at its first allocation, so it
# is set before torch is imported; set THP_MEM_ALLOC_ENABLE=0 to measure without it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import cProfile
import json
import pickle
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _write_cifar(root: Path, count: int) -> None:
    """A CIFAR-10 python-pickle folder of smooth random images (content does not matter)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 256, size=(count, 3, 8, 8), dtype=np.uint8)
    images = coarse.repeat(4, axis=2).repeat(4, axis=3).reshape(count, -1)
    labels = rng.integers(0, 10, size=count).tolist()
    per_file = count // 5
    for i in range(5):
        part = slice(i * per_file, (i + 1) * per_file)
        batch = {b"data": images[part], b"labels": labels[part]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": images[:100], b"labels": labels[:100]}))


def _run_simclrkit(
    root: Path, batch: int, steps: int, warmup: int, precision: str, compile: bool = False,
    prefetch: bool = True, profile: bool = False,
) -> float:
    from simclrkit.config import load_config
    from simclrkit.report import read_metrics
    from simclrkit.train import pretrain

    config = load_config(
        None,
        [
            "data.dataset=cifar10", f"data.root={root}", "model.encoder=resnet18",
            "model.width=1.0", "augment.color_jitter_strength=0.5", f"train.batch_size={batch}",
            f"train.max_steps={warmup + steps}", "train.log_every=1", "train.checkpoint_every=100000",
            "optim.lr=0.075", "optim.lr_scaling=sqrt", "optim.warmup_epochs=0", "eval.linear=false",
            "loss.temperature=0.5", f"train.precision={precision}",
            f"train.compile={str(compile).lower()}", f"data.prefetch={str(prefetch).lower()}",
        ],
    )
    with tempfile.TemporaryDirectory() as run_dir:
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(pretrain, config, run_dir, quiet=True)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        else:
            pretrain(config, run_dir, quiet=True)
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return statistics.median(r["images_per_second"] for r in records[warmup:])


def _run_bare(batch: int, steps: int, warmup: int, channels_last: bool, bf16: bool = False) -> float:
    import torch

    from simclrkit.losses import nt_xent
    from simclrkit.models import ProjectionHead, SimCLR, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=1.0, in_channels=3, image_size=32)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim, num_layers=2))
    views = torch.rand(2 * batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        views = views.contiguous(memory_format=torch.channels_last)
    rates = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, z = model(views)
        loss = nt_xent(z[:batch].float(), z[batch:].float(), 0.5)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if step >= warmup:
            rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def _run_lightly(root: Path, batch: int, steps: int, warmup: int, workers: int) -> float:
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    class CifarPIL(torch.utils.data.Dataset):
        def __init__(self, folder: Path, transform):
            batches = [
                pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)
            ]
            self.images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            self.images = self.images.transpose(0, 2, 3, 1)
            self.transform = transform

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, index: int):
            return self.transform(Image.fromarray(self.images[index])), 0

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    resnet.maxpool = torch.nn.Identity()
    backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
    head = SimCLRProjectionHead(512, 512, 128)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06 * batch / 128, momentum=0.9, weight_decay=5e-4)
    criterion = NTXentLoss(temperature=0.5)
    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    loader = torch.utils.data.DataLoader(
        CifarPIL(root / "cifar-10-batches-py", transform), batch_size=batch, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
    )
    rates, step = [], 0
    start = time.perf_counter()
    while step < warmup + steps:
        for (x0, x1), _ in loader:
            z0 = head(backbone(x0).flatten(start_dim=1))
            z1 = head(backbone(x1).flatten(start_dim=1))
            loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            if step >= warmup:
                rates.append(batch / (now - start))
            start = now
            step += 1
            if step >= warmup + steps:
                break
    return statistics.median(rates)


def _child(args: argparse.Namespace) -> None:
    """Runs one variant in this (fresh) process and prints its images/s as JSON."""
    root = Path(args.data)
    if args.variant == "simclrkit":
        rate = _run_simclrkit(root, args.batch, args.steps, args.warmup, "fp32")
    elif args.variant == "simclrkit_compile":  # the warm-up steps absorb the compilation
        rate = _run_simclrkit(root, args.batch, args.steps, args.warmup, "fp32", compile=True)
    elif args.variant == "simclrkit_bf16":
        rate = _run_simclrkit(root, args.batch, args.steps, args.warmup, "bf16")
    elif args.variant == "simclrkit_bf16_no_prefetch":
        rate = _run_simclrkit(root, args.batch, args.steps, args.warmup, "bf16", prefetch=False)
    elif args.variant == "bare_channels_last":
        rate = _run_bare(args.batch, args.steps, args.warmup, channels_last=True)
    elif args.variant == "bare_channels_last_bf16":
        rate = _run_bare(args.batch, args.steps, args.warmup, channels_last=True, bf16=True)
    elif args.variant == "bare_nchw":
        rate = _run_bare(args.batch, args.steps, args.warmup, channels_last=False)
    else:
        rate = _run_lightly(root, args.batch, args.steps, args.warmup, args.workers)
    print(json.dumps({"images_per_second": rate}))


def write_results(report: dict, table: str, out: str, docs: bool) -> None:
    """The JSON to ``out``, the table to stdout and, with ``docs``, to docs/benchmarks.md."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(table)
    if docs:
        with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as handle:
            handle.write(table + "\n")


def describe_machine() -> str:
    """One line naming the CPU (with its vector ISA), cores, torch, threads and page setting."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    # The same CPU model name covers hosts with and without AVX512 and bf16 instructions, which
    # change the CPU figures by twice or more (bf16 autocast is only on where they exist).
    isa = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if flags & {"avx512_bf16", "amx_bf16"}:
        isa += " with bf16"
    threads = torch.get_num_threads()
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return (
        f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, "
        f"THP_MEM_ALLOC_ENABLE={thp}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument(
        "--variants",
        default="simclrkit,bare_channels_last,bare_nchw,lightly,simclrkit_bf16,bare_channels_last_bf16",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step.json"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--profile", choices=("fp32", "bf16"),
        help="run simclrkit's step once in this precision under cProfile (warm-up and measured "
        "steps) and print where the time goes, instead of the comparison",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args)
        return
    if args.profile:
        with tempfile.TemporaryDirectory() as data:
            _write_cifar(Path(data), args.images)
            # Without the prefetch thread: cProfile sees only this thread, and the batch's
            # cost must show up in it.
            _run_simclrkit(
                Path(data), args.batch, args.steps, args.warmup, args.profile, prefetch=False,
                profile=True,
            )
        return

    variants = args.variants.split(",")
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as data:
        _write_cifar(Path(data), args.images)
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved, so drift hits every variant alike
                command = [
                    sys.executable, __file__, "--variant", variant, "--data", data,
                    "--batch", str(args.batch), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--workers", str(args.workers),
                ]
                output = subprocess.run(command, capture_output=True, text=True, check=False)
                if output.returncode != 0:
                    print(f"{variant} failed:\n{output.stderr[-2000:]}", file=sys.stderr)
                    continue
                rate = json.loads(output.stdout.strip().splitlines()[-1])["images_per_second"]
                results[variant].append(rate)
                print(f"repeat {repeat + 1}: {variant:20s} {rate:7.1f} images/s", flush=True)

    medians = {v: statistics.median(r) for v, r in results.items() if r}
    ratios = {}
    pairs = [
        ("simclrkit", "lightly"), ("simclrkit", "bare_channels_last"), ("simclrkit", "bare_nchw"),
        ("simclrkit_bf16", "lightly"), ("simclrkit_bf16", "bare_channels_last_bf16"),
        ("simclrkit_bf16", "simclrkit_bf16_no_prefetch"),
        ("simclrkit_compile", "lightly"), ("simclrkit_compile", "bare_channels_last"),
    ]
    for mine, other in pairs:
        if mine in medians and other in medians:
            ratios[f"{mine}/{other}"] = medians[mine] / medians[other]
    report = {
        "machine": describe_machine(),
        "batch": args.batch,
        "encoder": "resnet18 CIFAR stem, 32 px, width 1, two views",
        "images_per_second": medians,
        "all_runs": results,
        "ratios": ratios,
        "command": "python benchmarks/step.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    table = [
        f"### Training step, {report['encoder']}, batch {args.batch}",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`",
        "",
        "| variant | images/s (median) |",
        "| --- | --- |",
        *[f"| {v} | {r:.1f} |" for v, r in medians.items()],
        "",
        *[f"- {name}: {value:.2f}x" for name, value in ratios.items()],
        "",
    ]
    print("\n".join(table))
    if not args.no_docs:
        docs = ROOT / "docs" / "benchmarks.md"
        docs.parent.mkdir(exist_ok=True)
        with open(docs, "a") as handle:
            handle.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
