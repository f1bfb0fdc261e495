"""Distillation on unlabelled images (SimCLRv2 §2.3): a fine-tuned teacher teaches a student.

The teacher (a file holding a classifier: ``simclrkit evaluate --protocol finetune``'s
``finetuned_*.pt``, a distilled student, or an imported TF model) labels every training image
with its class distribution; the labels the images may have are not used. The student (the
``model`` section's encoder, with a linear classifier on h) learns to match it, Eq. 3:

    L = - sum_i sum_y P_T(y | x_i; tau) log P_S(y | x_i; tau),  P(y | x; tau) = softmax(logits / tau)

averaged over the batch and multiplied by tau^2 (as the reference's distillation colab does, so
the gradients keep their scale across temperatures; the paper uses tau = 1). With
``distill.alpha < 1`` the loss is ``alpha * L + (1 - alpha) * CE`` where CE is the cross-entropy
on a batch of the class-balanced labelled subset (``distill.label_fraction``; the subset
``simclrkit evaluate --protocol finetune`` draws with the same seed), the paper's weighted
combination.

As the paper: the teacher is fixed (eval mode, no gradient) and sees the same view as the
student; views are random crop and flip only (``evaluate.eval_views``); the optimiser, learning
rate schedule, weight decay and batch are pretraining's (``optim``, ``train``). Self-distillation
is a student of the teacher's architecture (``distill.student_init=teacher`` starts it from the
teacher's weights instead of from scratch).

The run is pretraining's: the same run folder (``config.yaml``, ``metrics.jsonl``,
TensorBoard, ``checkpoints/``, ``summary.json``, ``report.md``), the same step counting
(``config.resolve``, ``pipeline.StepOrder``), checkpoints every ``train.checkpoint_every``
steps, SIGTERM/SIGINT -> checkpoint and exit 143, and exact resume: a step's batch and views
are functions of (seed, step), so a run resumed after a kill ends bit-identical to one that
never stopped. The checkpoint records the teacher's sha256; resuming with another teacher is
refused. The student's checkpoint is a classifier file like the teacher's, so evaluate,
export, ``load_classifier`` and a further distillation take it.

Several processes (``torchrun``) split each global batch as pretraining does
(``pipeline.StepOrder``: rank r takes rows [r b, (r + 1) b)): every process runs the teacher on
its own rows, the student is wrapped in DDP (gradients averaged, which with equal shares is
the gradient of the global batch's mean loss) and its BatchNorms normalise over the global
batch (``train.sync_bn``), so W processes train the 1-process run to float rounding. With
``alpha < 1`` the labelled views ride in the same student forward as the unlabelled ones (one
forward per backward, as DDP needs), and the labelled batch is cut to a multiple of W. Rank 0
writes the run folder; the stop signal and the finiteness check are agreed in one reduction.

Cost per step: one teacher forward and one student forward and backward on B (+ labelled)
views, per process B / W of them, and one all-reduce of the student's gradients (DDP overlaps
it with the backward). On ImageNet, distilling a ResNet-152 3x into a ResNet-50 for the
paper's 400 epochs (1.28M images, B 4096: 125k steps) is dominated by the teacher's forward,
about 3x the student's: a job for 8-64 GPUs, which this loop spreads over as torchrun starts.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simclrkit import config as config_lib
from simclrkit import distributed, jsonout, runfolder
from simclrkit.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    atomic_write,
    load_checkpoint,
    validate_training_checkpoint,
)
from simclrkit.classifier import Classifier, from_model
from simclrkit.config import Config, ConfigError
from simclrkit.data import load_dataset
from simclrkit.devices import select_device
from simclrkit.evaluate import _test_batches, eval_views, top_k_accuracies
from simclrkit.export import load_classifier
from simclrkit.finetune import class_balanced_subset
from simclrkit.modelcard import sha256_of
from simclrkit.models import build_model
from simclrkit.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from simclrkit.pipeline import StepOrder
from simclrkit.runloop import Preempted, Progress, RunLog, StopRequests
from simclrkit.train import NonFiniteLossError, architecture, config_differences, process_device

_SCALARS = ("loss", "distill_loss", "teacher_agreement", "lr", "images_per_second")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:  # fmt: skip
    """Eq. 3 of SimCLRv2, averaged over the batch, times tau^2 (module docstring).

    Args:
        student_logits, teacher_logits: (B, K).
        temperature: tau > 0.

    Returns:
        A scalar tensor (differentiable in ``student_logits``).
    """
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(teacher * student).sum(dim=1).mean() * temperature**2


def distill(
    config: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Distils ``config.distill.teacher`` into a student built from ``config.model``.

    Writes the run folder (module docstring) and returns the summary: ``steps``,
    ``final_loss``, ``train_seconds``, ``images_per_second``, the student's and the teacher's
    test accuracy (``student_top1``, ``teacher_top1``, ...) where the data has a labelled test
    split, and the teacher's file and sha256.

    Raises:
        ConfigError: no or an unusable teacher, a student the teacher cannot teach (other image
            size or channels), a run folder in use or holding a run without ``resume``,
            or settings that differ from the checkpoint's without ``force``.
        CheckpointError: the teacher or the checkpoint is damaged.
        Preempted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step exists.
        NonFiniteLossError: the loss stopped being finite.
    """
    if config.distill.teacher is None:
        raise ConfigError(
            "distill.teacher: not set; name a fine-tuned network, e.g. distill.teacher="
            "runs/latest/eval/finetuned_10pct_seed0.pt (written by simclrkit evaluate "
            "CHECKPOINT --protocol finetune)"
        )
    device = select_device(config.train.device)
    info = distributed.init_from_env(device.type, config.train.collective_timeout)
    try:
        device = process_device(config, device, info)
        with runfolder.claim_for_job(run_dir, info):
            return _distill(config, Path(run_dir), device, info, resume=resume, force=force,
                            quiet=quiet or not info.is_main)  # fmt: skip
    finally:
        if info.initialized_here:
            distributed.shutdown()


def _distill(config: Config, run_dir: Path, device: torch.device, info: distributed.DistInfo, *,
             resume: bool, force: bool, quiet: bool) -> dict[str, Any]:  # fmt: skip
    import yaml

    started = time.perf_counter()
    main = info.is_main
    teacher_path = Path(config.distill.teacher)
    teacher = load_classifier(teacher_path, device)
    teacher_sha = sha256_of(teacher_path)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=config.train.keep_last)
    state = _state_to_resume(checkpoints, run_dir, config, teacher_sha, resume, force)

    data = config.data
    train = load_dataset(data.dataset, data.root, "train", quiet=True,
                         max_bad_fraction=data.max_bad_fraction, check="decode")  # fmt: skip
    test = _labelled_test(config)
    plan = config_lib.resolve(
        config, num_examples=len(train),
        native_image_size=train.native_size or data.image_size or 224,
        in_channels=train.num_channels, world_size=info.world_size,
    )
    arch = architecture(config, plan)
    for key in ("image_size", "in_channels"):
        if arch[key] != teacher.architecture[key]:
            raise ConfigError(
                f"distill.teacher: the teacher takes {key} {teacher.architecture[key]}, the "
                f"student's data gives {arch[key]}; distil on the teacher's kind of images "
                "(data.dataset, data.image_size)"
            )
    labelled = None
    if config.distill.alpha < 1:
        if train.labels is None:
            raise ConfigError(
                f"distill.alpha={config.distill.alpha}: the labelled loss needs labels, and "
                f"'{data.dataset}' has none; use distill.alpha=1"
            )
        labelled = class_balanced_subset(train.labels.numpy(), config.distill.label_fraction,
                                         config.seed)  # fmt: skip
        if len(labelled) < info.world_size:
            raise ConfigError(
                f"distill.label_fraction={config.distill.label_fraction}: {len(labelled)} "
                f"labelled images cannot be shared by {info.world_size} processes; raise it"
            )
    if not quiet:
        print(f"simclrkit distill: teacher {teacher_path} ({teacher.num_classes} classes), "
              f"{len(train)} images without their labels; {plan}", file=sys.stderr)  # fmt: skip
    if main:
        text = yaml.safe_dump(config_lib.to_dict(config), sort_keys=False)
        atomic_write(run_dir / "config.yaml", lambda handle: handle.write(text.encode()))

    student, student_head = _student(config, arch, teacher)
    student = student.to(device)
    if config.train.sync_bn:
        student = distributed.convert_sync_batchnorm(student)  # same parameters, shared
    optimizer = build_optimizer(
        config.optim.name,
        parameter_groups(student, weight_decay=config.optim.weight_decay,
                         extra_excluded=[student.classifier]),  # fmt: skip
        lr=plan.scaled_lr, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay, trust_coefficient=config.optim.trust_coefficient,
    )
    schedule = WarmupCosineSchedule(plan.total_steps, plan.warmup_steps, plan.scaled_lr)
    start_step, train_seconds, last_record = 0, 0.0, None
    if state is not None:
        student.encoder.load_state_dict(state["encoder"])
        student.classifier.load_state_dict(state["classifier"])
        if student_head is not None:  # holds the student's head layers
            student_head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step, train_seconds = state["step"], state.get("train_seconds", 0.0)
        last_record = state.get("last_record")

    # The module that runs forward passes; `student` stays the plain one (state, evaluation).
    forward_student = distributed.wrap_ddp(student, device)
    world = info.rank, info.world_size
    order = StepOrder(config.seed, plan.images_per_epoch, len(train), plan.global_batch_size,
                      *world)  # fmt: skip
    labelled_order = None
    if labelled is not None:  # a global labelled batch every process takes an equal share of
        labelled_batch = min(plan.global_batch_size, len(labelled) // info.world_size * info.world_size)
        labelled_order = StepOrder(config.seed + 1, len(labelled), len(labelled), labelled_batch,
                                   *world)  # fmt: skip

    def views(source: Any, epochs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(indices), arch["in_channels"], arch["image_size"], arch["image_size"])
        for epoch in torch.unique(epochs).tolist():  # a step may straddle two epochs
            rows = epochs == epoch
            out[rows] = eval_views(source, indices[rows], arch["image_size"], train=True,
                                   seed=config.seed, epoch=epoch)  # fmt: skip
        return out.to(device)

    def save(step: int) -> None:
        # The state is the same on every process (DDP keeps it so); rank 0 writes it, and
        # nobody goes on (or exits) before the checkpoint is complete.
        if not main:
            distributed.barrier()
            return
        checkpoints.save({
            "format_version": FORMAT_VERSION,
            "step": step,
            **student.state_parts(student_head),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": config_lib.to_dict(config),
            "architecture": arch,
            "train_seconds": train_seconds + time.perf_counter() - window_start,
            "last_record": last_record,
            "teacher": {"file": str(teacher_path), "sha256": teacher_sha},
        }, step)  # fmt: skip
        distributed.barrier()

    log = RunLog(run_dir, main, resumed_at=start_step if state else None)
    if start_step < plan.total_steps:
        log.write({"event": "resume" if state else "start", "step": start_step, "time": time.time()})
    progress = Progress(plan.total_steps, start_step, quiet, config.train.log_every)
    student.train()
    window_start, window_images = time.perf_counter(), 0
    with StopRequests() as stop:
        for step in range(start_step, plan.total_steps):
            x = views(train, *order.indices(step))
            with torch.no_grad():
                teacher_logits = teacher(x)
            if labelled_order is None:
                student_logits = forward_student(x)
            else:  # one forward for both batches (BN sees them together)
                epochs, rows = labelled_order.indices(step)
                chosen = torch.as_tensor(labelled)[rows]
                both = forward_student(torch.cat([x, views(train, epochs, chosen)]))
                student_logits, logits = both[: len(x)], both[len(x) :]
            distill_loss = distillation_loss(student_logits, teacher_logits,
                                             config.distill.temperature)  # fmt: skip
            loss = config.distill.alpha * distill_loss
            if labelled_order is not None:
                supervised = F.cross_entropy(logits, train.labels[chosen].to(device))
                loss = loss + (1 - config.distill.alpha) * supervised
            lr = schedule.apply(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nonfinite, stopping = distributed.all_reduce_flags(
                ~torch.isfinite(loss), stop.signal_name is not None)
            if nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1}; stopped before the optimiser step, "
                    "the last checkpoint is from before it. Lower optim.lr, or check the "
                    "teacher's outputs"
                )
            optimizer.step()
            done = step + 1
            window_images += len(x) * info.world_size
            record = None
            if done % config.train.log_every == 0 or done == plan.total_steps:
                now = time.perf_counter()
                train_seconds += now - window_start
                record = {
                    # over the global batch
                    "step": done, "epoch": done / plan.steps_per_epoch,
                    "loss": distributed.all_reduce_mean(loss.detach()).item(),
                    "distill_loss": distributed.all_reduce_mean(distill_loss.detach()).item(),
                    "lr": lr,
                    "teacher_agreement": distributed.all_reduce_mean(
                        (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
                    ).item(),
                    "images_per_second": window_images / max(now - window_start, 1e-9),
                }  # fmt: skip
                log.write(record, _SCALARS, "train/")
                last_record = record
                window_start, window_images = time.perf_counter(), 0
            progress.step(done, record, {})
            if stopping:  # a signal to any process stops them all after the same step
                save(done)
                progress.close()
                log.write({"event": "preempted", "step": done, "time": time.time()})
                log.close()
                raise Preempted(done, stop.signal_name or "a signal to another process")
            if done % config.train.checkpoint_every == 0 or done == plan.total_steps:
                save(done)
    progress.close()
    if state is not None and start_step == plan.total_steps:
        train_seconds = state.get("train_seconds", 0.0)
    if not main:  # rank 0 evaluates and writes the summary
        return {}

    summary: dict[str, Any] = {
        "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "final_loss": (last_record or {}).get("loss"),
        "train_seconds": train_seconds,
        "images_per_second": plan.total_steps * plan.global_batch_size / max(train_seconds, 1e-9),
        "teacher": {"file": str(teacher_path), "sha256": teacher_sha,
                    "architecture": teacher.architecture},  # fmt: skip
        "student": {"architecture": arch, "init": config.distill.student_init},
        "temperature": config.distill.temperature,
        "alpha": config.distill.alpha,
        "num_labelled": None if labelled is None else len(labelled),
        "resumed_from_step": start_step if state else None,
    }
    if test is not None:
        student.eval()
        scores = {name: _test_scores(network, test, arch["image_size"], device)
                  for name, network in (("student", student), ("teacher", teacher))}  # fmt: skip
        for name, logits in scores.items():
            summary[f"{name}_top1"], summary[f"{name}_top5"] = top_k_accuracies(
                logits, test.labels)
        summary["test_agreement"] = float(
            (scores["student"].argmax(1) == scores["teacher"].argmax(1)).float().mean())
        log.write({"event": "eval", "step": plan.total_steps,
                   **{k: summary[k] for k in ("student_top1", "teacher_top1")}},
                  ("student_top1", "teacher_top1"), "eval/")  # fmt: skip
    log.close()
    summary["wall_seconds"] = time.perf_counter() - started
    jsonout.write_json(run_dir / "summary.json", summary)
    _write_report(run_dir, summary)
    return summary


def _student(config: Config, arch: dict[str, Any],
             teacher: Classifier) -> tuple[Classifier, nn.Module | None]:  # fmt: skip
    """The student and the projection head its checkpoints store (None: it reads h).

    ``random``: ``arch``'s encoder with a linear classifier on h, seeded by the run's seed.
    ``teacher``: a copy of the teacher (encoder, the head layers it reads through and its
    classifier); the head's later layers, which it never uses, are stored freshly initialised.
    """
    torch.manual_seed(config.seed)
    model = build_model(arch)
    if config.distill.student_init == "random":
        return from_model(model, 0, None, num_classes=teacher.num_classes), None
    keys = ("encoder", "width", "cifar_stem", "sk_ratio", "se_ratio", "head", "head_layers",
            "proj_dim")  # fmt: skip
    mine = {k: arch.get(k, 0.0) for k in keys}
    theirs = {k: teacher.architecture.get(k, 0.0) for k in keys}
    if mine != theirs:
        raise ConfigError(
            f"distill.student_init=teacher: the student ({mine}) must be the teacher's "
            f"architecture ({theirs}); set model.* to match, or use distill.student_init=random"
        )
    student = copy.deepcopy(teacher).cpu().train()
    for index, layer in enumerate(student.head_layers):
        model.head.layers[index] = layer
    return student, model.head if student.proj_selector else None


def _labelled_test(config: Config) -> Any:
    """The data's labelled test split, or None (an unlabelled folder: no test accuracy)."""
    try:
        test = load_dataset(config.data.dataset, config.data.root, "test", quiet=True,
                            max_bad_fraction=config.data.max_bad_fraction, check="decode")
    except (ConfigError, ValueError):
        return None
    return test if test.labels is not None else None


@torch.no_grad()
def _test_scores(network: nn.Module, test: Any, image_size: int,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """Logits (N, K) of the test split's test-time views, in order."""
    return torch.cat([network(x.to(device)).float().cpu()
                      for _, x in _test_batches(test, image_size, 512)])  # fmt: skip


def _state_to_resume(checkpoints: CheckpointManager, run_dir: Path, config: Config,
                     teacher_sha: str, resume: bool, force: bool) -> dict[str, Any] | None:  # fmt: skip
    """The checkpoint to continue from, or None for a new run (refusals as pretraining's)."""
    latest = checkpoints.latest()
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    if not resume:
        if latest is not None:
            raise ConfigError(
                f"--run-dir: {run_dir} already holds a run; pass --resume to continue it, "
                "or choose another --run-dir"
            )
        return None
    state = validate_training_checkpoint(load_checkpoint(latest), str(latest), need_config=True)
    if state.get("teacher", {}).get("sha256") != teacher_sha:
        raise ConfigError(
            f"--resume: distill.teacher is not the file this run was distilled from (its sha256 "
            f"differs from the checkpoint's, {state.get('teacher', {}).get('file')}); a run "
            "cannot change its teacher: start a new --run-dir"
        )
    changed = config_differences(state["config"], config)
    if changed and not force:
        raise ConfigError(
            "--resume: the config differs from the checkpoint's in settings that change the "
            f"result ({'; '.join(changed)}); pass --force to resume anyway"
        )
    return state


def _write_report(run_dir: Path, summary: dict[str, Any]) -> None:
    """``report.md``: what was distilled into what, and how well it does."""
    teacher, student = summary["teacher"]["architecture"], summary["student"]["architecture"]

    def describe(arch: dict[str, Any]) -> str:
        extra = "".join(f", {k} {arch[k]}" for k in ("sk_ratio", "se_ratio") if arch.get(k))
        return f"{arch['encoder']} width {arch['width']}{extra}"

    lines = [
        "# Distillation",
        "",
        f"- teacher: `{summary['teacher']['file']}` ({describe(teacher)})",
        f"- student: {describe(student)}, from {summary['student']['init']} weights",
        f"- {summary['steps']} steps ({summary['epochs']:.1f} epochs) in "
        f"{summary['train_seconds']:.0f} s; temperature {summary['temperature']}, "
        f"alpha {summary['alpha']}; final loss {summary['final_loss']:.4f}",
    ]
    if "student_top1" in summary:
        lines += [
            "",
            "| network | test top-1 | test top-5 |",
            "| --- | --- | --- |",
            f"| teacher | {summary['teacher_top1']:.4f} | {summary['teacher_top5']:.4f} |",
            f"| student | {summary['student_top1']:.4f} | {summary['student_top5']:.4f} |",
            "",
            f"The student agrees with the teacher on {summary['test_agreement']:.1%} of the "
            "test images.",
        ]
    text = "\n".join(lines) + "\n"
    atomic_write(run_dir / "report.md", lambda handle: handle.write(text.encode()))

