"""The run report: plots of the training curves and a markdown page a person can read.

``report.md`` in the run folder links PNG plots (loss, learning rate, contrastive accuracy,
throughput) and tabulates the summary and evaluation, so a run can be judged without
TensorBoard. Inputs are the append-only ``metrics.jsonl`` and ``summary.json``; when a run was
resumed, the records a killed run wrote after its last checkpoint are superseded by the
resumed run's records for the same steps (the last record of a step wins).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from simclrkit.checkpoint import atomic_write


def read_metrics(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Step records of ``metrics.jsonl``, one per step (the latest wins), sorted by step:
    the training lines, or with ``event`` the lines of that event (e.g. "monitor").

    A truncated last line (a crash mid-write) is ignored.
    """
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("event") != event or "step" not in record:
            continue
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


# The monitors' figure (monitors.py): panels of (key, label, which records) curves.
_MONITOR_PANELS = (
    ("accuracy while training", (("knn_top1", "kNN, held-out", "monitor"),
                                 ("probe_top1", "online probe, held-out", "monitor"),
                                 ("probe_train_acc", "online probe, training views", "train"))),
    ("alignment and uniformity of z", (("alignment", "alignment (lower: closer positives)", "monitor"),
                                       ("uniformity", "uniformity (lower: more uniform)", "monitor"))),
    ("effective rank of h (RankMe)", (("rankme", "effective rank", "monitor"),)),
)  # fmt: skip


def _plot_monitors(records: list[dict[str, Any]], monitors: list[dict[str, Any]], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = {"monitor": monitors, "train": records}
    panels = [
        (title, [(label, [(r["step"], r[key]) for r in sources[kind] if r.get(key) is not None])
                 for key, label, kind in curves])
        for title, curves in _MONITOR_PANELS
    ]  # fmt: skip
    panels = [(title, [(label, pts) for label, pts in curves if pts]) for title, curves in panels]
    panels = [(title, curves) for title, curves in panels if curves]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=100,
                                squeeze=False)  # fmt: skip
    for ax, (title, curves) in zip(axes[0], panels):
        for label, points in curves:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=label)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return True


def _plot(records: list[dict[str, Any]], key: str, title: str, out: Path, log: bool = False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r[key]) for r in records if key in r]
    if not points:
        return False
    steps, values = zip(*points)
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)
    axes.plot(steps, values, linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if log and min(values) > 0:
        axes.set_yscale("log")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return True


def _resumes(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "resume":
            steps.append(record["step"])
    return steps


def number(value: object, spec: str) -> str:
    """``value`` formatted with ``spec``, or "n/a" when it is missing (null in the JSON)."""
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def write_report(run_dir: str | Path) -> Path:
    """Writes ``report.md`` and ``plots/*.png`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    figures = [
        ("loss", "NT-Xent loss", "loss.png"),
        ("lr", "learning rate", "lr.png"),
        ("contrastive_acc", "contrastive accuracy (positive ranked first)", "contrastive_acc.png"),
        ("images_per_second", "throughput (images/s)", "throughput.png"),
    ]
    made = [(title, name) for key, title, name in figures if _plot(records, key, title, plots / name)]
    monitors = read_metrics(run_dir / "metrics.jsonl", event="monitor")
    if _plot_monitors(records, monitors, plots / "monitors.png"):
        made.insert(0, ("online probe, kNN, alignment, uniformity and effective rank while "
                        "training", "monitors.png"))  # fmt: skip

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    lines = [f"# simclrkit run: {run_dir.name}", ""]
    if summary:
        lines += [
            f"- steps: {summary.get('steps')} "
            f"({number(summary.get('epochs', 0), '.2f')} epochs), "
            f"final loss {number(summary.get('final_loss'), '.4f')}",
            f"- training time: {number(summary.get('train_seconds', 0), '.0f')} s at "
            f"{number(summary.get('images_per_second', 0), '.0f')} images/s; "
            f"skipped (non-finite) steps: {summary.get('skipped_steps', 0)}",
        ]
        data = summary.get("data", {})
        if data:
            lines.append(
                f"- data: {data.get('name')} ({data.get('split')}), {data.get('size')} images, "
                f"{data.get('skipped', 0)} unreadable files left out before training"
            )
        if data.get("reads"):
            named = "".join(f"\n  - {e['path']}: {e['reason']}" for e in data["bad_files_named"])
            lines.append(
                f"- files read during training: {data['reads']}, of which {data['bad_reads']} "
                f"failed and were replaced; {data['bad_files']} distinct bad files"
                + (" (all in bad_files.txt)" if data["bad_files"] else "") + named
            )
    resumes = _resumes(run_dir / "metrics.jsonl")
    if resumes:
        lines.append(f"- resumed at step(s): {', '.join(map(str, resumes))}")
    evaluation = summary.get("eval", {})
    if evaluation:
        lines += ["", "## Evaluation", ""]
        if "eval_train_images" in evaluation:
            notes = "; ".join(evaluation.get("eval_notes", []))
            lines += [
                f"On a class-balanced subsample of {evaluation['eval_train_images']} training and "
                f"{evaluation['eval_test_images']} test images, in "
                f"{number(evaluation.get('eval_seconds', 0), '.0f')} s (budget "
                f"{number(evaluation.get('eval_budget_seconds', 0), '.0f')} s)"
                f"{': ' + notes if notes else ''}.",
                "",
            ]
        lines += ["| protocol | top-1 | top-5 |", "| --- | --- | --- |"]
        if "linear_top1" in evaluation:
            lines.append(
                "| linear (logistic regression on frozen h) | "
                f"{number(evaluation['linear_top1'], '.4f')} "
                f"| {number(evaluation.get('linear_top5'), '.4f')} |"
            )
        if "random_init_linear_top1" in evaluation:
            lines.append(
                "| same encoder, random initialisation | "
                f"{number(evaluation['random_init_linear_top1'], '.4f')}"
                f" | {number(evaluation.get('random_init_linear_top5'), '.4f')} |"
            )
        if "knn_top1" in evaluation:
            lines.append(
                f"| kNN (k=200) on frozen h | {number(evaluation['knn_top1'], '.4f')} "
                f"| {number(evaluation.get('knn_top5'), '.4f')} |"
            )
        for protocol, title in (("linear", "linear"), ("knn", "kNN (k=200)")):
            if f"raw_pixels_{protocol}_top1" in evaluation:
                lines.append(
                    f"| {title} on raw pixels (no learning) | "
                    f"{number(evaluation[f'raw_pixels_{protocol}_top1'], '.4f')} "
                    f"| {number(evaluation.get(f'raw_pixels_{protocol}_top5'), '.4f')} |"
                )
    if monitors:
        last = monitors[-1]
        lines += ["", "## While training", "", f"At step {last['step']} (`eval.monitor_every`):", ""]
        lines += [f"- {label}: {number(last[key], '.4f')}" for _, curves in _MONITOR_PANELS
                  for key, label, kind in curves if kind == "monitor" and key in last]  # fmt: skip
    if made:
        lines += ["", "## Training curves", ""]
        lines += [f"![{title}](plots/{name})" for title, name in made]
    report = run_dir / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write(report, lambda handle: handle.write(text.encode()))
    return report


def augmentation_grid(
    images: list,
    indices: list[int],
    augment: Any,
    out: str | Path,
    *,
    seed: int = 0,
    num_views: int = 6,
) -> Path:
    """Saves a PNG grid: one row per source image, its original then ``num_views`` views.

    Args:
        images: uint8 (C, H, W) tensors (any sizes).
        indices: their dataset indices (the views are those of epoch 0 of a run with ``seed``).
        augment: a ``SimCLRAugment``.
        out: the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(images), num_views + 1
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.6 * rows), dpi=100, squeeze=False
    )
    for row, (image, index) in enumerate(zip(images, indices)):
        height, width = image.shape[-2:]
        panels = [image.float() / 255]
        for view in range(num_views):
            params = augment.sample_params(seed, 0, [index], view, height, width)
            panels.append(augment.apply(image[None], params)[0])
        for column, panel in enumerate(panels):
            axis = axes[row][column]
            picture = panel.clamp(0, 1).permute(1, 2, 0).numpy()
            if picture.shape[-1] == 1:
                axis.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(picture)
            axis.set_axis_off()
            if row == 0:
                axis.set_title("original" if column == 0 else f"view {column}", fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def preview_augmentations(
    config: Any, out: str | Path, *, num_images: int = 8, num_views: int = 6
) -> Path:
    """The first images of a run's epoch 0 with the views pretraining would draw for them.

    Raises:
        ConfigError: bad counts, or a folder of varying sizes without ``data.image_size``.
    """
    from simclrkit.augment import build_augment, default_blur
    from simclrkit.config import ConfigError
    from simclrkit.data import BadImageError, BadImageWarning, load_run_data
    from simclrkit.pipeline import epoch_order

    if num_images < 1 or num_views < 1:
        raise ConfigError("--images and --views: allowed: integers >= 1")
    source = load_run_data(config, "pretrain")
    image_size = config.data.image_size or source.native_size
    if image_size is None:
        raise ConfigError("data.image_size: images of a folder vary in size; set it, e.g. 224")
    blur = config.augment.blur if config.augment.blur is not None else default_blur(image_size)
    images, indices = [], []
    for index in epoch_order(config.seed, 0, len(source)).tolist():
        if len(images) == num_images:
            break
        try:
            images.append(source.read(index))
        except BadImageError as error:  # shown as training would: skipped, with a warning
            warnings.warn(f"skipping image {error}", BadImageWarning, stacklevel=2)
            continue
        indices.append(index)
    if not images:
        raise ConfigError("data.root: none of the images could be decoded")
    return augmentation_grid(
        images, indices, build_augment(config, image_size, blur), out,
        seed=config.seed, num_views=num_views,
    )
