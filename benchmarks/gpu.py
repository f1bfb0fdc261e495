"""The prepared GPU benchmark: ResNet-50 at 224 px in bf16, from the ceiling to JPEG files.

One script for the rare GPU lease, under 8 minutes on one H100/H200, measuring side by side on
the same device (steady-state windows of each run's own metrics, the first window dropped):

* ``bare``: the ceiling. The same model, NT-Xent and LARS step on synthetic views already on
  the device, channels_last, bf16 autocast; no data at all.
* ``memory``: ``simclrkit pretrain`` on images held in memory (STL-10 binaries written here,
  96 px uint8 upscaled by the crops to 224): the step's uint8 images cross in pinned memory
  and the device renders both views (``data.augment_on=device``, the default on a GPU).
* ``folder``: a folder of ImageNet-size JPEGs (~500x375, hard-linked under many names), loader
  workers read, decode and crop to uint8, the device applies the colour half.
* ``folder_host``: the same with ``data.augment_on=host`` (every view finished on the CPU and
  crossing as float32): what the split pipeline saves.
* ``shards``: the same JPEGs packed into tar shards (``simclrkit pack``).
* ``folder_gpu_decode``, ``shards_gpu_decode``: the same with ``data.decode_on=device``: the
  workers only read, the GPU decodes the step's JPEGs (nvJPEG) and crops them.
* ``nccl_parity`` (two GPUs or more): ``torchrun --nproc_per_node=2`` against one process on
  the same global batch, 4 steps, relative difference of the weights.

For each: source images/s, wall per step, the data-wait share of the step, model TFLOP/s and
MFU (``throughput.py``), and the ratio to ``bare``. Goals (BENCHMARKS.md): >= 90% of bare,
>= 1,500 source images/s from JPEGs, data wait < 5% of the step.

    python benchmarks/gpu.py                 # on a GPU machine: JSON + a table in docs/
    python benchmarks/gpu.py --dry-run       # every path on the CPU, tiny sizes (CI runs it)

It needs only what the GPU machine has (torch, torchvision, numpy, Pillow, numba, PyYAML,
tqdm, tensorboard, scikit-learn, safetensors): ``src`` is put on the path, nothing installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from data import make_folder  # noqa: E402
from step import describe_machine, write_results  # noqa: E402

FULL = {"encoder": "resnet50", "width": 1.0, "image_size": 224, "batch": 256, "steps": 60,
        "log_every": 10, "files": 4096, "memory_images": 8192, "precision": "bf16"}  # fmt: skip
DRY = {"encoder": "resnet18", "width": 0.125, "image_size": 32, "batch": 16, "steps": 4,
       "log_every": 1, "files": 64, "memory_images": 64, "precision": "fp32"}  # fmt: skip


def _environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _write_stl10(root: Path, count: int) -> Path:
    """``count`` smooth random 96 px images in STL-10's binary layout (train + unlabeled)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    folder = root / "stl10_binary"
    if (folder / "unlabeled_X.bin").exists():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    chunks = []
    for start in range(0, count, 1024):
        n = min(1024, count - start)
        coarse = torch.rand(n, 3, 8, 8, generator=generator)
        image = F.interpolate(coarse, size=(96, 96), mode="bilinear", align_corners=False)
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        chunks.append(pixels.transpose(2, 3).contiguous().numpy())  # column-major, as STL-10
    data = np.concatenate(chunks)
    half = max(1, count // 8)
    data[:half].tofile(folder / "train_X.bin")
    np.ones(half, dtype=np.uint8).tofile(folder / "train_y.bin")  # STL-10 labels are 1..10
    data[half:].tofile(folder / "unlabeled_X.bin")
    return root


def _bare(sizes: dict, device_name: str) -> dict:
    """Steps per second of the model alone on synthetic views already on the device."""
    import torch

    from simclrkit.losses import NTXentLoss
    from simclrkit.models import build_model
    from simclrkit.optim import build_optimizer, parameter_groups
    from simclrkit.step import _autocast_factory, contrastive_backward
    from simclrkit.throughput import peak_flops, training_flops_per_image

    device = torch.device(device_name)
    arch = {"encoder": sizes["encoder"], "width": sizes["width"], "in_channels": 3,
            "cifar_stem": sizes["image_size"] <= 32, "image_size": sizes["image_size"],
            "head": "nonlinear", "head_layers": 2, "proj_dim": 128}  # fmt: skip
    torch.manual_seed(0)
    model = build_model(arch).to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer("lars", parameter_groups(model, weight_decay=1e-6), lr=0.3,
                                momentum=0.9, weight_decay=1e-6, trust_coefficient=1e-3)  # fmt: skip
    loss_fn = NTXentLoss(temperature=0.1)
    size, batch = sizes["image_size"], sizes["batch"]
    views = torch.rand(2 * batch, 3, size, size, device=device)
    views = views.contiguous(memory_format=torch.channels_last)
    autocast = _autocast_factory(device, sizes["precision"])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        contrastive_backward(model, views, loss_fn, autocast=autocast)
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(sizes["steps"] // 3 or 1):
            step()
        sync()
        times.append((time.perf_counter() - started) / (sizes["steps"] // 3 or 1))
    seconds = statistics.median(times)
    flops = training_flops_per_image(arch)
    result = {"images_per_second": batch / seconds, "step_ms": 1000 * seconds,
              "data_wait_share": 0.0, "model_tflops": flops * batch / seconds / 1e12}  # fmt: skip
    peak = peak_flops(device, sizes["precision"])
    if peak:
        result["mfu"] = flops * batch / seconds / peak
    return result


def _pretrain(run_dir: Path, sizes: dict, data: list[str], extra: list[str], device: str) -> dict:
    """A real ``simclrkit pretrain`` run; its steady-state windows from metrics.jsonl."""
    command = [
        sys.executable, "-m", "simclrkit", "pretrain", "--run-dir", str(run_dir), "--quiet",
        *data, f"data.image_size={sizes['image_size']}", f"model.encoder={sizes['encoder']}",
        f"model.width={sizes['width']}", f"train.batch_size={sizes['batch']}",
        f"train.max_steps={sizes['steps']}", f"train.log_every={sizes['log_every']}",
        f"train.precision={sizes['precision']}", f"train.device={device}",
        "train.checkpoint_every=100000", "eval.linear=false", "eval.monitor_every=0",
        "optim.warmup_epochs=0", *extra,
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, env=_environment())
    if process.returncode != 0:
        raise RuntimeError(f"pretrain failed ({' '.join(command)}):\n{process.stderr[-3000:]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [line for line in lines if "loss" in line][1:] or [lines[-1]]  # drop warm-up
    result = {
        key: statistics.median(w[key] for w in windows)
        for key in ("images_per_second", "step_ms", "data_wait_share", "feed_ms",
                    "h2d_mb_per_step", "model_tflops", "mfu")
        if all(key in w for w in windows)
    }  # fmt: skip
    result["windows"] = len(windows)
    return result


def _nccl_parity(work: Path, sizes: dict) -> dict:
    """Two processes (one GPU each) against one on the same global batch: weights after 4."""
    import torch

    common = ["data.dataset=mnist5k", "model.width=0.25", "train.batch_size=64",
              "train.max_steps=4", "train.checkpoint_every=4", "eval.linear=false",
              "train.precision=fp32"]  # fmt: skip
    runs = {"one": [sys.executable, "-m", "simclrkit", "pretrain"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "simclrkit", "pretrain"]}  # fmt: skip
    states = {}
    for name, prefix in runs.items():
        run_dir = work / f"parity-{name}"
        subprocess.run([*prefix, "--run-dir", str(run_dir), "--quiet", *common], check=True,
                       env=_environment(), capture_output=True)  # fmt: skip
        states[name] = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    worst = 0.0
    for key, value in states["one"]["encoder"].items():
        if value.is_floating_point():
            other = states["two"]["encoder"][key]
            worst = max(worst, ((value - other).abs().max() / value.abs().max().clamp(min=1e-12)).item())
    return {"relative_difference": worst, "bound": 1e-4, "passed": worst < 1e-4}


def _device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}")  # fmt: skip
    return "CPU (dry run)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every path on the CPU at tiny sizes, to keep the script working")
    parser.add_argument("--variants", default="bare,memory,folder,folder_host,shards,"
                        "folder_gpu_decode,shards_gpu_decode,nccl_parity")
    parser.add_argument("--steps", type=int, help="steps per run (default: 60, dry run 4)")
    parser.add_argument("--batch", type=int, help="global batch (default: 256, dry run 16)")
    parser.add_argument("--work", help="where the generated data lives (kept between runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    import torch

    sizes = dict(DRY if args.dry_run else FULL)
    sizes.update({k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v})
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device; use --dry-run to check the script on the CPU")
    variants = args.variants.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simclrkit-gpu-"))
    started = time.perf_counter()
    report: dict = {
        "machine": describe_machine(), "device": _device_description(device),
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "sizes": sizes,
        "results": {},
    }  # fmt: skip
    folder = make_folder(work / "jpegs", sizes["files"])
    # augment_on named, so that the dry run takes the device paths on the CPU too
    split, host = ["data.augment_on=device"], ["data.augment_on=host"]
    stl10 = _write_stl10(work / "stl10", sizes["memory_images"])
    data = {
        "memory": ["data.dataset=stl10", f"data.root={stl10}", *split],
        "folder": ["data.dataset=folder", f"data.root={folder}", *split],
        "folder_host": ["data.dataset=folder", f"data.root={folder}", *host],
        "folder_gpu_decode": ["data.dataset=folder", f"data.root={folder}", *split,
                              "data.decode_on=device"],
    }
    if any(name.startswith("shards") for name in variants):
        from simclrkit.pack import pack

        shards = work / "shards"
        if not (shards / "train.index.npz").exists():
            pack("folder", folder, shards, quiet=True)
        data["shards"] = ["data.dataset=shards", f"data.root={shards}", *split]
        data["shards_gpu_decode"] = [*data["shards"], "data.decode_on=device"]
    for name in variants:
        at = time.perf_counter()
        if name == "bare":
            result = _bare(sizes, device)
        elif name == "nccl_parity":
            if device != "cuda" or torch.cuda.device_count() < 2:
                report["results"][name] = {"skipped": "needs two GPUs"}
                continue
            result = _nccl_parity(work, sizes)
        else:
            result = _pretrain(work / f"run-{name}-{time.time_ns()}", sizes, data[name], [], device)
        result["seconds"] = time.perf_counter() - at
        report["results"][name] = result
        print(f"{name:12s} {json.dumps(result)}", flush=True)
    bare = report["results"].get("bare", {}).get("images_per_second")
    if bare:
        for result in report["results"].values():
            if "images_per_second" in result:
                result["of_bare"] = result["images_per_second"] / bare
    report["total_seconds"] = time.perf_counter() - started
    write_results(report, _table(report), args.out, docs=not args.no_docs)


def _table(report: dict) -> str:
    sizes = report["sizes"]
    lines = [
        "", f"### GPU step: {sizes['encoder']} x{sizes['width']} at {sizes['image_size']} px, "
        f"batch {sizes['batch']}, {sizes['precision']}", "",
        f"Device: {report['device']}. Host: {report['machine']}. Command: `{report['command']}`",
        "", "| path | source images/s | of bare | step ms | data wait | model TFLOP/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, r in report["results"].items():
        if "images_per_second" not in r:
            continue
        lines.append(
            f"| {name} | {r['images_per_second']:.0f} | {r.get('of_bare', float('nan')):.2f} | "
            f"{r['step_ms']:.1f} | {r.get('data_wait_share', 0):.1%} | "
            f"{r.get('model_tflops', float('nan')):.2f} | "
            + (f"{r['mfu']:.1%}" if "mfu" in r else "-") + " |"
        )
    parity = report["results"].get("nccl_parity")
    if parity:
        lines += ["", f"NCCL 2-vs-1 process parity: {json.dumps(parity)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
