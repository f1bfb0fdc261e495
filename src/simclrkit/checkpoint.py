"""Crash-safe checkpoints that cannot run code when loaded.

Saving writes to a temporary file in the destination folder, fsyncs it, renames it over the
destination with ``os.replace`` (atomic on POSIX) and fsyncs the folder, so a kill or an error
at any moment leaves either the old file or the new one, never a partial file under the
final name. Temporary files start with ``.tmp-`` and are removed on error; resume only ever
looks at final names.

Loading always uses ``torch.load(weights_only=True)``: a file whose pickle would construct
arbitrary objects (and so could run code) is refused with :class:`CheckpointError`; there is
no fallback to unsafe loading.

A checkpoint that loads is not yet one that can be used: :func:`validate_training_checkpoint`
(behind ``export.read_trained``, which every reader goes through) checks what they rely on
before any model is built: the architecture's names, types and bounds
(:func:`validate_architecture`), the run's config, and that every stored tensor has the shape
that architecture implies (:func:`check_tensor_shapes`, which builds the model on PyTorch's
``meta`` device, so a file that claims a huge model costs no memory). A damaged or forged
file is refused with a :class:`CheckpointError` naming the file and the first wrong entry.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import reprlib
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from simclrkit.errors import UserError

FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or from another format."""


def fsync_folder(folder: Path) -> None:
    """fsyncs a folder, so a rename in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The permissions an ordinary new file gets (0o666 less the umask). Writers that create
    private 0600 files (mkstemp, safetensors) get these instead, so every output is alike."""
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Runs ``write(handle)`` so that ``path`` is never seen half-written.

    The data goes to a temporary file in the same folder, is fsynced, renamed over ``path``
    and the folder fsynced: after a crash at any moment ``path`` holds the old content or
    the new one.

    Raises:
        OSError: when the write fails (disk full, ...); no temporary file remains and an
            earlier file at ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        # mkstemp creates the file for its owner only; give it the usual umask permissions.
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # torch.save reports a full disk as a RuntimeError of its zip writer raised while
        # handling the OSError: the OSError (ENOSPC, EIO, ...) is what happened.
        cause = _os_error_behind(error) if isinstance(error, RuntimeError) else None
        if cause is not None:
            raise cause from None
        raise
    fsync_folder(path.parent)


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError ``error`` is, or was raised while handling, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Saves ``obj`` with ``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Loads a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: when the file is missing, truncated, or holds objects other than
            tensors and plain containers (a pickle that could run code).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; name a file such as "
            f"{path / 'checkpoints' / 'last.pt'}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(error)
        if "global" not in reason.lower() and "class" not in reason.lower():
            # An instruction the weights-only unpickler does not run: random bytes after a
            # pickle header, or a plain pickle (protocol 4+) that may hold anything.
            raise CheckpointError(
                f"refusing to load {path}: its pickle uses instructions a weights-only load "
                f"does not run ({reason}); it could run code, or it is damaged"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain "
            f"data, and loading it could run code ({reason})"
        ) from None
    except (
        RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
        AttributeError, struct.error, zipfile.BadZipFile,
    ) as error:
        # A damaged file reaches torch.load's readers in states they report with any of
        # these; all of them mean the same to the user: the file is not readable.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without PyTorch's advice around it (which
    suggests loading with ``weights_only=False``: exactly what must not be done here)."""
    boilerplate = ("weights only load failed", "weights_only", "check the documentation",
                   "please file an issue", "do those steps only")
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(phrase in line.lower() for phrase in boilerplate):
            return line.split(" Please use ")[0][:300]
    return "the weights-only unpickler refused it"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a simclrkit training checkpoint and checks its format version.

    Only the envelope is checked (a dict with ``format_version`` and ``encoder``); readers
    that build a model from the file validate it (:func:`validate_training_checkpoint`).
    """
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or "format_version" not in state or "encoder" not in state:
        raise CheckpointError(f"{path} is not a simclrkit checkpoint (no format_version/encoder)")
    version = state["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path}: format_version is {_shown(version)}, not a version number; the file is damaged "
            "or was not written by simclrkit"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}; this simclrkit reads up to "
            f"{FORMAT_VERSION}: upgrade simclrkit"
        )
    return state


# --------------------------------------------------------------------------------------------
# What a checkpoint claims, checked before a model is built from it
# --------------------------------------------------------------------------------------------

# Bounds on a stored architecture. They are far above any real SimCLR model (the paper's
# largest is a ResNet-152 at width 3) and low enough that the shapes they imply stay small
# integers; a file claiming more is damaged or forged. Defined here, once, for every reader
# of checkpoints and exports.
MAX_WIDTH = 16
MAX_IMAGE_SIZE = 4096
MAX_PROJ_DIM = 65536
MAX_HEAD_LAYERS = 8
IN_CHANNELS = (1, 3)  # what training produces (grayscale or RGB) and Preprocess converts to
HEAD_KINDS = ("nonlinear", "linear", "none")
ARCHITECTURE_KEYS = (
    "encoder", "width", "in_channels", "cifar_stem", "image_size", "head", "head_layers",
    "proj_dim",
)
# Keys added later, with what an architecture stored before them built (plain ResNets).
OPTIONAL_ARCHITECTURE_KEYS = {"sk_ratio": 0.0, "se_ratio": 0.0}
_DAMAGED = "the file is damaged or was not written by simclrkit"


_MAX_COUNT = 2**63  # steps and counts beyond an int64 are not counts but forgeries
class _ShortRepr(reprlib.Repr):
    """reprlib's cut-short reprs, with tensors described instead of printed."""

    def repr_Tensor(self, x: torch.Tensor, level: int) -> str:  # noqa: N802 (reprlib's name)
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"

    repr_Parameter = repr_Tensor


_SHOWN = _ShortRepr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlevel = 2


def _shown(value: Any) -> str:
    """A stored value for a message: its repr, cut short and on one line (a forged entry may
    be megabytes of text, nested a thousand deep, or an object whose repr spans lines)."""
    return " ".join(_SHOWN.repr(value).split())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float that is a finite float (not a bool, NaN, infinity, or an int too big
    for a float: ``math.isfinite`` raises OverflowError on those instead of answering)."""
    if _is_int(value):
        return abs(value) < 2.0**1023
    return isinstance(value, float) and math.isfinite(value)


def is_count(value: Any) -> bool:
    """An integer from 0 to 2**63 - 1 (a step or a number of files)."""
    return _is_int(value) and 0 <= value < _MAX_COUNT


def validate_architecture(architecture: Any, source: str) -> dict[str, Any]:
    """The stored architecture, checked key by key; returns a copy with exactly the known keys.

    Every reader goes through this before building a model, so a missing key, a wrong type or
    an absurd size is reported as what it is instead of surfacing as a ``KeyError`` or an
    allocation of terabytes.

    Raises:
        CheckpointError: naming ``source`` and the first wrong entry.
    """
    from simclrkit.models import BOTTLENECK_ENCODERS, ENCODER_NAMES, STEM_POOLS

    def wrong(key: str, allowed: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: architecture {key!r} is {_shown(architecture.get(key))}; allowed: "
            f"{allowed} ({_DAMAGED})"
        )

    if not isinstance(architecture, Mapping):
        raise CheckpointError(
            f"{source}: 'architecture' is {type(architecture).__name__}, not a mapping of "
            f"{', '.join(ARCHITECTURE_KEYS)} ({_DAMAGED})"
        )
    missing = [key for key in ARCHITECTURE_KEYS if key not in architecture]
    if missing:
        raise CheckpointError(
            f"{source}: 'architecture' lacks {', '.join(missing)} ({_DAMAGED})"
        )
    arch = {key: architecture[key] for key in ARCHITECTURE_KEYS}
    if not isinstance(arch["encoder"], str) or arch["encoder"] not in ENCODER_NAMES:
        raise wrong("encoder", ", ".join(ENCODER_NAMES))
    if not is_finite_number(arch["width"]) or not 0 < arch["width"] <= MAX_WIDTH:
        raise wrong("width", f"a number > 0 and <= {MAX_WIDTH}")
    if not _is_int(arch["in_channels"]) or arch["in_channels"] not in IN_CHANNELS:
        raise wrong("in_channels", " or ".join(map(str, IN_CHANNELS)))
    if not isinstance(arch["cifar_stem"], bool):
        raise wrong("cifar_stem", "true or false")
    if not _is_int(arch["image_size"]) or not 1 <= arch["image_size"] <= MAX_IMAGE_SIZE:
        raise wrong("image_size", f"an integer from 1 to {MAX_IMAGE_SIZE}")
    if not isinstance(arch["head"], str) or arch["head"] not in HEAD_KINDS:
        raise wrong("head", ", ".join(HEAD_KINDS))
    if not _is_int(arch["head_layers"]) or not 1 <= arch["head_layers"] <= MAX_HEAD_LAYERS:
        raise wrong("head_layers", f"an integer from 1 to {MAX_HEAD_LAYERS}")
    if not _is_int(arch["proj_dim"]) or not 1 <= arch["proj_dim"] <= MAX_PROJ_DIM:
        raise wrong("proj_dim", f"an integer from 1 to {MAX_PROJ_DIM}")
    for key, default in OPTIONAL_ARCHITECTURE_KEYS.items():
        value = architecture.get(key, default)
        if not is_finite_number(value) or not 0 <= value <= 1:
            raise wrong(key, "a number from 0 to 1")
        if value and arch["encoder"] not in BOTTLENECK_ENCODERS:
            raise wrong(key, f"0 for {arch['encoder']} (SimCLRv2's blocks are bottlenecks)")
        arch[key] = value
    if "stem_pool" in architecture:  # absent: the torchvision-style pool every run builds
        if architecture["stem_pool"] not in STEM_POOLS:
            raise wrong("stem_pool", ", ".join(STEM_POOLS))
        arch["stem_pool"] = architecture["stem_pool"]
    return arch


def expected_shapes(architecture: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"encoder": {name: shape}, "head": {name: shape}}`` of a validated architecture.

    The model is built on the ``meta`` device: shapes without storage, so this costs the
    same for a claimed ResNet-152 at width 16 as for a ResNet-18.
    """
    from simclrkit.models import build_model

    with torch.device("meta"):
        model = build_model(architecture)
    return {
        part: {name: tuple(t.shape) for name, t in module.state_dict().items()}
        for part, module in (("encoder", model.encoder), ("head", model.head))
    }


def check_tensor_shapes(
    architecture: dict[str, Any],
    shapes: Mapping[str, Mapping[str, Sequence[int]] | None],
    source: str,
) -> None:
    """Refuses stored tensors whose names or shapes differ from what ``architecture`` implies.

    Args:
        architecture: a dict returned by :func:`validate_architecture`.
        shapes: ``{"encoder": {name: shape}, "head": {name: shape} or None}`` as stored (a
            missing head, None, is allowed: exports may leave it out).
        source: the file, for the message.

    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped tensor.
    """
    expected = expected_shapes(architecture)
    for part in ("encoder", "head"):
        stored = shapes.get(part)
        if stored is None:
            if part == "encoder":
                raise CheckpointError(f"{source} holds no encoder tensors ({_DAMAGED})")
            continue
        want = expected[part]
        for name, shape in stored.items():
            if name not in want:
                raise CheckpointError(
                    f"{source}: tensor {part}.{name} does not belong to the stored architecture "
                    f"({architecture['encoder']}, width {architecture['width']}) ({_DAMAGED})"
                )
            if tuple(shape) != want[name]:
                raise CheckpointError(
                    f"{source}: tensor {part}.{name} has shape {tuple(shape)}, but the stored "
                    f"architecture ({architecture['encoder']}, width {architecture['width']}) "
                    f"implies {want[name]} ({_DAMAGED})"
                )
        absent = [name for name in want if name not in stored]
        if absent:
            raise CheckpointError(
                f"{source}: tensor {part}.{absent[0]} is missing"
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                + f" ({_DAMAGED})"
            )


def check_classifier(
    architecture: dict[str, Any],
    shapes: Mapping[str, Sequence[int]],
    proj_selector: Any,
    has_head: bool,
    source: str,
) -> int:
    """Refuses a stored classifier (``classifier.py``) that does not fit the architecture.

    Args:
        architecture: a dict returned by :func:`validate_architecture`.
        shapes: the stored ``classifier`` tensors' shapes: ``weight`` (K, D), ``bias`` (K,).
        proj_selector: the stored ``classifier_input``: how many head layers it reads through.
        has_head: whether the file holds the projection head (needed when the selector > 0).
        source: the file, for the message.

    Returns:
        The number of classes K.

    Raises:
        CheckpointError: naming the wrong entry.
    """
    from simclrkit.classifier import MAX_CLASSES, input_dim
    from simclrkit.models import build_model

    with torch.device("meta"):
        model = build_model(architecture)
    layers = len(model.head.layers)
    if not _is_int(proj_selector) or not 0 <= proj_selector <= layers:
        raise CheckpointError(
            f"{source}: 'classifier_input' is {_shown(proj_selector)}; allowed: 0 to {layers} "
            f"(the projection-head layers it reads through) ({_DAMAGED})"
        )
    if proj_selector and not has_head:
        raise CheckpointError(
            f"{source}: the classifier reads projection-head layer {proj_selector}, but the "
            f"file holds no projection head ({_DAMAGED})"
        )
    if set(shapes) != {"weight", "bias"}:
        raise CheckpointError(
            f"{source}: 'classifier' holds {_shown(sorted(shapes))}, not weight and bias "
            f"({_DAMAGED})"
        )
    weight, bias = tuple(shapes["weight"]), tuple(shapes["bias"])
    dim = input_dim(model.encoder.feature_dim, model.head.layers[:proj_selector])
    if len(weight) != 2 or weight[1] != dim or not 1 <= weight[0] <= MAX_CLASSES:
        raise CheckpointError(
            f"{source}: classifier.weight has shape {weight}; the architecture implies "
            f"(K, {dim}) with 1 <= K <= {MAX_CLASSES:,} ({_DAMAGED})"
        )
    if bias != weight[:1]:
        raise CheckpointError(
            f"{source}: classifier.bias has shape {bias}, not ({weight[0]},) ({_DAMAGED})"
        )
    return weight[0]


def _tensor_dict(value: Any, key: str, source: str) -> dict[str, torch.Tensor]:
    """A state dict of real (not meta, not sparse) tensors keyed by strings."""
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"{source}: {key!r} is {type(value).__name__}, not a mapping of tensors ({_DAMAGED})"
        )
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{source}: {key!r} entry {_shown(name)} is {type(tensor).__name__}, not a tensor "
                f"({_DAMAGED})"
            )
        if tensor.is_meta or tensor.layout != torch.strided or tensor.is_complex():
            raise CheckpointError(
                f"{source}: {key}.{name} is a {tensor.layout} {tensor.dtype} tensor on "
                f"{tensor.device}, not stored real numbers ({_DAMAGED})"
            )
    return dict(value)


def _check_storage(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuses tensors that claim more data than the file holds.

    ``torch.load`` rebuilds each tensor as a view (shape, strides, offset) of a stored
    buffer, so a forged file can give one stored number the shape of a huge weight (stride
    0). Shapes alone would then pass, and loading the weights into a real model would
    allocate the claimed size. A real state dict's tensors never overlap: together they
    need no more bytes than their buffers hold, so building from them costs at most the
    file's size.
    """
    held: dict[tuple[int, torch.device], int] = {}
    claimed: dict[tuple[Any, ...], int] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        size = tensor.numel() * tensor.element_size()
        if size > storage.nbytes():
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} ({size:,} bytes) but "
                f"its stored data is {storage.nbytes():,} bytes: a view that repeats its data, "
                f"which no saved model holds ({_DAMAGED})"
            )
        place = (storage.data_ptr(), tensor.device)
        held[place] = max(held.get(place, 0), storage.nbytes())
        # The same view stored twice (a tied weight) is one set of numbers.
        claimed[(*place, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())] = size
    if sum(claimed.values()) > sum(held.values()):
        raise CheckpointError(
            f"{source}: the tensors claim {sum(claimed.values()):,} bytes but the file holds "
            f"{sum(held.values()):,}: they overlap, which no saved model does ({_DAMAGED})"
        )


def validate_config(config: Any, source: str) -> dict[str, Any]:
    """The run's stored config, validated as a fresh config would be; returns it normalised
    (every section present), so readers can rely on its shape."""
    from simclrkit import config as config_lib

    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{source}: 'config' is {type(config).__name__}, not a mapping ({_DAMAGED})"
        )
    try:
        return config_lib.to_dict(config_lib.from_dict(dict(config)))
    except (
        config_lib.ConfigError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError,
        RecursionError,
    ) as error:
        # A forged entry (an int of 400 digits, nesting a thousand deep) reaches the config's
        # checks in states they report with any of these; all mean "not a valid config".
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{source}: the stored config is not valid ({reason}); {_DAMAGED}, or by a "
            "simclrkit whose config differs"
        ) from None


def check_progress(facts: Mapping[str, Any], source: str) -> None:
    """Refuses a ``step`` that is not an integer >= 0 or a ``train_seconds`` that is not a
    finite number >= 0 (either may be absent), as checkpoints and exports store them."""
    step = facts.get("step")
    if step is not None and not is_count(step):
        raise CheckpointError(
            f"{source}: 'step' is {_shown(step)}, not an integer >= 0 ({_DAMAGED})"
        )
    seconds = facts.get("train_seconds")
    if seconds is not None and not (is_finite_number(seconds) and seconds >= 0):
        raise CheckpointError(
            f"{source}: 'train_seconds' is {_shown(seconds)}, not a number >= 0 ({_DAMAGED})"
        )


def validate_training_checkpoint(
    state: Any, source: str, *, need_config: bool = False, need_head: bool = False
) -> dict[str, Any]:
    """Checks a loaded training checkpoint's entries; returns a copy with them validated.

    Checked: ``architecture`` (:func:`validate_architecture`), ``encoder`` and ``head``
    (mappings of tensors whose shapes match it: :func:`check_tensor_shapes`), ``config``
    (:func:`validate_config`; required with ``need_config``), ``step`` (an integer >= 0),
    ``train_seconds`` (a finite number) and, where present, ``classifier`` and
    ``classifier_input`` (:func:`check_classifier`). ``head`` is set to None when absent
    (required with ``need_head``), ``classifier`` likewise, ``config`` to ``{}``.

    Raises:
        CheckpointError: naming ``source`` and the first wrong entry.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} is not a simclrkit checkpoint ({_DAMAGED})")
    if "architecture" not in state:
        raise CheckpointError(
            f"{source} has no 'architecture' entry, so the model cannot be rebuilt ({_DAMAGED})"
        )
    checked = dict(state)
    arch = validate_architecture(state["architecture"], source)
    checked["architecture"] = arch
    checked["encoder"] = _tensor_dict(state.get("encoder"), "encoder", source)
    head = state.get("head")
    if head is None and need_head:
        raise CheckpointError(f"{source} has no 'head' entry (the projection head; {_DAMAGED})")
    checked["head"] = None if head is None else _tensor_dict(head, "head", source)
    if "config" in state and not (isinstance(state["config"], Mapping) and not state["config"]):
        checked["config"] = validate_config(state["config"], source)
    elif need_config:
        raise CheckpointError(
            f"{source} has no 'config' entry (the run's settings, needed here; {_DAMAGED})"
        )
    else:
        checked["config"] = {}
    check_progress(state, source)
    check_tensor_shapes(
        arch,
        {
            "encoder": {k: tuple(v.shape) for k, v in checked["encoder"].items()},
            "head": None if checked["head"] is None else {
                k: tuple(v.shape) for k, v in checked["head"].items()
            },
        },
        source,
    )
    classifier = state.get("classifier")
    if classifier is not None:
        checked["classifier"] = _tensor_dict(classifier, "classifier", source)
        check_classifier(
            arch, {k: tuple(v.shape) for k, v in checked["classifier"].items()},
            state.get("classifier_input"), checked["head"] is not None, source,
        )
    else:
        checked["classifier"] = None
    _check_storage(
        {f"encoder.{k}": v for k, v in checked["encoder"].items()}
        | {f"head.{k}": v for k, v in (checked["head"] or {}).items()}
        | {f"classifier.{k}": v for k, v in (checked["classifier"] or {}).items()},
        source,
    )
    return checked


class CheckpointManager:
    """Writes ``step-NNNNNNNNN.pt`` files plus ``last.pt`` and keeps the newest ``keep_last``.

    ``last.pt`` is always a complete copy of the newest checkpoint (written atomically), so
    tools can load one stable name; step files exist for retention and inspection.
    """

    def __init__(self, folder: str | os.PathLike, keep_last: int = 2):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def save(self, state: dict, step: int) -> Path:
        state = {"format_version": FORMAT_VERSION, **state}
        path = self.folder / f"step-{step:09d}.pt"
        atomic_save(state, path)
        atomic_save(state, self.folder / "last.pt")
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def step_files(self) -> list[Path]:
        """Complete step checkpoints, oldest first (temporary files are never listed)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _STEP_NAME.match(p.name))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        last = self.folder / "last.pt"
        if last.is_file():
            return last
        files = self.step_files()
        return files[-1] if files else None
