"""Tune a recipe on a validation split of its TRAINING images, never on the split it reports.

Every variant is one real ``simclrkit pretrain`` run of the recipe with ``data.holdout=K``:
pretraining and the probes see the training images less K stratified ones, and the run's
linear and kNN evaluation scores those K (``data.py``: ``stratified_holdout``), beside the
same probes on raw pixels. Variants run one after another (never two at once: they share
the cores, and the time of each is part of the result). Results go to a JSON file with the
host, one row per variant; the table is printed as markdown.

    python benchmarks/tune.py --recipe mnist5k --holdout 1000 \\
        --variant base: --variant t0.5:loss.temperature=0.5 \\
        --variant crop0.08:augment.crop_min_scale=0.08,augment.crop_sampler=reference
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import describe_machine  # noqa: E402 - every benchmark describes the machine alike


def _run(recipe: str, holdout: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "simclrkit", "pretrain", "--config", recipe,
                   "--run-dir", str(run_dir), "--quiet", f"data.holdout={holdout}",
                   "eval.random_init_baseline=false", *overrides]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = summary.get("eval", {})
    keys = ("linear_top1", "knn_top1", "raw_pixels_linear_top1", "raw_pixels_knn_top1",
            "random_init_linear_top1", "random_init_knn_top1")  # fmt: skip
    return {
        "overrides": overrides,
        **{key: evaluation.get(key) for key in keys},
        "final_loss": summary.get("final_loss"),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mnist5k")
    parser.add_argument("--holdout", type=int, default=1000)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:KEY=VALUE,KEY=VALUE (NAME: alone is the recipe as it is)")
    parser.add_argument("--out", default="benchmarks/results/tune.json")
    args = parser.parse_args()

    rows = {}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        rows[name] = _run(args.recipe, args.holdout, [o for o in overrides.split(",") if o])
        row = rows[name]
        print(f"{name}: linear {row['linear_top1']:.4f} kNN {row['knn_top1']:.4f} "
              f"({row['train_seconds']:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
        result = {"recipe": args.recipe, "holdout": args.holdout, "host": describe_machine(),
                  "variants": rows}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    first = next(iter(rows.values()))
    print(f"\nvalidation split: {args.holdout} training images of {args.recipe}; raw pixels: "
          f"linear {first['raw_pixels_linear_top1']:.4f}, kNN {first['raw_pixels_knn_top1']:.4f}\n")
    print("| variant | overrides | linear top-1 | kNN top-1 | train s |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {' '.join(row['overrides']) or '(recipe)'} | {row['linear_top1']:.4f} "
              f"| {row['knn_top1']:.4f} | {row['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
