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

Several processes (``torchrun --nproc_per_node=K -m simclrkit pretrain ...``; the helpers live in
``distributed.py``): ``train.batch_size`` is the GLOBAL batch and process r takes rows
``[r n, (r + 1) n)`` of it, so K processes compute what one process computes on the whole
batch (paper §2.2: negatives from all processes, BatchNorm over the global batch), up to float
rounding. Only rank 0 writes files or prints; every process loads the checkpoint on resume.
Every branch that must be taken by all processes together (a non-finite step, a stop signal
that reached only one of them) is agreed on with one all-reduce first. When torchrun restarts
the workers after a failure (``--max-restarts``), they resume from the job's last checkpoint.

Memory and speed: ``train.micro_batch_size`` turns on gradient caching
(:func:`simclrkit.step.contrastive_backward`), ``train.precision`` autocast (bf16, or fp16 with
a gradient scaler whose state is checkpointed) and ``train.compile`` ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from simclrkit import config as config_lib
from simclrkit import distributed, jpegdevice, jsonout, runfolder
from simclrkit.augment import SimCLRAugment, build_augment
from simclrkit.badfiles import BadFileLedger
from simclrkit.budget import check_training_memory
from simclrkit.checkpoint import (
    CheckpointManager,
    atomic_write,
    load_checkpoint,
    validate_training_checkpoint,
)
from simclrkit.config import Config, ConfigError, Plan
from simclrkit.data import ImageArray, ImageFiles, dataset_summary
from simclrkit.devicefeed import DeviceFeed, finish_on_device
from simclrkit.devices import select_device
from simclrkit.filebatches import FileChunks
from simclrkit.losses import NTXentLoss
from simclrkit.models import SimCLR, build_model
from simclrkit.monitors import TrainingMonitor
from simclrkit.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from simclrkit.pipeline import StepBatches, auto_workers, batch_stream
from simclrkit.rundata import prepare_train_data
from simclrkit.runloop import Preempted, Progress, RunLog, StopRequests
from simclrkit.step import (
    _autocast_factory,
    _contrastive_accuracy,
    _nonfinite,
    contrastive_backward,
    resolve_precision,
)
from simclrkit.throughput import breakdown, peak_flops, training_flops_per_image

# TensorBoard scalars of every metrics line (train/...).
_TRAIN_SCALARS = ("loss", "contrastive_acc", "lr", "images_per_second")

# Config keys that may change when a run is resumed: they do not change what is computed.
# (Which images a run trains on is checked by the data's fingerprint, not by these keys.)
_RESUME_MAY_CHANGE = {
    "data.num_workers",
    "data.prefetch",
    "data.augment_on",  # where the same views are rendered (float rounding apart)
    "data.decode_on",
    "data.max_bad_fraction",
    "data.index",
    "data.check_files",
    "train.device",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.nonfinite",
    "train.compile",
    "train.collective_timeout",
    "recipe",
    # what runs after training, not the training itself
    "eval.linear",
    "eval.run_page",
    "eval.random_init_baseline",
    "eval.raw_pixels_baseline",
    "eval.batch_size",
    "eval.max_share",
    "eval.min_seconds",
    "eval.max_train_images",
    "eval.max_test_images",
    "eval.monitor_every",
    "eval.monitor_images",
    "eval.ft_proj_selector",
    # the checkpoint decides: its optimiser state holds the probe's group or not
    "eval.online_probe",
}


# Keys whose default changed when they were added: a saved config without the key computed
# with the value here, not with today's default.
_DEFAULTS_BEFORE_KEY = {
    "loss.reduction": "mean",
    "eval.online_probe": False,
    "train.step_counting": "drop_last",
}


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN or infinite under the ``stop`` policy, or an
    optimiser step made the weights non-finite (under either policy)."""


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
        "sk_ratio": config.model.sk_ratio,
        "se_ratio": config.model.se_ratio,
    }






def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Keys whose change would make a resumed run compute something else.

    A key missing from the saved config (a checkpoint from before the key existed) counts as
    what that run computed with: its default, or the value in ``_DEFAULTS_BEFORE_KEY``.
    """
    old = {**_flatten(config_lib.to_dict(Config())), **_DEFAULTS_BEFORE_KEY, **_flatten(saved)}
    new = _flatten(config_lib.to_dict(current))
    return sorted(
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in set(old) | set(new)
        if key not in _RESUME_MAY_CHANGE and old.get(key) != new.get(key)
    )


def _step_source(
    train_data: ImageArray | ImageFiles,
    augment: SimCLRAugment,
    config: Config,
    plan: Plan,
    info: distributed.DistInfo,
    device: torch.device,
    quiet: bool,
) -> StepBatches | FileChunks:
    """The step-indexed dataset behind the batch stream: whole steps for images in memory,
    uint8 chunks of steps for files (``filebatches.py``); what the device finishes is
    ``data.augment_on``'s choice (``devicefeed.py``)."""
    finish = finish_on_device(config.data.augment_on, device)
    common = dict(seed=config.seed, global_batch_size=plan.global_batch_size,
                  images_per_epoch=plan.images_per_epoch, rank=info.rank,
                  world_size=info.world_size, finish_on_device=finish)  # fmt: skip
    if isinstance(train_data, ImageArray):
        return StepBatches(train_data, augment, **common)
    return FileChunks(train_data, augment, **common,
                      decode_on_device=_decode_on_device(config, device, finish, quiet))  # fmt: skip


def _decode_on_device(config: Config, device: torch.device, finish: bool, quiet: bool) -> bool:
    """``data.decode_on=device`` where the device can: else one line, and the loader decodes."""
    if config.data.decode_on != "device":
        return False
    if not finish:
        raise ConfigError(
            "data.decode_on=device: the device decodes and crops the JPEGs, so it must also "
            "finish the views; set data.augment_on=device (or auto on a GPU)"
        )
    reason = jpegdevice.available(device)
    if reason is not None and not quiet:
        print(f"simclrkit: data.decode_on=device: {device} cannot decode JPEGs ({reason}); "
              "the loader workers decode them", file=sys.stderr)  # fmt: skip
    return reason is None


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _torchrun_launch() -> tuple[int, str | None]:
    """(restart count, run id) of the torchrun job this process belongs to, or (0, None)."""
    return (
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        os.environ.get("TORCHELASTIC_RUN_ID"),
    )


def process_device(config: Config, device: torch.device,
                   info: distributed.DistInfo) -> torch.device:  # fmt: skip
    """This process's device: GPU ``LOCAL_RANK`` for each of several CUDA processes."""
    if info.world_size > 1 and device.type == "cuda":
        if ":" in config.train.device:
            raise ConfigError(
                f"train.device: '{config.train.device}' names one GPU, but each of the "
                f"{info.world_size} processes takes GPU LOCAL_RANK; use cuda or auto"
            )
        return torch.device("cuda", info.local_rank)
    return device


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

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) every process calls this; rank 0
    alone writes files, prints and evaluates, the others return once training is done. When
    torchrun restarts the workers after a failure, they resume from the checkpoint the same
    torchrun job wrote last, without ``resume``.

    Args:
        config: the validated run configuration.
        run_dir: the run folder; a folder that already holds checkpoints needs ``resume``.
        resume: continue from the newest checkpoint in ``run_dir``.
        force: resume even when settings that change the result differ from the checkpoint's.
        quiet: no progress output.

    Raises:
        ConfigError: user mistakes found before training (data, batch, device, run folder).
        NonFiniteLossError: the loss or gradients stopped being finite (policy ``stop``).
        Preempted: SIGTERM/SIGINT arrived (at any process); a checkpoint of the last finished
            step exists.
    """
    device = select_device(config.train.device)
    if resolve_precision(config.train.precision, device) == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision: fp16 needs a CUDA device (mixed precision with a gradient scaler); "
            "on the CPU use fp32 or bf16"
        )
    if device.type == "mps" and resolve_precision(config.train.precision, device) == "bf16":
        from simclrkit.devices import mps_supports_bf16

        if not mps_supports_bf16():
            raise ConfigError(
                "train.precision: bf16 on the MPS device needs macOS 14 or later; use fp32"
            )
    info = distributed.init_from_env(device.type, config.train.collective_timeout)
    try:
        device = process_device(config, device, info)
        # One owner per run folder for the run's whole life (runfolder.py).
        with runfolder.claim_for_job(run_dir, info):
            return _pretrain(
                config, Path(run_dir), device, info, resume=resume, force=force,
                quiet=quiet or not info.is_main,
            )
    finally:
        if info.initialized_here:
            distributed.shutdown()


def _pretrain(
    config: Config,
    run_dir: Path,
    device: torch.device,
    info: distributed.DistInfo,
    *,
    resume: bool,
    force: bool,
    quiet: bool,
) -> dict[str, Any]:
    import yaml

    from simclrkit.report import write_report

    precision = resolve_precision(config.train.precision, device)

    started = time.perf_counter()
    main = info.is_main
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=config.train.keep_last)
    state, launch_id = _state_to_resume(checkpoints, run_dir, config, resume, force, quiet)

    train_data, data_record = prepare_train_data(
        config, run_dir, state.get("data") if state else None, resuming=state is not None,
        force=force, info=info, quiet=quiet,
    )
    plan = config_lib.resolve(
        config,
        num_examples=len(train_data),
        native_image_size=train_data.native_size or config.data.image_size or 224,
        in_channels=train_data.num_channels,
        world_size=info.world_size,
    )
    if train_data.native_size is None and config.data.image_size is None:
        raise ConfigError(
            "data.image_size: images of a folder vary in size; set the training size, "
            "e.g. data.image_size=224"
        )
    arch = architecture(config, plan)
    if state is not None:
        _check_same_model(state["architecture"], arch)
    # What the run will allocate, against what the machine has, before anything is built.
    check_training_memory(
        arch, batch_per_device=plan.batch_size_per_device,
        micro_batch_size=config.train.micro_batch_size, device=device, precision=precision,
    )
    if main:
        text = yaml.safe_dump(config_lib.to_dict(config), sort_keys=False)
        atomic_write(run_dir / "config.yaml", lambda handle: handle.write(text.encode()))
    if not quiet:
        print(f"simclrkit: {len(train_data)} training images; {plan}", file=sys.stderr)

    torch.manual_seed(config.seed)
    model = build_model(arch).to(device)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if config.train.sync_bn:
        model = distributed.convert_sync_batchnorm(model)  # same parameters, shared
    # The probe exists where the checkpoint's optimiser state has its group (monitors.py).
    with_probe = "probe" in state.get("monitor", {}) if state else config.eval.online_probe
    autocast = _autocast_factory(device, precision)
    monitor = TrainingMonitor.build(config, plan, model, train_data, device, info, quiet,
                                    with_probe=with_probe, autocast=autocast)  # fmt: skip
    optimizer = build_optimizer(
        config.optim.name,
        parameter_groups(model, weight_decay=config.optim.weight_decay,
                         extra_excluded=monitor.modules()),  # fmt: skip
        lr=plan.scaled_lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        trust_coefficient=config.optim.trust_coefficient,
    )
    schedule = WarmupCosineSchedule(
        total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=plan.scaled_lr
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_step, skipped_steps, train_seconds = 0, 0, 0.0
    last_record: dict[str, Any] | None = None  # the newest metrics line, kept in checkpoints
    if state is not None:
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        monitor.load_state_dict(state.get("monitor"))
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step = state["step"]
        skipped_steps = state.get("skipped_steps", 0)
        train_seconds = state.get("train_seconds", 0.0)
        last_record = state.get("last_record")
    # The module that runs forward passes; `model` stays the plain one (state dicts, eval).
    forward_model = _forward_module(model, device, config.train.compile)

    # Negatives from every process (paper §2.2); a single process keeps the plain loss.
    gather = distributed.gather_with_grad if info.world_size > 1 else None
    loss_fn = NTXentLoss(
        temperature=config.loss.temperature, chunk_size=config.loss.chunk_size, gather=gather,
        hidden_norm=config.loss.hidden_norm, reduction=config.loss.reduction,
    )
    augment = build_augment(config, plan.image_size, plan.blur)
    batches = _step_source(train_data, augment, config, plan, info, device, quiet)
    ledger = BadFileLedger(
        config.data.max_bad_fraction, len(train_data),
        train_data.path if isinstance(train_data, ImageFiles) else str,
        list_path=run_dir / "bad_files.txt", is_main=main,
        state=state.get("bad_files") if state else None,
    )  # fmt: skip
    log = RunLog(run_dir, main, resumed_at=start_step if state else None)
    if start_step < plan.total_steps:  # a finished run resumed trains nothing: no new event
        log.write({"event": "resume" if state else "start", "step": start_step, "time": time.time()})

    def save(step: int) -> None:
        # The last optimiser step is checked by no gradient after it: a step that made the
        # weights non-finite (a huge weight decay, say) must never become the checkpoint.
        if distributed.all_reduce_any(not _weights_finite(model)):
            raise NonFiniteLossError(
                f"the optimiser step at step {step} made the weights non-finite; nothing was "
                "checkpointed after it. Lower optim.lr or optim.weight_decay, or check the data."
            )
        # The summary reports the final checkpoint's time, so a resumed finished run matches.
        seconds = saved_seconds[0] = train_seconds + (time.perf_counter() - window_start)
        # The state is the same on every process (DDP keeps it so); rank 0 writes it.
        if not main:
            return
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
                "train_seconds": seconds,
                "world_size": info.world_size,
                "launch_id": launch_id,
                "data": data_record,
                "bad_files": ledger.state_dict(),
                "last_record": last_record,
                "monitor": monitor.state_dict(),
                **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
            },
            step,
        )

    saved_seconds = [train_seconds]  # training time as the newest checkpoint records it
    progress = Progress(plan.total_steps, start_step, quiet, config.train.log_every)
    flops = training_flops_per_image(arch), peak_flops(device, precision)  # for MFU
    model.train()
    window_start, window_images = time.perf_counter(), 0
    workers = auto_workers(
        config.data.num_workers, in_memory=isinstance(train_data, ImageArray),
        device_type=device.type,
    )
    feed = DeviceFeed(
        batch_stream(batches, start_step, plan.total_steps, num_workers=workers,
                     prefetch=config.data.prefetch, pin_memory=device.type == "cuda"),
        augment, device, memory_format,
    )  # fmt: skip
    with StopRequests() as stop, contextlib.closing(feed):
        for step in range(start_step, plan.total_steps):
            batch, views = next(feed)
            ledger.add(batch.reads, batch.bad)

            lr = schedule.apply(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
            loss, z1, z2, h = contrastive_backward(
                forward_model, views, loss_fn, micro_batch_size=config.train.micro_batch_size,
                autocast=autocast, scaler=scaler,
            )
            monitor.train_probe(h, batch.indices, scaler)  # on detached h: weights unchanged
            # The step's one host sync: whether any process saw a non-finite loss or gradient
            # (fp16: only the loss; overflow is the scaler's business), and whether a stop
            # signal reached any process, which then all stop after this same step.
            nonfinite, stopping = distributed.all_reduce_flags(
                _nonfinite(loss, model, gradients=scaler is None), stop.signal_name is not None
            )
            if not nonfinite:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
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
            window_images += plan.global_batch_size
            record = None
            log_now = done % config.train.log_every == 0 or done == plan.total_steps
            save_now = done % config.train.checkpoint_every == 0 or done == plan.total_steps
            if log_now or save_now or stopping:
                ledger.sync()  # the bad-file counts of every process, before they are saved
            if log_now:
                now = time.perf_counter()
                train_seconds += now - window_start
                probe_window = monitor.log_values()  # the probe's loss and accuracy, all ranks
                timing = _step_time(feed, now - window_start, window_images, plan, *flops)
                record = {
                    "step": done,
                    "epoch": done / plan.steps_per_epoch,
                    "loss": distributed.all_reduce_mean(loss).item(),  # over the global batch
                    "contrastive_acc": _contrastive_accuracy(z1, z2),
                    "lr": lr,
                    "images_per_second": window_images / max(now - window_start, 1e-9),
                    "skipped_steps": skipped_steps,
                    **({"bad_files": len(ledger.bad)} if ledger.reads else {}),
                    **timing,
                    **probe_window,
                }
                log.write(record, _TRAIN_SCALARS + tuple(timing) + tuple(probe_window), "train/")
                last_record = record
                window_start, window_images = time.perf_counter(), 0
            if monitor.due(done, plan.total_steps):
                watched = monitor.measure(model.encoder, h, z1, z2)
                if watched:
                    log.write({"event": "monitor", "step": done, **watched}, tuple(watched),
                              "monitor/")  # fmt: skip
            progress.step(done, record, monitor.latest)
            if stopping:
                save(done)
                progress.close()
                log.write({"event": "preempted", "step": done, "time": time.time()})
                log.close()
                distributed.barrier()  # nobody exits before the checkpoint is complete
                raise Preempted(done, stop.signal_name or "a signal to another process")
            if save_now:
                save(done)
    progress.close()
    distributed.barrier()  # the last checkpoint is written before any process leaves
    train_seconds = saved_seconds[0]
    if distributed.all_reduce_any(stop.signal_name is not None):
        # Asked to stop during the last step or its checkpoint: stop before the evaluation,
        # which a resume then runs (nothing is left to train).
        log.write({"event": "preempted", "step": plan.total_steps, "time": time.time()})
        log.close()
        raise Preempted(plan.total_steps, stop.signal_name or "a signal to another process")

    # Everything below is a function of the final checkpoint's state, so resuming a finished
    # run (a requeued job) reproduces the same summary instead of one of nothing trained.
    summary: dict[str, Any] = {
        "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "final_loss": (last_record or {}).get("loss"),
        "skipped_steps": skipped_steps,
        "precision": precision,
        "train_seconds": train_seconds,
        "images_per_second": plan.total_steps * plan.global_batch_size / max(train_seconds, 1e-9),
        "data": {**dataset_summary(train_data), **ledger.summary()},
        "plan": asdict(plan),
        "resumed_from_step": start_step if state else None,
        "rank": info.rank,
    }
    if config.eval.linear and train_data.labels is None and not quiet:
        print("simclrkit: no linear evaluation: the pretraining images have no labels",
              file=sys.stderr)
    # A finished run resumed (a requeued job) keeps the evaluation it wrote, not a second draw.
    resumed_at_end = start_step == plan.total_steps
    finished = _finished_summary(run_dir, plan.total_steps, config) if main and resumed_at_end else None
    finished = distributed.broadcast_object(finished)
    if finished is not None:
        # Resumed with nothing left to train: the run's summary is the one it finished with.
        summary["resumed_from_step"] = finished.get("resumed_from_step")
    if finished is not None and "eval" in finished:
        summary["eval"] = finished["eval"]
    elif config.eval.linear and train_data.labels is not None:
        summary["eval"] = _evaluate(model, arch, config, plan, device, info, workers,
                                    train_seconds, quiet)
    if summary.get("eval"):
        log.write(
            {"event": "eval", "step": plan.total_steps, **summary["eval"]},
            tuple(k for k, v in summary["eval"].items() if isinstance(v, float)),
            "eval/",
        )
    if not main:
        return summary
    log.close()
    summary["eval_settings"] = config_lib.to_dict(config)["eval"]
    summary["wall_seconds"] = time.perf_counter() - started
    jsonout.write_json(run_dir / "summary.json", summary)
    write_report(run_dir)
    if config.eval.run_page:
        _write_run_page(run_dir, device, quiet)
    return summary


def _write_run_page(run_dir: Path, device: torch.device, quiet: bool) -> None:
    """report.html (runpage.py). A finished run's results are already written: a page that
    cannot be drawn (its data moved, a plotting library missing) is said in one line, and
    ``simclrkit report`` draws it later."""
    from simclrkit.errors import UserError, describe
    from simclrkit.runpage import write_run_page

    try:
        write_run_page(run_dir, device=device)
    except (UserError, OSError, ValueError, RuntimeError, ImportError) as error:
        print(f"simclrkit: report.html not written ({describe(error)}); draw it with: "
              f"simclrkit report {run_dir}", file=sys.stderr)  # fmt: skip
        return
    if not quiet:
        print(f"simclrkit: wrote {run_dir / 'report.html'}", file=sys.stderr)


def _state_to_resume(
    checkpoints: CheckpointManager, run_dir: Path, config: Config, resume: bool, force: bool,
    quiet: bool,
) -> tuple[dict[str, Any] | None, str | None]:  # fmt: skip
    """(the checkpoint state this run continues from or None, this torchrun job's id).

    Raises:
        ConfigError: --resume without a checkpoint, a folder holding a run without --resume,
            or settings that change the result differ from the checkpoint's (without --force).
    """
    latest = checkpoints.latest()
    restart_count, launch_id = _torchrun_launch()
    state = None
    if latest is not None and (resume or restart_count):
        # Checked like any checkpoint before a model is built from it (checkpoint.py).
        state = validate_training_checkpoint(
            load_checkpoint(latest), str(latest), need_config=True, need_head=True
        )
    if not resume and state is not None:
        # torchrun restarted the workers after a failure: continue from the checkpoint this
        # same job (same rendezvous id) wrote, never from another run that is in the folder.
        if launch_id is not None and state.get("launch_id") == launch_id:
            resume = True
            if not quiet:
                print(
                    f"simclrkit: torchrun restart {restart_count}: resuming from {latest}",
                    file=sys.stderr,
                )
        else:
            state = None
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    if not resume and latest is not None:
        raise ConfigError(
            f"--run-dir: {run_dir} already holds a run; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    if state is not None:
        changed = config_differences(state["config"], config)
        if changed and not force:
            raise ConfigError(
                "--resume: the config differs from the checkpoint's in settings that change the "
                f"result ({'; '.join(changed)}); pass --force to resume anyway"
            )
    return state, launch_id


def _evaluate(
    model: SimCLR, arch: dict[str, Any], config: Config, plan: Plan, device: torch.device,
    info: distributed.DistInfo, workers: int, train_seconds: float, quiet: bool,
) -> dict[str, Any]:
    """The end-of-run evaluation (``runeval.py``) of the trained encoder and its random start."""
    from simclrkit.runeval import evaluate_run

    def random_encoder() -> torch.nn.Module:
        torch.manual_seed(config.seed)  # the exact weights this run started from
        return build_model(arch).encoder

    # A plain-BatchNorm copy under several processes: every one extracts features of its
    # own share, and SyncBatchNorm must never wait for the others there.
    encoder = model.encoder
    if info.world_size > 1:
        encoder = build_model(arch).encoder.to(device)
        encoder.load_state_dict(model.encoder.state_dict())
    return evaluate_run(
        encoder, random_encoder, config, image_size=plan.image_size, device=device,
        train_seconds=train_seconds, info=info, workers=workers, seed=config.seed, quiet=quiet,
    )


def _finished_summary(run_dir: Path, total_steps: int, config: Config) -> dict[str, Any] | None:
    """The summary.json a finished run wrote, when its evaluation is what ``config`` asks
    for (a resumed finished run keeps it rather than drawing the evaluation again)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("steps") != total_steps:
        return None
    if summary.get("eval_settings") != config_lib.to_dict(config)["eval"]:
        return None
    return summary


def _check_same_model(saved: dict[str, Any], arch: dict[str, Any]) -> None:
    """--force lets a resumed run change how it trains, never the shape of what it trains."""
    changed = [f"{key}: {saved[key]!r} -> {arch[key]!r}" for key in arch if saved[key] != arch[key]]
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint's model differs from this config's ({'; '.join(changed)}); "
            "a run cannot change its model's shape, even with --force: start a new --run-dir"
        )


def _forward_module(model: SimCLR, device: torch.device, compile: bool) -> torch.nn.Module:
    """The module the steps run: DDP-wrapped under several processes, then compiled if asked,
    as PyTorch recommends (its DDPOptimizer splits the graph at the gradient buckets, so the
    all-reduces still overlap the backward pass)."""
    forward_model = distributed.wrap_ddp(model, device)
    if compile:
        forward_model = torch.compile(forward_model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes are fixed for the whole run
    return forward_model


def _step_time(
    feed: DeviceFeed, seconds: float, images: int, plan: Plan, flops_per_image: float,
    peak: float | None,
) -> dict[str, float]:  # fmt: skip
    """The log window's step-time breakdown (``throughput.breakdown``) for this process."""
    window = feed.window()
    return breakdown(
        seconds=seconds, steps=images // plan.global_batch_size,
        images=images // plan.world_size, data_wait=window["data_wait_s"],
        feed=window["feed_s"], h2d_bytes=window["h2d_bytes"], flops_per_image=flops_per_image,
        peak=peak,
    )


def _weights_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer is finite (one host sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    # isfinite per tensor, not a sum: large finite weights can sum to infinity.
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())
