"""benchmarks/gpu.py --dry-run: every path of the prepared GPU benchmark runs on the CPU at tiny
sizes, so the script a GPU lease depends on cannot rot; and what crosses to the device is
uint8 where the device finishes the views."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_dry_run_measures_every_path_and_the_split_pipeline_moves_uint8(tmp_path):
    out = tmp_path / "gpu.json"
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--no-docs",
         "--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    for name in ("bare", "memory", "folder", "folder_host", "shards", "folder_gpu_decode",
                 "shards_gpu_decode"):
        assert results[name]["images_per_second"] > 0, name
        assert 0 < results[name]["of_bare"], name
    assert results["nccl_parity"] == {"skipped": "needs two GPUs"}
    # Per step (batch 16, 32 px, 3 channels): files cross as uint8 crops of both views, the
    # host path as float32 views, images in memory as their 96 px uint8 sources.
    views = 2 * 16 * 3 * 32 * 32
    assert results["folder"]["h2d_mb_per_step"] == pytest.approx(views / 1e6)
    assert results["shards"]["h2d_mb_per_step"] == pytest.approx(views / 1e6)
    # decoded on the device: the files cross instead of crops, 16 ImageNet-size JPEGs a
    # step (~60 KB in the folder, ~20 KB as pack re-encodes them into the shards)
    assert 16 * 40e3 / 1e6 < results["folder_gpu_decode"]["h2d_mb_per_step"] < 16 * 130e3 / 1e6
    assert 16 * 10e3 / 1e6 < results["shards_gpu_decode"]["h2d_mb_per_step"] < 16 * 40e3 / 1e6
    assert results["folder_host"]["h2d_mb_per_step"] == pytest.approx(4 * views / 1e6)
    assert results["memory"]["h2d_mb_per_step"] == pytest.approx(16 * 3 * 96 * 96 / 1e6)
    assert "### GPU step" in process.stdout and "CPU (dry run)" in process.stdout
