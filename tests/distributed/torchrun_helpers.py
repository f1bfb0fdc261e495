"""Launching ``torchrun ... -m simclrkit pretrain`` (or ``distill``) and finding its worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# A 2-process run that takes seconds on a 2-core CPU: MNIST-5k at 16 px, an eighth-width
# ResNet-18, a global batch of 16 (8 images per process). Logged every step.
TINY_DIST = [
    "model.width=0.125",
    "data.image_size=16",
    "train.batch_size=16",
    "train.log_every=1",
    "train.keep_last=100",
    "optim.warmup_epochs=0.02",
    "eval.linear=false",
    "train.collective_timeout=60",
    "train.precision=fp32",  # parity within 1e-5 needs fp32 arithmetic
]


def start_torchrun(
    run_dir: Path, overrides: list[str], *, nproc: int = 2, max_restarts: int = 0,
    extra: list[str] = (), command: str = "pretrain",
) -> subprocess.Popen:
    """``python -m torch.distributed.run --standalone ... -m simclrkit COMMAND`` as a process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1",
        "-m", "simclrkit", command, "--run-dir", str(run_dir), "--quiet", *extra,
        *TINY_DIST, *overrides,
    ]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def start_single(run_dir: Path, overrides: list[str], extra: list[str] = (),
                 command: str = "pretrain") -> subprocess.Popen:  # fmt: skip
    """The same run in one plain process (no torchrun)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [
        sys.executable, "-m", "simclrkit", command, "--run-dir", str(run_dir), "--quiet",
        *extra, *TINY_DIST, *overrides,
    ]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; the parent pid follows the closing parenthesis.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(entry.name))
    return found


def worker_pids(agent_pid: int, nproc: int = 2, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the workers torchrun currently runs (read from their environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for pid in children(agent_pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
        if len(ranks) == nproc:
            return ranks
        time.sleep(0.05)
    raise AssertionError(f"torchrun {agent_pid} did not start {nproc} workers in {timeout}s")


def wait_for(condition, process: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended before {what}: {process.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout}s")


def logged_step(run_dir: Path) -> int:
    """The highest training step recorded in metrics.jsonl so far (0 if none)."""
    path = run_dir / "metrics.jsonl"
    best = 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                best = max(best, record["step"])
    return best


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:14]) for p in folder.glob("step-*.pt"))


def relative_difference(a: dict, b: dict, parts: tuple[str, ...] = ("encoder", "head")) -> float:
    """||a - b|| / ||b|| over every floating tensor of the encoder and head (weights, BN), or
    of other ``parts``: "probe" is the online probe's weights (its running sums left out)."""
    num = den = 0.0
    for part in parts:
        first, second = (
            (x["monitor"]["probe"] if part == "probe" else x[part]) for x in (a, b)
        )
        assert set(first) == set(second)
        for key, value in second.items():
            if value.is_floating_point() and key != "sums":
                num += (first[key].double() - value.double()).square().sum().item()
                den += value.double().square().sum().item()
    return (num / den) ** 0.5


def load(run_dir: Path, step: int | None = None) -> dict:
    name = "last.pt" if step is None else f"step-{step:09d}.pt"
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)
