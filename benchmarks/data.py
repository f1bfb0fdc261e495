"""The file data path: start-up against the number of files, and images/s per core.

Measures, each in fresh subprocesses, interleaved over repeats, medians reported:

* ``startup``: time from launching ``simclrkit pretrain`` on a folder of N ImageNet-like JPEGs
  (a few dozen real ~500x375 JPEGs of ~60 KB, hard-linked under N names: the listing and
  decode cost of a real folder on a few MB of disk) to its first optimiser step, and the peak
  resident memory of the process tree by then, for N = 1k, 10k, 100k. ``--before-src DIR``
  runs the same command on another checkout's ``src`` too (e.g. a worktree of the commit
  before the index: ``git worktree add /tmp/before 4c5a0e7``), which decoded every file first.
* ``pipeline``: images/s on ONE core (one process, one thread) of the whole file pipeline, read +
  decode + two 224 px views with blur, for a JPEG folder and for shards holding the same JPEGs,
  next to lightly's documented pipeline (torchvision ImageFolder + its SimCLRTransform in a
  DataLoader) and to simclrkit without reduced-size decoding; and the host's half of the
  accelerator pipeline (``data.augment_on=device``: read, decode, crop and resize both views to
  uint8, the colour half left to the device), whose ratio to the whole says how much CPU work
  per image the split removes; and the host's share with ``data.decode_on=device`` (read the
  file, check its header, draw the crops: the device decodes).
* ``photos``: the same for 12-megapixel photos: the raw folder (with reduced-size decoding)
  against the folder packed at 320 px (``simclrkit pack``), against the raw folder decoded in
  full, and lightly on the raw folder.
* ``decode``: Pillow's decode of one file: ImageNet-size, 12 MP in full, 12 MP at 1/4 and 1/8.

Writes JSON (with the machine's description) to ``benchmarks/results/data.json`` and appends a
table to ``docs/benchmarks.md``. ``pip install -e '.[bench]'`` installs lightly.

    python benchmarks/data.py                       # everything, ~15 minutes on 2 cores
    python benchmarks/data.py --sections pipeline,photos --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from step import describe_machine, write_results  # noqa: E402

_DISTINCT = 48  # real JPEGs behind the hard links


def _photo(rng: np.random.Generator, width: int, height: int, noise: float):
    from PIL import Image

    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    pixels = smooth.astype(np.float32) + rng.normal(0, noise, smooth.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(root: Path, count: int, size: tuple[int, int] = (500, 375), noise: float = 8.0,
                distinct: int = _DISTINCT) -> Path:  # fmt: skip
    """``count`` JPEGs in 100 sub-folders: ``distinct`` real ones, hard-linked for the rest."""
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    sources = root.parent / f"{root.name}-sources"  # outside: ImageFolder lists every folder
    sources.mkdir(parents=True, exist_ok=True)
    originals = []
    for i in range(min(distinct, count)):
        path = sources / f"{i}.jpg"
        _photo(rng, *size, noise).save(path, quality=90)
        originals.append(path)
    for i in range(count):
        target = root / f"{i % 100:03d}" / f"{i:07d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(originals[i % len(originals)], target)
    (root / ".complete").touch()
    return root


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        pending.extend(int(c) for c in children)
    return total * 1024


def startup(folder: Path, src: Path | None) -> dict[str, float]:
    """Seconds to the first optimiser step and the peak RSS of the process tree until then."""
    with tempfile.TemporaryDirectory() as run_dir:
        env = dict(os.environ, PYTHONUNBUFFERED="1", THP_MEM_ALLOC_ENABLE="1")
        if src is not None:
            env["PYTHONPATH"] = str(src)
        command = [
            sys.executable, "-m", "simclrkit", "pretrain", "--run-dir", run_dir, "--quiet",
            "data.dataset=folder", f"data.root={folder}", "data.image_size=64",
            "model.encoder=resnet18", "model.width=0.25", "train.batch_size=32",
            "train.max_steps=3", "train.log_every=1", "eval.linear=false",
            "data.num_workers=0", "train.precision=fp32",
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        metrics, peak, first = Path(run_dir) / "metrics.jsonl", 0, None
        while first is None:
            peak = max(peak, _tree_rss(process.pid))
            if metrics.exists() and '"loss"' in metrics.read_text():
                first = time.perf_counter() - started
            elif process.poll() is not None:
                raise RuntimeError(f"pretrain failed: {process.stderr.read()[-2000:]}")
            time.sleep(0.02)
        process.wait()
    return {"seconds_to_first_step": first, "peak_rss_mb": peak / 2**20}


# --------------------------------------------------------------------------------------------
# Images per second on one core
# --------------------------------------------------------------------------------------------


def _simclrkit_rate(
    dataset: str, root: Path, images: int, reduced: bool, split: bool, device_decode: bool
) -> float:
    import torch

    from simclrkit.augment import imagenet_augment
    from simclrkit.data import load_dataset
    from simclrkit.filebatches import FileChunks

    source = load_dataset(dataset, root, "train", reduced_decode=reduced, quiet=True)
    batch = 32
    # split: the host's half of the accelerator pipeline (read, decode, crop and resize both
    # views to uint8); the colour half runs on the device (devicefeed.py). device_decode: the
    # host only reads and checks headers; the device decodes and crops (jpegdevice.py)
    chunks = FileChunks(source, imagenet_augment(224), seed=0, global_batch_size=batch,
                        images_per_epoch=len(source), finish_on_device=split or device_decode,
                        decode_on_device=device_decode)  # fmt: skip

    def step(s: int) -> None:
        chunks.assemble([chunks[s * chunks.items_per_step + k] for k in range(chunks.items_per_step)])

    step(0)  # compiles the kernels (cached on disk), opens the files
    steps = max(1, images // batch)
    started = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    assert torch.get_num_threads() == 1
    return steps * batch / (time.perf_counter() - started)


def _lightly_rate(root: Path, images: int) -> float:
    import torch
    import torchvision
    from lightly.transforms import SimCLRTransform

    # lightly's documented SimCLR pipeline: ImageFolder + SimCLRTransform (two views, blur on).
    dataset = torchvision.datasets.ImageFolder(str(root), transform=SimCLRTransform(input_size=224))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = iter(loader)
    next(batches)
    count, started = 0, time.perf_counter()
    while count < images:
        views, _ = next(batches)
        count += views[0].shape[0]
    return count / (time.perf_counter() - started)


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    root, images = Path(args.data), args.images
    if args.variant.startswith("lightly"):
        rate = _lightly_rate(root, images)
    else:
        dataset = "shards" if "shards" in args.variant or "packed" in args.variant else "folder"
        rate = _simclrkit_rate(dataset, root, images, reduced="full_decode" not in args.variant,
                               split="split" in args.variant,
                               device_decode="device_decode" in args.variant)  # fmt: skip
    print(json.dumps({"images_per_second": rate}))


def _rate(variant: str, data: Path, images: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", THP_MEM_ALLOC_ENABLE="1")
    command = [sys.executable, __file__, "--variant", variant, "--data", str(data),
               "--images", str(images)]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])["images_per_second"]


def _interleaved(variants: dict[str, tuple[Path, int]], repeats: int) -> dict[str, dict]:
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, (data, images) in variants.items():  # interleaved: drift hits all alike
            runs[name].append(_rate(name, data, images))
            print(f"repeat {repeat + 1}: {name:34s} {runs[name][-1]:8.1f} images/s", flush=True)
    return {name: {"median": statistics.median(r), "runs": r} for name, r in runs.items()}


# --------------------------------------------------------------------------------------------
# Decode costs
# --------------------------------------------------------------------------------------------


def decode_costs(imagenet: Path, photo: Path, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per decode with Pillow, one thread: the floor of any CPU pipeline."""
    from PIL import Image

    def timed(data: bytes, reduction: int) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            image = Image.open(io.BytesIO(data))
            if reduction > 1:
                image.draft(image.mode, (image.size[0] // reduction, image.size[1] // reduction))
            image.load()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    small, large = imagenet.read_bytes(), photo.read_bytes()
    return {
        "imagenet_size_full_ms": timed(small, 1),
        "photo_12mp_full_ms": timed(large, 1),
        "photo_12mp_quarter_ms": timed(large, 4),
        "photo_12mp_eighth_ms": timed(large, 8),
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="decode,pipeline,photos,startup")
    parser.add_argument("--files", default="1000,10000,100000", help="start-up folder sizes")
    parser.add_argument("--before-src", help="another checkout's src folder to time as 'before'")
    parser.add_argument("--images", type=int, default=256, help="images timed per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="where the synthetic folders live (kept between runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args)
        return
    sections = args.sections.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simclrkit-data-"))
    report: dict = {"machine": describe_machine(), "command": "python benchmarks/data.py " +
                    " ".join(sys.argv[1:])}  # fmt: skip

    imagenet = make_folder(work / "imagenet-like", max(512, args.images + 64))
    photos = make_folder(work / "photos-12mp", 64, size=(4000, 3000), noise=6.0, distinct=8)
    if "decode" in sections:
        report["decode_ms"] = decode_costs(work / "imagenet-like-sources" / "0.jpg",
                                           work / "photos-12mp-sources" / "0.jpg")  # fmt: skip
        print(json.dumps(report["decode_ms"], indent=1), flush=True)
    if "pipeline" in sections or "photos" in sections:
        from simclrkit.pack import pack

        for source, target, side in ((imagenet, work / "imagenet-shards", 0),
                                     (photos, work / "photos-packed-320", 320)):  # fmt: skip
            if not (target / "train.index.npz").exists():
                started = time.perf_counter()
                result = pack("folder", source, target, max_side=side, quiet=True)["train"]
                report.setdefault("pack", {})[target.name] = {
                    **result, "seconds_per_image": (time.perf_counter() - started) / result["samples"]
                }
    if "pipeline" in sections:
        rates = _interleaved({
            "simclrkit_folder": (imagenet, args.images),
            "simclrkit_folder_split_host_half": (imagenet, args.images),
            "simclrkit_shards": (work / "imagenet-shards", args.images),
            "simclrkit_shards_split_host_half": (work / "imagenet-shards", args.images),
            "simclrkit_folder_device_decode_host_half": (imagenet, args.images),
            "simclrkit_folder_full_decode": (imagenet, args.images),
            "lightly_folder": (imagenet, args.images),
        }, args.repeats)  # fmt: skip
        report["pipeline_images_per_second_one_core"] = rates
    if "photos" in sections:
        few = max(32, args.images // 8)
        rates = _interleaved({
            "simclrkit_photos_packed_320": (work / "photos-packed-320", args.images),
            "simclrkit_photos_raw": (photos, few),
            "simclrkit_photos_raw_full_decode": (photos, few),
            "lightly_photos_raw": (photos, few),
        }, args.repeats)  # fmt: skip
        report["photos_images_per_second_one_core"] = rates
    if "startup" in sections:
        results: dict = {}
        for count in (int(n) for n in args.files.split(",")):
            folder = make_folder(work / f"startup-{count}", count)
            for label, src in (("after", None), ("before", args.before_src)):
                if label == "before" and not src:
                    continue
                results.setdefault(label, {})[count] = startup(folder, Path(src) if src else None)
                print(f"start-up {label:6s} {count:7d} files: {results[label][count]}", flush=True)
        report["startup"] = results
    _ratios(report)
    write_results(report, _table(report), args.out, docs=not args.no_docs)


def _ratios(report: dict) -> None:
    ratios = {}
    pipeline = report.get("pipeline_images_per_second_one_core", {})
    photos = report.get("photos_images_per_second_one_core", {})
    for mine, other, table in (
        ("simclrkit_folder", "lightly_folder", pipeline),
        ("simclrkit_shards", "lightly_folder", pipeline),
        ("simclrkit_folder", "simclrkit_folder_full_decode", pipeline),
        # > 3: the host keeps under a third of the CPU path's work per image
        ("simclrkit_folder_split_host_half", "simclrkit_folder", pipeline),
        ("simclrkit_shards_split_host_half", "simclrkit_shards", pipeline),
        ("simclrkit_folder_device_decode_host_half", "simclrkit_folder", pipeline),
        ("simclrkit_photos_packed_320", "simclrkit_photos_raw", photos),
        ("simclrkit_photos_raw", "lightly_photos_raw", photos),
        ("simclrkit_photos_raw", "simclrkit_photos_raw_full_decode", photos),
    ):
        if mine in table and other in table:
            ratios[f"{mine}/{other}"] = table[mine]["median"] / table[other]["median"]
    startup_after = report.get("startup", {}).get("after", {})
    if len(startup_after) >= 2:
        (small, a), (large, b) = min(startup_after.items()), max(startup_after.items())
        ratios["rss_bytes_per_file"] = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (large - small)
    report["ratios"] = ratios


def _table(report: dict) -> str:
    lines = ["", "### File data path", "", f"Machine: {report['machine']}. Command: "
             f"`{report['command']}`", ""]  # fmt: skip
    if "decode_ms" in report:
        lines += ["| Pillow decode, one thread | ms |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["decode_ms"].items()] + [""]
    for key, title in (("pipeline_images_per_second_one_core", "ImageNet-like JPEGs"),
                       ("photos_images_per_second_one_core", "12 MP photos")):  # fmt: skip
        if key in report:
            lines += [f"| {title}: read, decode, two 224 px views, one core | images/s |",
                      "| --- | --- |"]  # fmt: skip
            lines += [f"| {k} | {v['median']:.1f} |" for k, v in report[key].items()] + [""]
    if "startup" in report:
        lines += ["| start-up | files | s to first step | peak RSS MB |", "| --- | --- | --- | --- |"]
        for label, rows in report["startup"].items():
            lines += [f"| {label} | {n} | {r['seconds_to_first_step']:.1f} | "
                      f"{r['peak_rss_mb']:.0f} |" for n, r in rows.items()]  # fmt: skip
        lines.append("")
    lines += [f"- {name}: {value:.2f}" + ("" if "bytes" in name else "x")
              for name, value in report["ratios"].items()] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
