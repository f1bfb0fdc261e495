"""Run configuration: frozen, keyword-only dataclasses, YAML recipes and dotted overrides.

Config flows one way (see the README): the command line and a YAML file are merged into a
plain nested dict, validated into a frozen :class:`Config`, and :func:`resolve` derives every
computed value (global and per-device batch, scaled learning rate, steps) exactly once.
Nothing mutates a config after it is built; builders below ``train.py`` receive explicit
arguments, never the whole config.

Every user mistake raises :class:`ConfigError`, whose message names the key, what was given
and what is allowed; the command line turns it into exit code 2 without a traceback.

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


class ConfigError(ValueError):
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
ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which images to pretrain on, and how they are read (SPEC §2; DATA.md)."""

    dataset: str = "mnist5k"
    root: str | None = None
    image_size: int | None = None  # None: the dataset's native size
    # Loader processes; auto: none for images in memory, a share of the cores for files.
    num_workers: int | Literal["auto"] = "auto"
    prefetch: bool = True  # a thread assembles the next batch during the step
    max_bad_fraction: float = 0.01
    # File datasets: a prebuilt index (simclrkit index ROOT --out FILE) instead of a listing.
    index: str | None = None
    # File datasets: check every file before training (header, decode) or not (none: bad
    # files are found when read and replaced).
    check_files: Literal["none", "header", "decode"] = "none"
    reduced_decode: bool = True  # JPEGs decoded at the smallest scale that covers the crops

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        if self.image_size is not None:
            _positive("data.image_size", self.image_size)
        if self.num_workers != "auto":
            _non_negative("data.num_workers", self.num_workers)
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

    color_jitter_strength: float = 1.0  # s: 1.0 for ImageNet, 0.5 for CIFAR-10
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur: bool | None = None  # None: on for images larger than 32 px (paper App. B.9)
    blur_prob: float = 0.5
    crop_min_scale: float = 0.08
    flip_prob: float = 0.5
    brightness: Literal["multiplicative", "additive"] = "multiplicative"  # v2 / v1

    def __post_init__(self) -> None:
        _non_negative("augment.color_jitter_strength", self.color_jitter_strength)
        for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
            _fraction(f"augment.{key}", getattr(self, key))
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(
                f"augment.crop_min_scale: got {self.crop_min_scale}; allowed: 0 < value <= 1"
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

    def __post_init__(self) -> None:
        _choice("model.encoder", self.encoder, ENCODERS)
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ConfigError(f"model.width: got {self.width}; allowed: a number > 0")
        _positive("model.head_layers", self.head_layers)
        _positive("model.proj_dim", self.proj_dim)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """NT-Xent (paper Eq. 1, Table 5)."""

    temperature: float = 0.1
    chunk_size: int | None = None  # None: automatic (chunked for large batches)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(
                f"loss.temperature: got {self.temperature}; allowed: a number > 0 "
                "(0.1 for ImageNet, 0.5 for CIFAR-10)"
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
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr: got {self.lr}; allowed: a number > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum: got {self.momentum}; allowed: 0 <= value < 1")
        _non_negative("optim.weight_decay", self.weight_decay)
        _positive("optim.trust_coefficient", self.trust_coefficient)
        _non_negative("optim.warmup_epochs", self.warmup_epochs)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: length, batch, device, checkpoints and logging."""

    epochs: float = 100.0
    max_steps: int | None = None  # caps the run; the schedule is laid over the capped length
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
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"train.epochs: got {self.epochs}; allowed: a number > 0")
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        _positive("train.batch_size", self.batch_size)
        if self.batch_size < 2:
            raise ConfigError(
                "train.batch_size: got 1; allowed: >= 2 (a view needs negatives from other images)"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"train.device: got '{self.device}'; allowed: auto, cpu, cuda, cuda:N"
            )
        _positive("train.checkpoint_every", self.checkpoint_every)
        _positive("train.keep_last", self.keep_last)
        _positive("train.log_every", self.log_every)
        if self.micro_batch_size is not None:
            _positive("train.micro_batch_size", self.micro_batch_size)
        if not (self.collective_timeout > 0 and math.isfinite(self.collective_timeout)):
            raise ConfigError(
                f"train.collective_timeout: got {self.collective_timeout}; allowed: seconds > 0"
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What runs after pretraining (SPEC §7; ``runeval.py``)."""

    linear: bool = True  # logistic regression and kNN on frozen features
    random_init_baseline: bool = True
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
        if not (self.min_seconds >= 0 and math.isfinite(self.min_seconds)):
            raise ConfigError(f"eval.min_seconds: got {self.min_seconds}; allowed: seconds >= 0")
        _positive("eval.max_train_images", self.max_train_images)
        _positive("eval.max_test_images", self.max_test_images)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    recipe: str | None = None  # which recipe this run started from; informational

    def __post_init__(self) -> None:
        _non_negative("seed", self.seed)


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: got {value}; allowed: a number > 0")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}: got {value}; allowed: a number >= 0")


def _fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: got {value}; allowed: 0 <= value <= 1")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = _suggest(value, allowed)
        raise ConfigError(f"{key}: got '{value}'; allowed: {', '.join(allowed)}{hint}")


def _suggest(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks
# --------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against a field annotation; ints are accepted for floats."""
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
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: got {value!r}; allowed: {_describe(annotation)}"
        )
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            hint = _suggest(value, [str(a) for a in allowed])
            raise ConfigError(
                f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}{hint}"
            )
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads exponents without a dot, such as 1e-4, as strings.
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know is a bug here
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    raise ConfigError(f"{key}: got {value!r}; allowed: {_describe(annotation)}")


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
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
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


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Reads a recipe by bundled name (``mnist5k``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.exists():
        bundled = _recipe_dir() / f"{name_or_path}.yaml"
        if bundled.exists():
            path = bundled
        else:
            names = list(list_recipes())
            hint = _suggest(name_or_path, names)
            raise ConfigError(
                f"--config: '{name_or_path}' is neither a file nor a recipe{hint}; "
                f"recipes: {', '.join(names)}"
            )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys")
    if "recipe" not in data and path.parent == _recipe_dir():
        data["recipe"] = path.stem
    return data


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with ``KEY=VALUE`` overrides merged in.

    Values are parsed as YAML scalars (``0.1`` is a number, ``true`` a bool, ``null`` None).
    """
    merged = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}': expected KEY=VALUE, e.g. train.epochs=10"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}': the key is empty")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
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
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    scaled_lr: float
    image_size: int
    in_channels: int
    blur: bool
    cifar_stem: bool


def resolve(
    config: Config,
    *,
    num_examples: int,
    native_image_size: int,
    in_channels: int,
    world_size: int = 1,
) -> Plan:
    """Derives the per-device batch, the scaled learning rate and the step counts.

    Steps per epoch drop the last partial batch, as the reference does, so every step sees a
    full global batch and the loss's negatives are constant in number.

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
    steps_per_epoch = num_examples // train.batch_size
    total_steps = max(1, round(train.epochs * steps_per_epoch))
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    warmup_steps = min(total_steps, round(config.optim.warmup_epochs * steps_per_epoch))
    image_size = config.data.image_size or native_image_size
    from simclrkit.augment import default_blur

    blur = config.augment.blur if config.augment.blur is not None else default_blur(image_size)
    cifar_stem = config.model.cifar_stem if config.model.cifar_stem is not None else image_size <= 32
    return Plan(
        world_size=world_size,
        global_batch_size=train.batch_size,
        batch_size_per_device=train.batch_size // world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        scaled_lr=scale_learning_rate(config.optim.lr, train.batch_size, config.optim.lr_scaling),
        image_size=image_size,
        in_channels=in_channels,
        blur=blur,
        cifar_stem=cifar_stem,
    )
