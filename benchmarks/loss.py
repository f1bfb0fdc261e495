"""Benchmark NT-Xent (paper Eq. 1): forward + backward time and peak memory.

Compares ``simclrkit.losses.nt_xent`` (automatic path: chunked for large batches) with

* ``dense``: the textbook formulation most PyTorch ports use (the full (2N, 2N) logit
  matrix, a diagonal mask and ``F.cross_entropy``), written here as a baseline;
* ``lightly``: ``lightly.loss.NTXentLoss``, when ``import lightly`` works (it is not a
  dependency; the row is skipped with a note otherwise).

Each implementation runs in a fresh subprocess, so that peak resident memory (RSS) of one
does not hide the other's. The reported peak is the process's maximum RSS during the timed
runs minus its RSS just before them (inputs already allocated). There is no untimed warm-up
(it would blur the memory peak); the first run carries one-off initialisation, which the
median of three or more runs discards. All implementations get the same seeded inputs,
and their loss values must agree with simclrkit's to a relative 1e-5 (lightly's loss is the
mean over 2N anchors, the same form as ours); the exit status is 1 if they do not.

Usage::

    python benchmarks/loss.py                      # N = 8192, D = 128, 3 repeats
    python benchmarks/loss.py --n 2048 --out /tmp/loss.json

Prints a markdown table and writes JSON to ``--out`` (default benchmarks/results/loss.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("simclrkit", "dense", "lightly")
RELATIVE_TOLERANCE = 1e-5


def _current_rss_bytes() -> int | None:
    """Resident memory now (Linux /proc; psutil elsewhere if installed)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def _build_loss(name: str, temperature: float):
    """The loss callable (z1, z2) -> scalar of one implementation, or raise ImportError."""
    import torch
    import torch.nn.functional as F

    if name == "simclrkit":
        from simclrkit.losses import nt_xent

        return lambda z1, z2: nt_xent(z1, z2, temperature)
    if name == "lightly":
        from lightly.loss import NTXentLoss as LightlyNTXentLoss

        return LightlyNTXentLoss(temperature=temperature)
    if name == "dense":

        def dense_nt_xent(z1, z2):
            num_images = z1.shape[0]
            z = F.normalize(torch.cat([z1, z2]), dim=1)
            logits = z @ z.t() / temperature
            self_mask = torch.eye(2 * num_images, dtype=torch.bool, device=z.device)
            logits = logits.masked_fill(self_mask, float("-inf"))
            partners = torch.arange(2 * num_images, device=z.device).roll(num_images)
            return F.cross_entropy(logits, partners)

        return dense_nt_xent
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")


def run_worker(name: str, num_images: int, dim: int, repeats: int, temperature: float) -> dict:
    """Time ``repeats`` forward + backward passes in this process; return a result row."""
    import torch

    loss_fn = _build_loss(name, temperature)
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(num_images, dim, generator=generator).requires_grad_()
    z2 = torch.randn(num_images, dim, generator=generator).requires_grad_()

    rss_before = _current_rss_bytes()
    times = []
    loss_value = float("nan")
    for _ in range(repeats):
        z1.grad = z2.grad = None
        start = time.perf_counter()
        loss = loss_fn(z1, z2)
        loss.backward()
        times.append(time.perf_counter() - start)
        loss_value = loss.item()
    peak_extra = None if rss_before is None else max(0, _peak_rss_bytes() - rss_before)
    return {
        "implementation": name,
        "loss": loss_value,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_extra_rss_mib": None if peak_extra is None else peak_extra / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def _run_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--repeats",
        str(args.repeats),
        "--temperature",
        str(args.temperature),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        if name == "lightly" and "ModuleNotFoundError" in completed.stderr:
            return {"implementation": name, "skipped": "lightly is not installed"}
        error = completed.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"implementation": name, "skipped": f"failed: {error[0]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _markdown_table(rows: list[dict]) -> str:
    lines = [
        "| implementation | median fwd+bwd (s) | runs (s) | peak extra RSS (MiB) | loss | "
        "matches simclrkit |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['implementation']} | - | - | - | - | skipped: {row['skipped']} |")
            continue
        runs = ", ".join(f"{t:.3f}" for t in row["times_s"])
        peak = "n/a" if row["peak_extra_rss_mib"] is None else f"{row['peak_extra_rss_mib']:.0f}"
        lines.append(
            f"| {row['implementation']} | {row['median_s']:.3f} | {runs} | {peak} | "
            f"{row['loss']:.6f} | {row.get('matches_simclrkit', 'n/a')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="images per batch N (2N views)")
    parser.add_argument("--dim", type=int, default=128, help="projection dimension D")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument(
        "--implementations",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one implementation
    args = parser.parse_args(argv)
    if args.n < 1 or args.dim < 1 or args.repeats < 1:
        parser.error("--n, --dim and --repeats must be >= 1")

    if args.worker:
        row = run_worker(args.worker, args.n, args.dim, args.repeats, args.temperature)
        print(json.dumps(row))
        return 0

    names = [name.strip() for name in args.implementations.split(",") if name.strip()]
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {IMPLEMENTATIONS}")
    if "simclrkit" not in names:
        names.insert(0, "simclrkit")  # the reference for the value check

    rows = [_run_in_subprocess(name, args) for name in names]
    reference = next(row for row in rows if row["implementation"] == "simclrkit")
    all_match = "skipped" not in reference
    for row in rows:
        if "skipped" in row or "skipped" in reference:
            continue
        difference = abs(row["loss"] - reference["loss"])
        row["matches_simclrkit"] = difference <= RELATIVE_TOLERANCE * abs(reference["loss"])
        all_match &= row["matches_simclrkit"]

    import torch

    result = {
        "benchmark": "nt_xent forward+backward",
        "config": {
            "n": args.n,
            "dim": args.dim,
            "views": 2 * args.n,
            "repeats": args.repeats,
            "temperature": args.temperature,
            "dtype": "float32",
            "device": "cpu",
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
        "results": rows,
        "values_match": all_match,
    }
    print(f"NT-Xent forward+backward, N={args.n}, D={args.dim}, temperature={args.temperature}, "
          f"float32 CPU, median of {args.repeats}\n")
    print(_markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all_match else 1


if __name__ == "__main__":
    raise SystemExit(main())
