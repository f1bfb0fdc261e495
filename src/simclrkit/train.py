"""Pretraining: one plain loop, readable top to bottom.

build -> (resume) -> for each step: batch, views, one forward pass over both views, NT-Xent,
backward, finite check, optimiser step at the scheduled learning rate, log, checkpoint.

Both views go through the encoder in ONE forward pass of 2N images, as in the reference
(``run.py`` concatenates the views along the batch), so BatchNorm normalises over both views.

A step is a pure function of the state at its start: the batch comes from ``(seed, step)``
(``pipeline.py``) and the model's initial weights from the seed. A checkpoint therefore holds
everything a resumed run needs (weights, BN buffers, optimiser, schedule, RNG, step), and a
run resumed from it ends bit-identical to one that never stopped.

Stopping: SIGTERM or SIGINT finish the current step, write a checkpoint and raise
:class:`Preempted` (the command exits with :data:`EXIT_PREEMPTED`, 143); a second SIGINT aborts
at once. A non-finite loss or gradient is caught before the optimiser step: the run stops
(policy ``stop``) without checkpointing the poisoned state, or skips the step (``skip``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from simclrkit import config as config_lib
from simclrkit.augment import SimCLRAugment
from simclrkit.checkpoint import CheckpointManager, load_checkpoint
from simclrkit.config import Config, ConfigError, Plan
from simclrkit.data import dataset_summary, load_dataset
from simclrkit.losses import NTXentLoss, contrastive_accuracy
from simclrkit.models import ProjectionHead, SimCLR, build_encoder
from simclrkit.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from simclrkit.pipeline import StepBatches, batch_stream

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a process stopped by SIGTERM

# Config keys that may change when a run is resumed: they do not change what is computed.
_RESUME_MAY_CHANGE = {
    "data.num_workers",
    "data.max_bad_fraction",
    "train.device",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.nonfinite",
    "recipe",
}


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN or infinite under the ``stop`` policy."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGINT after checkpointing at ``step``."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written")
        self.step = step


class _StopRequests:
    """Turns SIGTERM/SIGINT into a flag checked between steps; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def select_device(name: str) -> torch.device:
    """Maps 'auto' to CUDA when present, else the CPU; checks an explicit CUDA request."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' asked for, but no CUDA device is visible; use cpu")
    return torch.device(name)


def architecture(config: Config, plan: Plan) -> dict[str, Any]:
    """What is needed to rebuild the model from a checkpoint, without the run's config."""
    return {
        "encoder": config.model.encoder,
        "width": config.model.width,
        "in_channels": plan.in_channels,
        "cifar_stem": plan.cifar_stem,
        "image_size": plan.image_size,
        "head": config.model.head,
        "head_layers": config.model.head_layers,
        "proj_dim": config.model.proj_dim,
    }


def build_model(arch: dict[str, Any]) -> SimCLR:
    """The encoder and projection head described by :func:`architecture`."""
    encoder = build_encoder(
        arch["encoder"],
        width=arch["width"],
        in_channels=arch["in_channels"],
        image_size=arch["image_size"],
        cifar_stem=arch["cifar_stem"],
    )
    head = ProjectionHead(
        encoder.feature_dim,
        num_layers=arch["head_layers"],
        out_dim=arch["proj_dim"],
        kind=arch["head"],
    )
    return SimCLR(encoder, head)


def build_augment(config: Config, plan: Plan) -> SimCLRAugment:
    aug = config.augment
    return SimCLRAugment(
        output_size=plan.image_size,
        crop_scale=(aug.crop_min_scale, 1.0),
        flip_prob=aug.flip_prob,
        color_jitter_strength=aug.color_jitter_strength,
        color_jitter_prob=aug.color_jitter_prob,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=aug.blur_prob if plan.blur else 0.0,
        brightness=aug.brightness,
    )


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Keys whose change would make a resumed run compute something else."""
    old, new = _flatten(saved), _flatten(config_lib.to_dict(current))
    return sorted(
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in set(old) | set(new)
        if key not in _RESUME_MAY_CHANGE and old.get(key) != new.get(key)
    )


class _Progress:
    """A tqdm bar on a terminal, plain lines otherwise (CI and log files), nothing if quiet."""

    def __init__(self, total: int, initial: int, quiet: bool, log_every: int) -> None:
        self.total, self.initial, self.quiet, self.log_every = total, initial, quiet, log_every
        self.started = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(self, step: int, record: dict[str, float] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                self.bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.3g}",
                    img_s=f"{record['images_per_second']:.0f}",
                )
        elif record is not None and not self.quiet:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            print(
                f"step {step}/{self.total}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}"
                f"  acc {record['contrastive_acc']:.3f}  lr {record['lr']:.4g}"
                f"  {record['images_per_second']:.0f} img/s  eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    # Append-only, one flushed line per record: a crash loses at most the line being written.
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _all_finite(loss: torch.Tensor, model: torch.nn.Module) -> bool:
    """One host sync: the loss plus the global gradient norm, reduced on the device.

    ``clip_grad_norm_`` with an infinite bound is the public way to get the total norm in one
    fused pass; it leaves the gradients unchanged (it scales them by 1).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    total = loss.detach().float()
    if params:
        total = total + torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return bool(math.isfinite(total.item()))


def pretrain(
    config: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Runs SimCLR pretraining, then the configured evaluation; returns the summary.

    Writes into ``run_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (append-only),
    TensorBoard events in ``tb/``, ``checkpoints/``, ``summary.json`` and ``report.md``.

    Args:
        config: the validated run configuration.
        run_dir: the run folder; a folder that already holds checkpoints needs ``resume``.
        resume: continue from the newest checkpoint in ``run_dir``.
        force: resume even when settings that change the result differ from the checkpoint's.
        quiet: no progress output.

    Raises:
        ConfigError: user mistakes found before training (data, batch, device, run folder).
        NonFiniteLossError: the loss or gradients stopped being finite (policy ``stop``).
        Preempted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step exists.
    """
    import yaml

    from simclrkit.evaluate import linear_probe_report
    from simclrkit.report import write_report

    started = time.perf_counter()
    run_dir = Path(run_dir)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=config.train.keep_last)
    latest = checkpoints.latest()
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    if not resume and latest is not None:
        raise ConfigError(
            f"--run-dir: {run_dir} already holds a run; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    state = load_checkpoint(latest) if resume else None
    if state is not None:
        changed = config_differences(state["config"], config)
        if changed and not force:
            raise ConfigError(
                "--resume: the config differs from the checkpoint's in settings that change the "
                f"result ({'; '.join(changed)}); pass --force to resume anyway"
            )

    device = select_device(config.train.device)
    train_data = load_dataset(
        config.data.dataset,
        config.data.root,
        "pretrain",
        max_bad_fraction=config.data.max_bad_fraction,
        quiet=quiet,
    )
    plan = config_lib.resolve(
        config,
        num_examples=len(train_data),
        native_image_size=train_data.native_size or config.data.image_size or 224,
        in_channels=train_data.num_channels,
    )
    if train_data.native_size is None and config.data.image_size is None:
        raise ConfigError(
            "data.image_size: images of a folder vary in size; set the training size, "
            "e.g. data.image_size=224"
        )
    arch = architecture(config, plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False))
    if not quiet:
        print(f"simclrkit: {len(train_data)} training images; {plan}", file=sys.stderr)

    torch.manual_seed(config.seed)
    model = build_model(arch).to(device)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(
        config.optim.name,
        parameter_groups(model, weight_decay=config.optim.weight_decay),
        lr=plan.scaled_lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        trust_coefficient=config.optim.trust_coefficient,
    )
    schedule = WarmupCosineSchedule(
        total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=plan.scaled_lr
    )
    start_step, skipped_steps, train_seconds = 0, 0, 0.0
    if state is not None:
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step = state["step"]
        skipped_steps = state.get("skipped_steps", 0)
        train_seconds = state.get("train_seconds", 0.0)

    loss_fn = NTXentLoss(temperature=config.loss.temperature, chunk_size=config.loss.chunk_size)
    augment = build_augment(config, plan)
    batches = StepBatches(
        train_data,
        augment,
        seed=config.seed,
        global_batch_size=plan.global_batch_size,
        steps_per_epoch=plan.steps_per_epoch,
    )
    metrics_path = run_dir / "metrics.jsonl"
    _append_jsonl(
        metrics_path,
        {"event": "resume" if state else "start", "step": start_step, "time": time.time()},
    )
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed run logged after its last checkpoint.
    tensorboard = SummaryWriter(run_dir / "tb", purge_step=start_step if state else None)

    def save(step: int) -> None:
        checkpoints.save(
            {
                "step": step,
                "encoder": model.encoder.state_dict(),
                "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "config": config_lib.to_dict(config),
                "architecture": arch,
                "skipped_steps": skipped_steps,
                "train_seconds": train_seconds + (time.perf_counter() - window_start),
            },
            step,
        )

    progress = _Progress(plan.total_steps, start_step, quiet, config.train.log_every)
    model.train()
    window_start, window_images = time.perf_counter(), 0
    step = start_step
    stream = batch_stream(
        batches, start_step, plan.total_steps, num_workers=config.data.num_workers
    )
    with _StopRequests() as stop:
        for step in range(start_step, plan.total_steps):
            indices, view1, view2 = next(stream)
            views = torch.cat([view1, view2]).to(device, non_blocking=True)
            views = views.contiguous(memory_format=memory_format)
            batch = view1.shape[0]

            lr = schedule.apply(optimizer, step)
            _, z = model(views)
            z1, z2 = z[:batch], z[batch:]
            loss = loss_fn(z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if _all_finite(loss, model):
                optimizer.step()
            elif config.train.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step + 1}; stopped before the "
                    f"optimiser step, the last checkpoint is from before it. Lower optim.lr, "
                    f"check the data, or set train.nonfinite=skip."
                )
            else:
                skipped_steps += 1

            done = step + 1
            window_images += batch
            record = None
            if done % config.train.log_every == 0 or done == plan.total_steps:
                now = time.perf_counter()
                train_seconds += now - window_start
                record = {
                    "step": done,
                    "epoch": done / plan.steps_per_epoch,
                    "loss": loss.item(),
                    "contrastive_acc": float(contrastive_accuracy(z1.detach(), z2.detach())),
                    "lr": lr,
                    "images_per_second": window_images / max(now - window_start, 1e-9),
                    "skipped_steps": skipped_steps,
                }
                _append_jsonl(metrics_path, record)
                for key in ("loss", "contrastive_acc", "lr", "images_per_second"):
                    tensorboard.add_scalar(f"train/{key}", record[key], done)
                window_start, window_images = time.perf_counter(), 0
            progress.step(done, record)
            if stop.signal_name is not None:
                save(done)
                progress.close()
                tensorboard.close()
                _append_jsonl(metrics_path, {"event": "preempted", "step": done, "time": time.time()})
                raise Preempted(done, stop.signal_name)
            if done % config.train.checkpoint_every == 0 or done == plan.total_steps:
                save(done)
    progress.close()

    final = json.loads(metrics_path.read_text().splitlines()[-1])
    summary: dict[str, Any] = {
        "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "final_loss": final.get("loss", float("nan")),
        "skipped_steps": skipped_steps,
        "train_seconds": train_seconds,
        "images_per_second": (plan.total_steps - start_step)
        * plan.global_batch_size
        / max(train_seconds - (state or {}).get("train_seconds", 0.0), 1e-9),
        "data": dataset_summary(train_data),
        "plan": asdict(plan),
        "resumed_from_step": start_step if state else None,
    }
    if config.eval.linear:
        def random_encoder() -> torch.nn.Module:
            torch.manual_seed(config.seed)  # the exact weights this run started from
            return build_model(arch).encoder

        summary["eval"] = linear_probe_report(
            model.encoder, random_encoder, config, image_size=plan.image_size, device=device,
            seed=config.seed, quiet=quiet,
        )
        for key, value in summary["eval"].items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"eval/{key}", value, plan.total_steps)
        _append_jsonl(metrics_path, {"event": "eval", "step": plan.total_steps, **summary["eval"]})
    tensorboard.close()
    summary["wall_seconds"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir)
    return summary
