"""Run configuration: frozen, keyword-only dataclasses, YAML recipes and dotted overrides.

Config flows one way (see the README): the command line and a YAML file are merged into a
plain nested dict, validated into a frozen :class:`Config`, and :func:`resolve` derives every
computed value (global and per-device batch, scaled learning rate, steps) exactly once.
Nothing mutates a config after it is built; builders below ``train.py`` receive explicit
arguments, never the whole config.

Every user mistake raises :class:`ConfigError`, whose message names the key, what was given
and what is allowed; the command line turns it into exit code 2 without a traceback.

Every number must be finite, and every integer fits in 64 bits. Settings that size memory
(image size, width, projection size, head depth, loader processes) have plain upper bounds,
the ``MAX_*`` constants below: far above any published SimCLR setting, they turn a typo (an
extra zero) into an error before anything is built, where it would otherwise overflow or ask
for terabytes later. ``budget.py`` then checks the memory the run as a whole needs.

Defaults follow the paper's ImageNet setting (Chen et al. 2020, §2.3 and App. B.1) unless a
field says otherwise; recipes in ``configs/`` override them per dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from simclrkit.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message names the key and the fix."""


# --------------------------------------------------------------------------------------
# Sections. Each field's metadata "help" is shown by `simclrkit pretrain --help-config`.
# --------------------------------------------------------------------------------------

DATASETS = (
    "mnist5k",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "stl10",
    "imagefolder",
    "folder",
    "filelist",
    "shards",
)
FILE_DATASETS = ("imagefolder", "folder", "filelist", "shards")
# Labelled in memory, pretraining on exactly the train split: data.holdout can split it.
HOLDOUT_DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100")
ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
BOTTLENECK_ENCODERS = ENCODERS[2:]  # where SimCLRv2's blocks apply (models.py builds them)

# Upper bounds against typos (see the module docstring). Each message names its constant: a
# real need for more is a one-line change here.
MAX_INT = 2**63 - 1  # every integer setting: what an int64 tensor or array holds
# torch.manual_seed and torch.Generator.manual_seed take 0 <= seed < 2**64 (train.py, pipeline.py;
# numpy's default_rng, the other user, takes any non-negative integer).
MAX_SEED = 2**64 - 1
# 4096 px is 18x ImageNet's 224 (SimCLR's size) and 4x the largest sizes vision backbones
# train at; one 3-channel view alone is 200 MB as float32, a ResNet-50's activations several GB.
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 16.0  # SimCLRv2 trains widths up to 3x, the reference up to 4x
MAX_PROJ_DIM = 65536  # the paper uses 128 and finds larger sizes no better (Fig. B.12)
MAX_HEAD_LAYERS = 8  # SimCLR uses 2, SimCLRv2 3 and compares up to 4
MAX_WORKERS = 256  # loader processes per training process: more than cores only costs memory
MAX_EPOCHS = 1_000_000.0  # the paper's longest runs are 1,000 epochs (800 for SimCLRv2)
# The paper's base rates are 0.075 to 1.0 (4.8 after scaling). Training runs in float32, whose
# largest number is 3.4e38: at most 1e9, the rate scaled by any legal batch (linear: x batch /
# 256 <= 3.6e16) stays far inside it, where 1e300 would be infinite from the first step.
MAX_LR = 1e9
# Numbers that enter the maths: past these, the first step overflows float32 (the logits are
# 1/temperature-scaled, jitter factors scale pixels, the trust ratio scales every update), and
# the run would stop on a non-finite loss with advice that does not fit.
MIN_TEMPERATURE = 1e-3  # Table 5 goes down to 0.05; 1/1e-3 keeps the logits finite
MAX_JITTER_STRENGTH = 100.0  # s: the paper uses 0.5 and 1.0 and plots up to 1.0
MAX_TRUST_COEFFICIENT = 10.0  # LARS' eta: the reference uses 0.001
MAX_TIMEOUT = 7 * 24 * 3600.0  # seconds; datetime.timedelta overflows not far above


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which images to pretrain on, and how they are read (SPEC §2; DATA.md)."""

    dataset: str = "mnist5k"
    root: str | None = None
    image_size: int | None = None  # None: the dataset's native size
    # Loader processes; auto: none for images in memory, a share of the cores for files.
    num_workers: int | Literal["auto"] = "auto"
    prefetch: bool = True  # a thread assembles the next batch during the step
    # Where the per-pixel augmentation runs (devicefeed.py). host: every view is finished on
    # the CPU (compiled kernels) and crosses as float32. device: the batch crosses as uint8 in
    # pinned memory and the training device finishes it, batched: for images in memory the
    # whole transform, for files the colour half after the loader's uint8 crops. auto: device
    # when training on an accelerator, host on the CPU.
    augment_on: Literal["auto", "host", "device"] = "auto"
    # Image files: who decodes JPEGs. loader: the loader workers, with Pillow (at a reduced
    # scale where the crops allow). device: the workers only read; the training device decodes
    # the step's JPEGs in one batched call (nvJPEG on CUDA; jpegdevice.py) and crops them
    # there; needs augment_on to resolve to device. Falls back to loader, saying so, where
    # the device cannot decode.
    decode_on: Literal["loader", "device"] = "loader"
    max_bad_fraction: float = 0.01
    # File datasets: a prebuilt index (simclrkit index ROOT --out FILE) instead of a listing.
    index: str | None = None
    # File datasets: check every file before training (header, decode) or not (none: bad
    # files are found when read and replaced).
    check_files: Literal["none", "header", "decode"] = "none"
    reduced_decode: bool = True  # JPEGs decoded at the smallest scale that covers the crops
    # Tuning: hold out this many labelled TRAINING images (stratified, fixed seed) as the split
    # the run reports on; pretraining and the probes use the rest; the test split is unused.
    holdout: int = 0

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _non_negative("data.holdout", self.holdout)
        if self.holdout and self.dataset not in HOLDOUT_DATASETS:
            raise ConfigError(
                f"data.holdout: a validation split is carved from the labelled training images "
                f"that pretraining uses, which dataset '{self.dataset}' does not have; use one "
                f"of {', '.join(HOLDOUT_DATASETS)}, or data.holdout=0"
            )
        if self.image_size is not None:
            _positive("data.image_size", self.image_size)
            _at_most("data.image_size", self.image_size, MAX_IMAGE_SIZE, "MAX_IMAGE_SIZE")
        if self.num_workers != "auto":
            _non_negative("data.num_workers", self.num_workers)
            _at_most("data.num_workers", self.num_workers, MAX_WORKERS, "MAX_WORKERS")
        _fraction("data.max_bad_fraction", self.max_bad_fraction)
        if self.dataset in FILE_DATASETS and not (self.root or self.index):
            raise ConfigError(
                f"data.root: dataset '{self.dataset}' needs a path; pass data.root=DIR"
            )
        if self.index and self.dataset not in FILE_DATASETS:
            raise ConfigError(
                f"data.index: an index lists image files; dataset '{self.dataset}' has none "
                f"(use one of {', '.join(FILE_DATASETS)})"
            )


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """The SimCLR view distribution (paper §3, App. A; reference data_util.py)."""

    # s: auto is the paper's 0.5 for images of <= 32 px (CIFAR-10, App. B.9) and 1.0 above
    # (ImageNet), decided like the blur; the plan prints the value chosen
    color_jitter_strength: float | Literal["auto"] = "auto"
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur: bool | None = None  # None: on for images larger than 32 px (paper App. B.9)
    blur_prob: float = 0.5
    crop_min_scale: float = 0.08
    flip_prob: float = 0.5
    brightness: Literal["multiplicative", "additive"] = "multiplicative"  # v2 / v1
    # torchvision's RandomResizedCrop, or the reference's TF sample_distorted_bounding_box
    # (min_object_covered 0.1, 100 attempts, whole image on failure; augment.py)
    crop_sampler: Literal["torchvision", "reference"] = "torchvision"

    def __post_init__(self) -> None:
        if self.color_jitter_strength != "auto":
            _non_negative("augment.color_jitter_strength", self.color_jitter_strength)
            _at_most("augment.color_jitter_strength", self.color_jitter_strength,
                     MAX_JITTER_STRENGTH, "MAX_JITTER_STRENGTH")
        for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
            _fraction(f"augment.{key}", getattr(self, key))
        if not (_is_number(self.crop_min_scale) and 0.0 < self.crop_min_scale <= 1.0):
            raise ConfigError(
                f"augment.crop_min_scale: got {_show(self.crop_min_scale)}; allowed: 0 < value <= 1"
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Encoder and projection head (paper §2.3, §4.2, B.9; SimCLRv2 §2)."""

    encoder: str = "resnet50"
    width: float = 1.0
    cifar_stem: bool | None = None  # None: automatic, CIFAR stem for images <= 32 px
    head: Literal["nonlinear", "linear", "none"] = "nonlinear"
    head_layers: int = 2  # 2 = SimCLRv1, 3 = SimCLRv2
    proj_dim: int = 128
    # SimCLRv2 §2: selective kernels (with ResNet-D's stem and shortcuts; the released models
    # use 0.0625) and squeeze-excitation, in bottleneck ResNets (50+); 0 turns each off
    sk_ratio: float = 0.0
    se_ratio: float = 0.0

    def __post_init__(self) -> None:
        _choice("model.encoder", self.encoder, ENCODERS)
        for key in ("sk_ratio", "se_ratio"):
            _fraction(f"model.{key}", getattr(self, key))
            if getattr(self, key) and self.encoder not in BOTTLENECK_ENCODERS:
                raise ConfigError(
                    f"model.{key}: SimCLRv2's blocks are bottlenecks; use "
                    f"{', '.join(BOTTLENECK_ENCODERS)} with it, or model.{key}=0"
                )
        _positive("model.width", self.width)
        _at_most("model.width", self.width, MAX_WIDTH, "MAX_WIDTH")
        _positive("model.head_layers", self.head_layers)
        _at_most("model.head_layers", self.head_layers, MAX_HEAD_LAYERS, "MAX_HEAD_LAYERS")
        _positive("model.proj_dim", self.proj_dim)
        _at_most("model.proj_dim", self.proj_dim, MAX_PROJ_DIM, "MAX_PROJ_DIM")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """NT-Xent (paper Eq. 1, Table 5)."""

    temperature: float = 0.1
    chunk_size: int | None = None  # None: automatic (chunked for large batches)
    hidden_norm: bool = True  # L2-normalise z (cosine similarity); False: Table 5's dot product
    # reference: loss_a + loss_b as objective.py (2x the Eq. 1 mean; LARS and weight decay then
    # take the reference's steps); mean: the Eq. 1 mean over the 2N anchors (losses.py)
    reduction: Literal["reference", "mean"] = "reference"

    def __post_init__(self) -> None:
        _positive("loss.temperature", self.temperature, "(0.1 for ImageNet, 0.5 for CIFAR-10)")
        if self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"loss.temperature: got {_show(self.temperature)}; allowed: at least "
                f"{MIN_TEMPERATURE} (1/temperature scales the logits; below that they overflow; "
                "the paper uses 0.1 for ImageNet, 0.5 for CIFAR-10)"
            )
        if self.chunk_size is not None:
            _positive("loss.chunk_size", self.chunk_size)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and schedule (paper §2.3, App. B.1; reference lars_optimizer.py)."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3  # base learning rate, before lr_scaling
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    warmup_epochs: float = 10.0

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _at_most("optim.lr", self.lr, MAX_LR, "MAX_LR")
        if not (_is_number(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ConfigError(
                f"optim.momentum: got {_show(self.momentum)}; allowed: 0 <= value < 1"
            )
        _non_negative("optim.weight_decay", self.weight_decay)
        _positive("optim.trust_coefficient", self.trust_coefficient)
        _at_most("optim.trust_coefficient", self.trust_coefficient, MAX_TRUST_COEFFICIENT,
                 "MAX_TRUST_COEFFICIENT")
        _non_negative("optim.warmup_epochs", self.warmup_epochs)
        _at_most("optim.warmup_epochs", self.warmup_epochs, MAX_EPOCHS, "MAX_EPOCHS")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: length, batch, device, checkpoints and logging."""

    epochs: float = 100.0
    max_steps: int | None = None  # caps the run; the schedule is laid over the capped length
    # reference: the epochs' shuffles are one stream cut into batches (the reference's
    # shuffle -> repeat -> batch), a batch may hold the end of one epoch and the start of the
    # next, N * epochs // B + 1 steps; drop_last: each epoch its own floor(N / B) batches, the
    # rest of the epoch unused (PyTorch's DataLoader(drop_last=True))
    step_counting: Literal["reference", "drop_last"] = "reference"
    batch_size: int = 4096  # global: summed over all devices
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    channels_last: bool = True
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    keep_last: int = 2
    log_every: int = 10  # steps between metric lines
    nonfinite: Literal["stop", "skip"] = "stop"
    # Scaling out and up (README "Several GPUs and large batches"):
    sync_bn: bool = True  # several processes: BN statistics over the global batch (paper §2.2)
    # Gradient caching: images per forward pass (both views of each), None = the whole
    # per-device batch at once. The loss still sees the whole global batch, but BatchNorm
    # normalises each micro-batch with its own statistics (2 * micro_batch_size views, synced
    # across processes with sync_bn) and updates its running statistics once per micro-batch.
    micro_batch_size: int | None = None
    # Autocast; fp16 adds a GradScaler. "auto": bf16 where the hardware computes it natively
    # (CUDA with bf16, CPUs with AVX512-BF16 or AMX, about 2x faster there), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model
    collective_timeout: float = 300.0  # seconds any process waits for the others at most

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _at_most("train.epochs", self.epochs, MAX_EPOCHS, "MAX_EPOCHS")
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        _positive("train.batch_size", self.batch_size)
        if self.batch_size < 2:
            raise ConfigError(
                "train.batch_size: got 1; allowed: >= 2 (a view needs negatives from other images)"
            )
        if not (
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]{1,4}", self.device)
        ):
            raise ConfigError(
                f"train.device: got {_show(self.device)}; allowed: auto, cpu, cuda, cuda:N "
                "(N the GPU's number, e.g. cuda:0)"
            )
        _positive("train.checkpoint_every", self.checkpoint_every)
        _positive("train.keep_last", self.keep_last)
        _positive("train.log_every", self.log_every)
        if self.micro_batch_size is not None:
            _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.collective_timeout", self.collective_timeout, "(seconds)")
        _at_most("train.collective_timeout", self.collective_timeout, MAX_TIMEOUT, "MAX_TIMEOUT")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What runs after pretraining (SPEC §7; ``runeval.py``)."""

    linear: bool = True  # logistic regression and kNN on frozen features
    run_page: bool = True  # report.html: curves, neighbours, a map of h (runpage.py)
    random_init_baseline: bool = True
    raw_pixels_baseline: bool = True  # the same probes on pixels (at most 32 px): no learning
    # `simclrkit evaluate --protocol finetune` of this run: head layers kept under the
    # classifier (SimCLRv2 fine-tunes from layer 1 of its 3-layer head; 0: from h)
    ft_proj_selector: int = 0
    # While training (monitors.py): a linear probe on detached h when the images have labels,
    # and every monitor_every steps (auto: ten times a run) kNN on monitor_images fixed
    # training images (and half as many test images), alignment, uniformity and RankMe.
    online_probe: bool = True
    monitor_every: int | Literal["auto"] = "auto"
    monitor_images: int = 512
    batch_size: int = 512
    # The evaluation takes at most max(max_share x training time, min_seconds).
    max_share: float = 0.05
    min_seconds: float = 60.0
    # A fixed class-balanced subsample of the labelled splits, at most this many images.
    max_train_images: int = 50_000
    max_test_images: int = 10_000

    def __post_init__(self) -> None:
        _positive("eval.batch_size", self.batch_size)
        _fraction("eval.max_share", self.max_share)
        _non_negative("eval.min_seconds", self.min_seconds, "(seconds)")
        _positive("eval.max_train_images", self.max_train_images)
        _positive("eval.max_test_images", self.max_test_images)
        if self.monitor_every != "auto":
            _non_negative("eval.monitor_every", self.monitor_every, "(steps; 0: no monitors)")
        _positive("eval.monitor_images", self.monitor_images)
        _non_negative("eval.ft_proj_selector", self.ft_proj_selector, "(head layers)")
        if self.ft_proj_selector > MAX_HEAD_LAYERS:
            raise ConfigError(
                f"eval.ft_proj_selector: got {self.ft_proj_selector}; allowed: at most the "
                f"head's layers (model.head_layers, at most {MAX_HEAD_LAYERS})"
            )


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """``simclrkit distill`` (SimCLRv2 §2.3, ``distill.py``): a fine-tuned teacher labels the
    training images, without their labels, for a student built from ``model``."""

    teacher: str | None = None  # a file holding a classifier (fine-tuned, distilled, imported)
    temperature: float = 1.0  # tau of Eq. 3 (the paper uses 1)
    # Weight of the distillation loss; 1 - alpha goes to the cross-entropy on the labelled
    # subset (the paper's weighted combination). 1: distillation alone, as the paper mostly.
    alpha: float = 1.0
    label_fraction: float = 0.1  # the labelled subset (class-balanced), used when alpha < 1
    # random: the student starts from scratch; teacher: from the teacher's weights (same
    # architecture only; self-distillation).
    student_init: Literal["random", "teacher"] = "random"

    def __post_init__(self) -> None:
        _positive("distill.temperature", self.temperature, "(the paper uses 1)")
        if self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"distill.temperature: got {_show(self.temperature)}; allowed: at least "
                f"{MIN_TEMPERATURE} (1/temperature scales the logits; the paper uses 1)"
            )
        _fraction("distill.alpha", self.alpha)
        _fraction("distill.label_fraction", self.label_fraction)
        if self.label_fraction == 0:
            raise ConfigError("distill.label_fraction: got 0; allowed: 0 < value <= 1 (0.1 = 10%)")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole pretraining (or distillation) run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    recipe: str | None = None  # which recipe this run started from; informational

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ConfigError(f"seed: got {_show(self.seed)}; allowed: an integer >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(
                f"seed: got {_show(self.seed)}; allowed: 0 <= seed <= 2**64 - 1 "
                f"({MAX_SEED}, the largest seed torch.manual_seed takes); pick a seed in that range"
            )


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what every numeric setting must be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else True


def _show(value: Any) -> str:
    """``value`` for a message: short, and safe for any value (``str`` of an integer with
    more than 4,300 digits raises, and a pasted blob should not flood the terminal)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits (about 10**{int(value.bit_length() * 0.30103)})"
    try:
        text = repr(value) if isinstance(value, str) else str(value)
    except (ValueError, TypeError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _require_number(key: str, value: Any, allowed: str) -> None:
    if not _is_number(value):
        raise ConfigError(f"{key}: got {_show(value)}; allowed: a finite number {allowed}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(
            f"{key}: got {_show(value)}; allowed: {allowed}, and at most 2**63 - 1 (a 64-bit "
            "integer, what the tensors and arrays that hold it take)"
        )


def _positive(key: str, value: float, note: str = "") -> None:
    _require_number(key, value, f"> 0 {note}".strip())
    if not value > 0:
        raise ConfigError(f"{key}: got {_show(value)}; allowed: a number > 0 {note}".rstrip())


def _non_negative(key: str, value: float, note: str = "") -> None:
    _require_number(key, value, f">= 0 {note}".strip())
    if not value >= 0:
        raise ConfigError(f"{key}: got {_show(value)}; allowed: a number >= 0 {note}".rstrip())


def _fraction(key: str, value: float) -> None:
    _require_number(key, value, "0 <= value <= 1")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: got {_show(value)}; allowed: 0 <= value <= 1")


def _at_most(key: str, value: float, bound: float, constant: str) -> None:
    """An upper bound against typos; the message says where the bound lives."""
    if value > bound:
        shown = int(bound) if float(bound).is_integer() else bound
        raise ConfigError(
            f"{key}: got {_show(value)}; allowed: at most {shown:,} (a bound against typos, far "
            f"above published settings; if a run really needs more, raise {constant} in "
            "simclrkit/config.py)"
        )


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = _suggest(value, allowed)
        raise ConfigError(f"{key}: got {_show(value)}; allowed: {', '.join(allowed)}{hint}")


def _suggest(word: Any, candidates: typing.Iterable[str]) -> str:
    if not isinstance(word, str) or len(word) > 100:  # only a word can be a typo of a word
        return ""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks
# --------------------------------------------------------------------------------------


class _OutOfRange(ConfigError):
    """A value of the right type but outside what any setting can hold (not a type mismatch,
    so a union of types reports it rather than listing the types)."""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against a field annotation; ints are accepted for floats.

    Beyond the type, what no setting can use is refused here, for every field at once: a float
    that is not finite (``.inf``, ``.nan``, ``1e999``), an integer beyond 64 bits, and a string
    with a NUL character (no path or name can hold one). The fields' own checks add ranges.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except _OutOfRange:
                raise
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: got {_show(value)}; allowed: {_describe(annotation)}"
        )
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if not any(type(value) is type(a) and value == a for a in allowed):
            hint = _suggest(value, [str(a) for a in allowed])
            raise ConfigError(
                f"{key}: got {_show(value)}; allowed: {', '.join(map(str, allowed))}{hint}"
            )
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_SEED:
                raise _OutOfRange(
                    f"{key}: got {_show(value)}; allowed: an integer of at most 64 bits "
                    f"(at most 2**64 - 1 = {MAX_SEED}; no setting needs more)"
                )
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        # YAML 1.1 (PyYAML) reads exponents without a dot, such as 1e-4, as strings.
        elif isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            number = value
        if number is not None:
            try:
                result = float(number)
            except OverflowError:  # an int beyond the float range
                result = math.inf
            if not math.isfinite(result):
                raise _OutOfRange(
                    f"{key}: got {_show(value)}; allowed: a finite number "
                    f"(largest about 1.8e308)"
                )
            return result
    elif annotation is str:
        if isinstance(value, str):
            if "\0" in value:
                raise _OutOfRange(
                    f"{key}: got {_show(value)}; a setting cannot hold a NUL character (\\0)"
                )
            return value
    else:  # pragma: no cover - a field type this module does not know is a bug here
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    raise ConfigError(f"{key}: got {_show(value)}; allowed: {_describe(annotation)}")


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if annotation is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Builds one config dataclass from plain data with type checks and close-match hints."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {_show(data)}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        # A key is shown as written unless it would break the one-line message (a newline).
        shown = key if isinstance(key, str) and key.isprintable() else _show(key)
        full = f"{prefix}{shown}"
        if key not in names:
            hint = _suggest(key, names)
            raise ConfigError(
                f"unknown key '{full}'{hint}; allowed in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(names)}"
            )
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = build_section(annotation, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, annotation)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from nested plain data.

    Raises:
        ConfigError: on an unknown key, a wrong type or an impossible value.
    """
    return build_section(Config, data, "")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as nested plain data (YAML- and JSON-safe)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------
# Recipes, YAML files and command-line overrides
# --------------------------------------------------------------------------------------


def _recipe_dir() -> Path:
    return Path(str(importlib.resources.files("simclrkit") / "configs"))


def list_recipes() -> dict[str, str]:
    """Maps each bundled recipe name to its first comment line (its source)."""
    recipes = {}
    for path in sorted(_recipe_dir().glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        recipes[path.stem] = first.lstrip("# ").strip()
    return recipes


# A config is a few hundred bytes; more than this is not a config (or is /dev/zero).
MAX_CONFIG_BYTES = 1 << 20


class _Refused(yaml.YAMLError):
    """What the strict loader refuses, with the line (1-based) it is on."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what it silently accepts but a config must not hold.

    * A key given twice in one mapping (at any depth): PyYAML keeps the last one, so of two
      ``lr:`` lines one is silently ignored; here it is an error naming the key and the line.
    * An alias (``*name``) of a mapping or list: it shares the object, so a chain of them (or
      a mapping that contains itself) expands into exponentially many settings, or endlessly,
      when the config is copied. Aliases of single values are harmless and allowed.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
                raise _Refused(
                    event.start_mark.line + 1,
                    f"the alias *{event.anchor} repeats a whole mapping or list; write its "
                    "values out (aliases of single values are fine)",
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _Refused(
                        line,
                        f"the key {_show(key)} appears twice in one mapping (first on line "
                        f"{first}); YAML would keep only the last value: remove one",
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Parses one YAML document with :class:`StrictLoader`.

    Raises:
        yaml.YAMLError: invalid YAML, a duplicate key, an alias of a collection.
        ValueError: a value PyYAML cannot build (a date like 2001-13-45, an integer of more
            than 4,300 digits).
        RecursionError: nesting deeper than Python's stack.
    """
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Reads a recipe by bundled name (``mnist5k``) or a YAML file path.

    The file must be UTF-8 text of a YAML mapping, without duplicate keys. A file with no
    settings at all (empty, only comments, or ``null``) is refused: it would otherwise mean
    the built-in defaults, the paper's ResNet-50 ImageNet settings, which is rarely what a
    missing or truncated file means. An explicit ``{}`` does mean those defaults.
    """
    path = Path(name_or_path)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name no file can have (too long, a NUL byte)
        exists = False
    if not exists:
        bundled = _recipe_dir() / f"{name_or_path}.yaml"
        if "/" not in name_or_path and "\0" not in name_or_path and bundled.exists():
            path = bundled
        else:
            names = list(list_recipes())
            hint = _suggest(name_or_path, names)
            raise ConfigError(
                f"--config: {_show(name_or_path)} is neither a file nor a recipe{hint}; "
                f"recipes: {', '.join(names)}"
            )
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"--config: {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a short "
            "YAML file of settings (see `simclrkit recipes`): check the path"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"--config: {path} is not UTF-8 text (line {line}, byte {error.start}: "
            f"{raw[error.start:error.start + 1]!r}); a config must be UTF-8: save it as UTF-8"
        ) from None
    try:
        data = parse_yaml(text)
    except _Refused as error:
        raise ConfigError(f"--config: {path} line {error.line}: {error.message}") from None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--config: {path} is not valid YAML: {_yaml_problem(error, text)}"
        ) from None
    except RecursionError:
        raise ConfigError(f"--config: {path} is nested too deeply to be a config") from None
    except ValueError as error:  # a value PyYAML cannot construct, e.g. the date 2001-13-45
        raise ConfigError(f"--config: {path} holds a value YAML cannot read: {error}") from None
    if data is None:
        raise ConfigError(
            f"--config: {path} is empty (no settings: only blanks, comments or null); name a "
            "recipe such as --config mnist5k (see `simclrkit recipes`), or write the settings "
            "to change, e.g. 'train: {epochs: 10}'; '{}' means the built-in defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys")
    if "recipe" not in data and path.parent == _recipe_dir():
        data["recipe"] = path.stem
    return data


def _yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """PyYAML's error in one line (its own text spans several, with a picture of the spot)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return where + "; ".join(part for part in (error.context, error.problem) if part)
    if isinstance(error, yaml.reader.ReaderError) and isinstance(error.character, int):
        line = text.count("\n", 0, error.position) + 1
        return (
            f"line {line}: the character #x{error.character:04x} is not allowed in YAML "
            "(control characters such as NUL cannot appear in a config)"
        )
    return " ".join(str(error).split())


def _parse_override(raw: str) -> Any:
    """A ``VALUE`` as a YAML scalar; anything YAML cannot read stays the plain string (the
    field's type check then says what the field takes)."""
    if not raw.strip():
        return None
    try:
        return parse_yaml(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return raw


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with ``KEY=VALUE`` overrides merged in.

    Values are parsed as YAML scalars (``0.1`` is a number, ``true`` a bool, ``null`` None).
    """
    merged = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {_show(item)}: expected KEY=VALUE, e.g. train.epochs=10"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {_show(item)}: the key is empty")
        value = _parse_override(raw)
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {_show(item)}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_config(config: str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """The one entry point: recipe or file, then overrides, then validation."""
    data = load_yaml(config) if config else {}
    return from_dict(apply_overrides(data, overrides))


# --------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Values derived once from a config and the data; logged at the start of a run."""

    world_size: int
    global_batch_size: int
    batch_size_per_device: int
    images_per_epoch: int  # stream positions per epoch (``pipeline.StepOrder``)
    steps_per_epoch: float  # images_per_epoch / global_batch_size; for "epoch" in logs
    total_steps: int
    warmup_steps: int
    scaled_lr: float
    image_size: int
    in_channels: int
    blur: bool
    color_jitter_strength: float
    cifar_stem: bool
    monitor_every: int  # steps between monitor measurements (0: none)


def resolve(
    config: Config,
    *,
    num_examples: int,
    native_image_size: int,
    in_channels: int,
    world_size: int = 1,
) -> Plan:
    """Derives the per-device batch, the scaled learning rate and the step counts.

    Step counting (``train.step_counting``), ``N`` images, global batch ``B``, ``E`` epochs:

    * ``reference`` (default): as ``get_train_steps`` in the reference's ``model_util.py``,
      ``N * E // B + 1`` steps over the data repeated before batching (``data.py``: shuffle,
      ``repeat(-1)``, ``batch(drop_remainder=True)``), so no image of an epoch is left out and
      a step may straddle two epochs; warmup ``int(round(W * N // B))`` steps, as its
      ``WarmUpAndCosineDecay``. ``steps_per_epoch`` is then ``N / B``, a fraction.
    * ``drop_last``: ``floor(N / B)`` steps per epoch, each epoch's last ``N mod B`` images of
      its shuffle unused; ``round(E * floor(N / B))`` steps, warmup ``round(W * floor(N / B))``.

    Either way every step sees a full global batch and the loss's negatives are constant in
    number. ``train.max_steps`` caps the total (the reference's ``train_steps`` replaces it).

    Raises:
        ConfigError: when the batch does not divide over the devices or exceeds the data, or
            the micro-batch does not divide the per-device batch.
    """
    from simclrkit.optim import scale_learning_rate

    train = config.train
    if train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size: {train.batch_size} does not divide over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    if train.batch_size > num_examples:
        raise ConfigError(
            f"train.batch_size: {train.batch_size} is larger than the {num_examples} training "
            f"images; use at most {num_examples}"
        )
    per_device = train.batch_size // world_size
    if train.micro_batch_size is not None and per_device % train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size: {train.micro_batch_size} does not divide the "
            f"{per_device} images per process (train.batch_size {train.batch_size} over "
            f"{world_size} processes); use a divisor of {per_device}, or null to turn "
            "gradient caching off"
        )
    if train.step_counting == "reference":
        images_per_epoch = num_examples
        total_steps = int(num_examples * train.epochs // train.batch_size) + 1
        warmup_steps = int(round(config.optim.warmup_epochs * num_examples // train.batch_size))
    else:
        images_per_epoch = num_examples // train.batch_size * train.batch_size
        full_steps = num_examples // train.batch_size
        total_steps = max(1, round(train.epochs * full_steps))
        warmup_steps = round(config.optim.warmup_epochs * full_steps)
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    warmup_steps = min(total_steps, warmup_steps)
    image_size = config.data.image_size or native_image_size
    from simclrkit.augment import color_strength, default_blur

    blur = config.augment.blur if config.augment.blur is not None else default_blur(image_size)
    cifar_stem = config.model.cifar_stem if config.model.cifar_stem is not None else image_size <= 32
    return Plan(
        world_size=world_size,
        global_batch_size=train.batch_size,
        batch_size_per_device=train.batch_size // world_size,
        images_per_epoch=images_per_epoch,
        steps_per_epoch=images_per_epoch / train.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        scaled_lr=scale_learning_rate(config.optim.lr, train.batch_size, config.optim.lr_scaling),
        image_size=image_size,
        in_channels=in_channels,
        blur=blur,
        color_jitter_strength=color_strength(config.augment.color_jitter_strength, image_size),
        cifar_stem=cifar_stem,
        # auto: ten measurements over the run (0.5% of the CPU default's training: monitors.py)
        monitor_every=(
            -(-total_steps // 10) if config.eval.monitor_every == "auto"
            else config.eval.monitor_every
        ),
    )
