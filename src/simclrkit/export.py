"""Using a trained encoder: export it and load it in one line.

After pretraining, the projection head g is thrown away and the encoder f is what is used
(paper §2.1, §4.2: h, not z, is the representation). This module turns a training checkpoint
into files other code can use, and back into a module:

* :func:`export_checkpoint` writes the encoder as a torchvision state dict, a safetensors file
  with metadata, TorchScript or ONNX, each with a model card ``<out>.MODEL_CARD.md`` beside
  it. The card's name is the export's name plus a suffix (``encoder.onnx.MODEL_CARD.md``), so
  several exports can share a folder without overwriting each other's cards. The card's text
  is written by ``modelcard.py``. An export never replaces its own input, a folder or (unless
  asked to) an existing file, and appears whole with its card or not at all
  (:func:`check_outputs`, :class:`StagedOutputs`, also used by ``embed.py``).
* :func:`load_encoder` rebuilds the encoder from a training checkpoint or a safetensors export
  (weights only: ``torch.load(weights_only=True)`` or safetensors, nothing that can run code)
  and attaches ``preprocess``, the test-time transform it was evaluated with. Both check the
  file's architecture and every tensor's shape before building anything (``checkpoint.py``).

Embedding folders of images with a loaded encoder is in ``embed.py``
(:func:`simclrkit.embed.embed_images`).

Inputs are the reference's: floats in [0, 1] with no mean/std normalisation (SPEC §2), and the
test-time view is a centre crop of 0.875 of the shorter side resized to the training size (the
whole image for sizes <= 32 px), bicubic. Users of the torchvision export must NOT apply the
usual ImageNet mean/std: these weights never saw normalised inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclrkit import __version__, jsonout
from simclrkit.augment import apply_eval
from simclrkit.checkpoint import (
    _DAMAGED,
    FORMAT_VERSION,
    CheckpointError,
    _shown,
    check_classifier,
    check_progress,
    check_tensor_shapes,
    fsync_folder,
    is_count,
    is_finite_number,
    load_checkpoint,
    new_file_mode,
    validate_architecture,
    validate_config,
    validate_training_checkpoint,
)
from simclrkit.config import ConfigError
from simclrkit.modelcard import Trained, _model_card, _preprocessing, sha256_of

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "Preprocess",
    "StagedOutputs",
    "check_outputs",
    "export_checkpoint",
    "load_classifier",
    "load_encoder",
    "model_card_path",
    "save_model_file",
]

FORMATS = ("torchvision", "safetensors", "torchscript", "onnx")
EXPORT_FORMAT = "simclrkit-encoder"  # the safetensors metadata "format" value
EXPORT_FORMAT_VERSION = 1
_ONNX_OPSET = 18  # the torch.export-based exporter's native opset (>= 17 as asked)
_EXPECTED = (
    "expected a simclrkit training checkpoint (a .pt file with format_version, encoder and "
    "architecture, e.g. RUN/checkpoints/last.pt) or a safetensors file written by "
    "`simclrkit export --format safetensors`; torchvision-format exports load with "
    "torchvision.models.resnetNN, TorchScript with torch.jit.load, ONNX with onnxruntime"
)


# --------------------------------------------------------------------------------------------
# Reading a trained encoder from a checkpoint or a safetensors export
# --------------------------------------------------------------------------------------------


def _file_kind(path: Path) -> str:
    """"safetensors", "torch" (torch.save: a zip or a bare pickle), "torchscript" or "other"."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        if 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "torch"  # a damaged checkpoint: torch.load gives the precise reason
        # TorchScript archives hold compiled code and its constants beside the weights.
        return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "torch"
    if head.startswith(b"\x80"):  # a pickle protocol header: torch.save's legacy format
        return "torch"
    return "other"


def _run_info(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Training facts from the checkpoint and, if it sits in RUN/checkpoints/, the run folder.

    summary.json describes the run's LAST step: its evaluation is used only when the
    checkpoint is that step, so an intermediate checkpoint is never credited with the final
    model's accuracy. The same holds for eval/eval.json when it records a step. The run
    folder's files only describe the model: a fact in them of the wrong type is left out
    rather than stopping the export.
    """
    info: dict[str, Any] = {
        "step": state.get("step"),
        "train_seconds": state.get("train_seconds"),
        "config": state.get("config") or {},
    }
    if path.parent.name != "checkpoints":
        return info
    run_dir = path.parent.parent
    summary = _read_json(run_dir / "summary.json")
    facts: dict[str, Any] = {}
    if isinstance(summary.get("data"), dict):
        data = dict(summary["data"])
        files = data.pop("skipped_files", [])
        if isinstance(files, list):
            data["skipped_examples"] = [Path(n).name for n in files[:5] if isinstance(n, str)]
        facts["data"] = data
    if summary.get("plan"):
        facts["plan"] = summary["plan"]
    evaluation: dict[str, Any] = {}
    if isinstance(summary.get("eval"), dict) and summary.get("steps") == state.get("step"):
        evaluation.update(_numbers(summary["eval"]))
    separate = _read_json(run_dir / "eval" / "eval.json")
    if separate and separate.get("step", state.get("step")) == state.get("step"):
        evaluation.update(_numbers(separate))
    if evaluation:
        facts["evaluation"] = evaluation
    for key, value in facts.items():
        try:
            info.update(_checked_info({key: value}, str(run_dir / "summary.json")))
        except CheckpointError:
            pass
    return info


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = _loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return {}
    return data if isinstance(data, dict) else {}


def _numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a nested dict, keyed "outer.inner" (booleans are not
    numbers)."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif (
            is_finite_number(value)
            and key != "step"
            and not str(key).endswith("seconds")  # how long evaluation took is not a result
        ):
            flat[f"{prefix}{key}"] = value
    return flat


# The facts the model card formats, and what each must be for that to work.
_FACT_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "data": {
        "name": (lambda v: isinstance(v, str), "a string"),
        "split": (lambda v: isinstance(v, str), "a string"),
        "size": (is_count, "an integer >= 0"),
        "skipped": (is_count, "an integer >= 0"),
        "skipped_examples": (
            lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
            "a list of file names",
        ),
    },
    "plan": {
        "steps_per_epoch": (lambda v: is_finite_number(v) and v > 0, "a number > 0"),
        "scaled_lr": (is_finite_number, "a number"),
    },
}


def _checked_info(info: Any, source: str) -> dict[str, Any]:
    """Training facts (step, time, config, data, plan, evaluation) with the types the model
    card and the metadata rely on; other keys are kept as they are.

    Raises:
        CheckpointError: naming ``source`` and the first fact of the wrong type.
    """
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{source}: the training facts are {type(info).__name__}, not a mapping ({_DAMAGED})"
        )
    checked = dict(info)
    check_progress(info, source)
    if info.get("config"):
        checked["config"] = validate_config(info["config"], source)
    elif "config" in info:
        checked["config"] = {}
    for section, checks in _FACT_CHECKS.items():
        if section not in info:
            continue
        value = info[section]
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{source}: {section} is {type(value).__name__}, not a mapping ({_DAMAGED})"
            )
        for key, (valid, allowed) in checks.items():
            if key in value and not valid(value[key]):
                raise CheckpointError(
                    f"{source}: {section}.{key} is {_shown(value[key])}; allowed: {allowed} "
                    f"({_DAMAGED})"
                )
    if "evaluation" in info:
        evaluation = info["evaluation"]
        if not isinstance(evaluation, dict):
            raise CheckpointError(
                f"{source}: evaluation is {type(evaluation).__name__}, not a mapping ({_DAMAGED})"
            )
        for key, value in evaluation.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CheckpointError(
                    f"{source}: evaluation {_shown(key)} is {_shown(value)}, not a number "
                    f"({_DAMAGED})"
                )
        # null (and NaN from older writers) means "no value": nothing to report.
        checked["evaluation"] = {k: v for k, v in evaluation.items() if is_finite_number(v)}
    return checked


def _read_checkpoint(path: Path, map_location: str | torch.device) -> Trained:
    try:
        state = load_checkpoint(path, map_location=map_location)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_EXPECTED}") from None
    state = validate_training_checkpoint(state, str(path))
    info = _run_info(path, state)
    return Trained(state["encoder"], state["head"], state["architecture"], info,
                   state["classifier"], state.get("classifier_input", 0))


_MAX_NESTING = 32  # far deeper than anything simclrkit writes; a forgery's nesting is refused


def _too_deep(value: Any, limit: int = _MAX_NESTING) -> bool:
    """Whether lists and dicts nest deeper than ``limit`` (counted without recursion, so a
    value nested a thousand deep cannot exhaust Python's stack here or in later readers)."""
    level = [value]
    for _ in range(limit + 1):
        level = [
            item
            for container in level
            if isinstance(container, (dict, list))
            for item in (container.values() if isinstance(container, dict) else container)
        ]
        if not level:
            return False
    return True


def _loads(text: str) -> Any:
    """``json.loads`` for files and metadata a user hands over: nesting deeper than
    :data:`_MAX_NESTING` is a ValueError, like any other malformed JSON."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _too_deep(value):
        raise ValueError(f"nested deeper than {_MAX_NESTING} levels")
    return value


def _metadata_json(metadata: dict[str, str], key: str, source: str) -> Any:
    try:
        return _loads(metadata[key])
    except ValueError as error:
        reason = str(error).splitlines()[0][:200]
        raise CheckpointError(
            f"{source}: the {key!r} metadata is not valid JSON ({reason}); {_DAMAGED}"
        ) from None


def _parse_export_metadata(metadata: Any, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The validated architecture and training facts of a safetensors export's metadata.

    Raises:
        CheckpointError: not simclrkit metadata, a newer format, or a missing, unparsable or
            wrong entry (the message names it).
    """
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{source}: the safetensors metadata is not text ({_DAMAGED})")
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{source} is a safetensors file without simclrkit metadata (format "
            f"{_shown(metadata.get('format'))}, not {EXPORT_FORMAT!r}); {_EXPECTED}"
        )
    raw_version = metadata.get("format_version", "")
    if not raw_version.isdigit() or not raw_version.isascii() or len(raw_version) > 9:
        raise CheckpointError(
            f"{source}: export format_version is {_shown(raw_version)}, not a version number "
            f"({_DAMAGED})"
        )
    if int(raw_version) > EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has export format version {int(raw_version)}; this simclrkit reads up "
            f"to {EXPORT_FORMAT_VERSION}: upgrade simclrkit"
        )
    if "architecture" not in metadata:
        raise CheckpointError(f"{source}: the metadata has no 'architecture' entry ({_DAMAGED})")
    architecture = validate_architecture(
        _metadata_json(metadata, "architecture", source), source
    )
    info = _metadata_json(metadata, "training", source) if "training" in metadata else {}
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{source}: the 'training' metadata is {type(info).__name__}, not a mapping "
            f"({_DAMAGED})"
        )
    if "evaluation" in metadata:
        info = {**info, "evaluation": _metadata_json(metadata, "evaluation", source)}
    return architecture, _checked_info(info, source)


def _read_safetensors(path: Path, map_location: str | torch.device) -> Trained:
    """Checks metadata and every tensor's name and shape (read from the header, no data)
    before loading any tensor."""
    from safetensors import SafetensorError, safe_open

    source = str(path)
    try:
        with safe_open(source, framework="pt", device=str(map_location)) as handle:
            architecture, info = _parse_export_metadata(handle.metadata() or {}, source)
            names = list(handle.keys())
            stray = [n for n in names if not n.startswith(("encoder.", "head.", "classifier."))]
            if stray:
                raise CheckpointError(
                    f"{source}: tensor {stray[0]} is none of encoder.*, head.* and classifier.* "
                    f"({_DAMAGED})"
                )
            shapes: dict[str, dict[str, tuple[int, ...]] | None] = {
                "encoder": {}, "head": {}, "classifier": {}
            }
            for name in names:
                part, _, key = name.partition(".")
                shapes[part][key] = tuple(handle.get_slice(name).get_shape())
            if not shapes["head"]:
                shapes["head"] = None
            classifier_shapes = shapes.pop("classifier")
            check_tensor_shapes(architecture, shapes, source)
            classifier_input = 0
            if classifier_shapes:
                raw = handle.metadata().get("classifier_input", "0")
                classifier_input = int(raw) if raw.isdigit() and len(raw) < 3 else raw
                check_classifier(architecture, classifier_shapes, classifier_input,
                                 shapes["head"] is not None, source)  # fmt: skip
            tensors = {name: handle.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {path} as safetensors ({error}); {_EXPECTED}") from None

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return Trained(part("encoder."), part("head.") or None, architecture, info,
                   part("classifier.") or None, classifier_input)


def read_trained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Trained:
    """Reads a training checkpoint, a run folder (its checkpoints/last.pt) or a safetensors export.

    Everything a model is built from is validated first (``checkpoint.py``): names, types
    and bounds of the architecture, the config, and every tensor's shape against the one
    the architecture implies, so a damaged or forged file fails here, in one line, without
    allocating the model it claims.

    Raises:
        CheckpointError: missing file, or a file that is not one of these, or one whose
            contents are damaged (the message says what was expected or what is wrong).
    """
    path = _checkpoint_file(path)
    kind = _file_kind(path)
    if kind == "safetensors":
        return _read_safetensors(path, map_location)
    if kind == "torchscript":
        raise CheckpointError(
            f"{path} is a TorchScript archive (load it with torch.jit.load); {_EXPECTED}"
        )
    if kind == "other":
        raise CheckpointError(f"{path} is neither a PyTorch nor a safetensors file; {_EXPECTED}")
    return _read_checkpoint(path, map_location)


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """The file a checkpoint argument names: itself, or a run folder's checkpoints/last.pt."""
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"{path} is a folder without checkpoints/last.pt; {_EXPECTED}")
        return last
    if not path.is_file():
        raise CheckpointError(f"not found: {path}")
    return path


def build_model_from(trained: Trained) -> nn.Module:
    """The SimCLR module (encoder f and head g) with the stored weights, in eval mode.

    Shapes were checked when the file was read; what can still fail here (a dtype that
    cannot be copied, say) is reported as a damaged file too.
    """
    from simclrkit.models import build_model

    try:
        model = build_model(trained.architecture)
        model.encoder.load_state_dict(trained.encoder_state)
        if trained.head_state is not None:
            model.head.load_state_dict(trained.head_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"the stored weights do not match the stored architecture {trained.architecture} "
            f"({str(error).splitlines()[0]})"
        ) from None
    return model.eval()


# --------------------------------------------------------------------------------------------
# Preprocessing and loading
# --------------------------------------------------------------------------------------------


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) with C in {1, 3} -> (B, channels, H, W), converting gray <-> RGB.

    RGB -> gray uses the ITU-R 601 luma weights (torchvision, and tf.image.rgb_to_grayscale).
    A gray picture stored as RGB (three equal channels, as data.py decodes grayscale files)
    keeps its exact values instead: the weights sum to 0.9999, not 1.
    """
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        same = (images[:, :1] == images[:, 1:2]) & (images[:, 1:2] == images[:, 2:])
        same = same.flatten(1).all(dim=1)
        if bool(same.all()):
            return images[:, :1]
        floats = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return torch.where(same[:, None, None, None], floats[:, :1], rgb_to_grayscale(floats))
    raise ValueError(f"images must have 1 or 3 channels, got {have} (drop an alpha channel first)")


@dataclass(frozen=True)
class Preprocess:
    """Images -> the encoder's input: the test-time view at the training size (SPEC §2).

    Accepts a PIL image, a (C, H, W) or (B, C, H, W) tensor (uint8, or float in [0, 1]) with
    1 or 3 channels, or a list of these (of any sizes). Channels are converted to the
    encoder's (gray <-> RGB), then ``augment.apply_eval(train=False)`` crops and resizes.

    Attributes:
        image_size: side S of the encoder's input.
        in_channels: C expected by the encoder.
        device: where the output goes; None keeps the input's device (CPU for PIL images).
    """

    image_size: int
    in_channels: int
    device: str | torch.device | None = None

    def __call__(self, images: Any) -> torch.Tensor:
        """Returns (B, in_channels, S, S) float32 in [0, 1]."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images to preprocess")
            batch = torch.cat([self._one(image) for image in images])
        else:
            batch = self._one(images)
        return batch if self.device is None else batch.to(self.device)

    def _one(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, Image.Image):
            from simclrkit.data import to_chw, to_rgb_array

            # The decoder data.py uses for image files (EXIF orientation, alpha dropped, 16-bit
            # scaled); it transposes in place, so it gets a copy of the caller's image.
            image = to_chw(to_rgb_array(image.copy()))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4:
            raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
        return apply_eval(_match_channels(image, self.in_channels), self.image_size, train=False)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The trained encoder f in eval mode, ready to map images to h, in one line.

    ``encoder = load_encoder("runs/x/checkpoints/last.pt"); h = encoder(encoder.preprocess(img))``

    Args:
        path: a training checkpoint (``RUN/checkpoints/*.pt``), a run folder, or a safetensors
            export. Loading runs no code from the file (weights only).
        device: where the module and ``preprocess``'s output live.

    Returns:
        A :class:`~simclrkit.models.ResNetEncoder` (forward: (B, C, S, S) -> h (B, D)) with
        attributes ``preprocess`` (a :class:`Preprocess`), ``feature_dim`` (D) and
        ``architecture`` (the dict it was built from).

    Raises:
        CheckpointError: the file is missing or is not a simclrkit checkpoint or export.
    """
    trained = read_trained(path)
    encoder = build_model_from(trained).encoder.to(device)
    encoder.architecture = dict(trained.architecture)
    encoder.preprocess = Preprocess(
        trained.architecture["image_size"], trained.architecture["in_channels"], device
    )
    return encoder


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The fine-tuned, distilled or imported network that predicts classes, in eval mode.

    ``net = load_classifier("runs/x/eval/finetuned_10pct_seed0.pt");
    logits = net(net.preprocess(images))``

    Args:
        path: a file holding a classifier (``classifier.py``): what ``simclrkit evaluate
            --protocol finetune`` and ``simclrkit distill`` write, a safetensors export of one,
            or what ``simclrkit import-tf`` writes from a checkpoint with a supervised head.
        device: where the module and ``preprocess``'s output live.

    Returns:
        A :class:`~simclrkit.classifier.Classifier` (forward: (B, C, S, S) -> logits (B, K))
        with ``preprocess``, ``architecture`` and ``info`` (the file's training facts).

    Raises:
        CheckpointError: the file is missing, damaged, or holds no classifier.
    """
    from simclrkit.classifier import from_model

    trained = read_trained(path)
    if trained.classifier_state is None:
        raise CheckpointError(
            f"{path} holds an encoder without a classifier; fine-tune it first "
            "(simclrkit evaluate CHECKPOINT --protocol finetune writes RUN/eval/finetuned_*.pt)"
        )
    network = from_model(build_model_from(trained), trained.classifier_input, trained.classifier_state)
    network = network.to(device).eval()
    network.architecture = dict(trained.architecture)
    network.info = dict(trained.info)
    network.preprocess = Preprocess(
        trained.architecture["image_size"], trained.architecture["in_channels"], device
    )
    return network


# --------------------------------------------------------------------------------------------
# Writing outputs whole
# --------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    """Whether two names are one file: same device and inode when both exist (symlinks and
    hard links included), else the same resolved path."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def check_outputs(
    outputs: Sequence[tuple[Path, str]],
    inputs: Sequence[Path],
    *,
    overwrite: bool,
    example: str,
) -> None:
    """Refuses, before any work, outputs that would destroy something.

    Args:
        outputs: ``(path, what)`` pairs; the first is the ``--out`` file, the others its
            companions (``what`` names them in messages: "model card", "file list").
        inputs: the files the command reads; an output may not be one of them, under any name.
        overwrite: whether existing output files may be replaced.
        example: a file name to suggest when ``--out`` is a folder.

    Raises:
        ConfigError: an output is an input, a folder, or exists without ``overwrite``.
    """
    out = outputs[0][0]
    for path, what in outputs:
        for source in inputs:
            if _same_file(path, source):
                raise ConfigError(
                    f"--out: {path} ({what}) is the input {source} (the same file); writing it "
                    "would destroy the input: choose another --out"
                )
        if path.is_dir():
            if path == out:
                raise ConfigError(
                    f"--out: {path} is a folder; name the file to write, e.g. {path / example}"
                )
            raise ConfigError(
                f"--out: {path}, where the {what} of {out} goes, is a folder: remove it or "
                "choose another --out"
            )
    existing = [(path, what) for path, what in outputs if os.path.lexists(path)]
    if existing and not overwrite:
        path, what = existing[0]
        companions = " and ".join(what for _, what in outputs[1:])
        also = f" (and its {companions})" if companions else ""
        raise ConfigError(
            f"--out: {path} ({what}) already exists; pass --overwrite to replace {out}{also}, "
            "or choose another --out"
        )


class StagedOutputs:
    """Files that appear under their final names together, or not at all.

    Each file is written to a temporary ``.tmp-*`` name beside its destination (the same
    file system, so renaming is atomic), given the permissions an ordinary new file gets
    (the umask's: writers that create private 0600 files, as safetensors does, would
    otherwise make a file meant for sharing unreadable to others), and fsynced. Only when
    every file is complete does :meth:`commit` rename them into place; if a rename fails,
    the files already renamed are put back as they were (a file that existed before is
    restored from a hard link, or a copy where the file system has no hard links). Leaving
    the ``with`` block without a commit removes every temporary, so an error at any point
    leaves the destinations exactly as they were.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged = []

    def write(self, final: str | os.PathLike, write: Callable[[str], None]) -> Path:
        """Runs ``write(temporary_path)`` for ``final``; returns the temporary path."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.parent / f".tmp-{secrets.token_hex(8)}{final.suffix}"
        self._staged.append((temporary, final))
        write(str(temporary))
        os.chmod(temporary, new_file_mode())
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return temporary

    def commit(self) -> None:
        """Renames every staged file to its final name, all or none."""
        done: list[tuple[Path, Path | None]] = []  # (final, the earlier file's backup)
        backup: Path | None = None
        try:
            for temporary, final in self._staged:
                backup = None
                if os.path.lexists(final):
                    backup = final.parent / f".tmp-{secrets.token_hex(8)}.previous"
                    try:
                        os.link(final, backup, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(final, backup, follow_symlinks=False)
                os.replace(temporary, final)
                done.append((final, backup))
                backup = None
        except BaseException:
            if backup is not None:  # made for the rename that failed
                backup.unlink(missing_ok=True)
            for final, previous in reversed(done):
                if previous is None:
                    final.unlink(missing_ok=True)
                else:
                    os.replace(previous, final)
            raise
        for _, previous in done:
            if previous is not None:
                previous.unlink(missing_ok=True)
        for folder in {final.parent for _, final in self._staged}:
            fsync_folder(folder)
        self._staged = []


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def model_card_path(out_path: str | os.PathLike) -> Path:
    """Where :func:`export_checkpoint` writes the card of ``out_path``: ``<out>.MODEL_CARD.md``."""
    return Path(f"{out_path}.MODEL_CARD.md")


_EXAMPLE_NAMES = {
    "torchvision": "encoder.pt",
    "safetensors": "encoder.safetensors",
    "torchscript": "encoder.torchscript.pt",
    "onnx": "encoder.onnx",
}


def _input_files(checkpoint_path: str | os.PathLike) -> list[Path]:
    """The files an export or embedding reads besides images: the checkpoint and, for a run
    folder's checkpoint, the summary and evaluation it takes facts from."""
    path = Path(checkpoint_path)
    files = [path]
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
        files.append(path)
    if path.parent.name == "checkpoints":
        run_dir = path.parent.parent
        files += [run_dir / "summary.json", run_dir / "eval" / "eval.json"]
    return [file for file in files if file.exists()]


def _torchvision_blockers(arch: dict[str, Any]) -> list[str]:
    """Why the encoder cannot be loaded into ``torchvision.models.<encoder>()``; empty if it can."""
    reasons = []
    if arch["width"] != 1:
        reasons.append(
            f"width {arch['width']} (every channel count is scaled; torchvision has width 1 only, "
            "and its wide_resnet*_2 widens differently)"
        )
    if arch["cifar_stem"]:
        stem = max(1, round(64 * arch["width"]))
        reasons.append(
            f"the CIFAR stem (conv1 is 3x3 stride 1 with no max-pool, shape "
            f"({stem}, {arch['in_channels']}, 3, 3); torchvision's conv1 is 7x7 stride 2 followed "
            "by a max-pool, shape (64, 3, 7, 7))"
        )
    if arch["in_channels"] != 3:
        reasons.append(f"{arch['in_channels']} input channel(s) (torchvision's conv1 takes 3)")
    if arch.get("sk_ratio", 0) or arch.get("se_ratio", 0):
        reasons.append("SimCLRv2's selective kernels or squeeze-excitation (torchvision's "
                       "ResNets have neither)")
    if arch.get("stem_pool") == "tf_same":
        reasons.append("TensorFlow's 'SAME' stem max-pool of an imported model (torchvision's "
                       "pads every side, which moves each window by a pixel)")
    if arch["encoder"] == "resnet200":
        reasons.append("depth 200 (torchvision stops at resnet152)")
    return reasons


def _metadata(trained: Trained, feature_dim: int) -> dict[str, str]:
    """safetensors metadata (strings only) that makes the file self-describing."""
    info = {key: value for key, value in trained.info.items() if key != "evaluation"}
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_FORMAT_VERSION),
        "simclrkit_version": __version__,
        "architecture": jsonout.dumps(trained.architecture),
        "feature_dim": str(feature_dim),
        "preprocessing": jsonout.dumps(_preprocessing(trained.architecture)),
        "training": jsonout.dumps(info),
    }
    if trained.info.get("evaluation"):
        metadata["evaluation"] = jsonout.dumps(trained.info["evaluation"])
    if trained.classifier_state is not None:
        metadata["classifier_input"] = str(trained.classifier_input)
    return metadata


def _example_input(arch: dict[str, Any], batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, arch["in_channels"], arch["image_size"], arch["image_size"])
    return torch.rand(shape, generator=generator)


def _check_agreement(
    name: str, run: Callable[[torch.Tensor], torch.Tensor], encoder: nn.Module, arch: dict[str, Any]
) -> None:
    """The exported program must give the encoder's h on a batch size it was not traced with."""
    x = _example_input(arch, 3, seed=1)
    with torch.no_grad():
        expected = encoder(x)
        got = run(x)
    error = (got - expected).abs().max().item()
    if not error <= 1e-4 * max(1.0, expected.abs().max().item()):
        raise RuntimeError(f"the {name} export disagrees with the encoder (max |diff| {error:.3g})")


def _torchscript_writer(encoder: nn.Module, trained: Trained) -> Callable[[str], None]:
    """Traces the encoder; the returned function saves it to a path and checks the saved file."""
    example = _example_input(trained.architecture, 2, seed=0)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export but still the format many
        # deployment stacks (and the issue) ask for; the warning would only alarm users.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            # check_trace would trace a second time; _check_agreement below is the stronger
            # check (the saved file, another batch size).
            program = torch.jit.trace(encoder, (example,), check_trace=False)
    extra = {"simclrkit.json": jsonout.dumps(_metadata(trained, encoder.feature_dim))}

    def write(path: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(program, path, _extra_files=extra)
            loaded = torch.jit.load(path)  # checked before it takes the final name
        with torch.no_grad():
            _check_agreement("TorchScript", loaded, encoder, trained.architecture)

    return write


def _onnx_writer(encoder: nn.Module, trained: Trained) -> Callable[[str], None]:
    """The function that exports the encoder to an ONNX file and checks it (onnxruntime)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs the {' and '.join(missing)} package(s): "
            f"pip install {' '.join(missing)} (and onnxruntime to check and run the file)"
        )
    import onnx

    example = _example_input(trained.architecture, 2, seed=0)
    metadata = _metadata(trained, encoder.feature_dim)

    def export(path: str) -> None:
        torch.onnx.export(
            encoder,
            (example,),
            path,
            input_names=["images"],
            output_names=["h"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=_ONNX_OPSET,
            dynamo=True,
            external_data=False,  # one self-contained file (protobuf caps it at 2 GB)
            verbose=False,
        )
        model = onnx.load(path)
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, path)
        if importlib.util.find_spec("onnxruntime") is not None:  # checked before the rename
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            _check_agreement(
                "ONNX",
                lambda x: torch.from_numpy(session.run(["h"], {"images": x.numpy()})[0]),
                encoder,
                trained.architecture,
            )

    def write(path: str) -> None:
        # The exporter reports its progress on stdout; that is noise for a library call.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            export(path)

    return write


def save_model_file(trained: Trained, out_path: str | os.PathLike, *, inputs: Sequence[Path] = (),
                    overwrite: bool = False) -> Path:  # fmt: skip
    """Writes a network that no simclrkit run produced (an imported TF model, say) as a file
    every reader here takes: ``.safetensors`` in the export layout (metadata included), or
    ``.pt`` in the checkpoint layout (without a run's config). Its parts are checked against
    its architecture first (names, shapes, the classifier), and the file appears whole or not
    at all.

    Raises:
        ConfigError: ``out_path`` has another suffix, or is refused by :func:`check_outputs`.
        CheckpointError: the parts do not fit the architecture.
    """
    out = Path(out_path)
    if out.suffix not in (".safetensors", ".pt"):
        raise ConfigError(
            f"--out: {out} ends in {out.suffix or 'no suffix'}; name a .safetensors file (the "
            "export layout) or a .pt file (the checkpoint layout)"
        )
    check_outputs([(out, "model file")], list(inputs), overwrite=overwrite,
                  example="model.safetensors")  # fmt: skip
    state = {
        "format_version": FORMAT_VERSION,
        "architecture": trained.architecture,
        "encoder": trained.encoder_state,
        "head": trained.head_state,
        "step": trained.info.get("step"),
        **({"classifier": trained.classifier_state, "classifier_input": trained.classifier_input}
           if trained.classifier_state is not None else {}),  # fmt: skip
    }
    validate_training_checkpoint(state, str(out))
    model = build_model_from(trained)
    write: Callable[[str], None]
    if out.suffix == ".pt":
        write = lambda path: torch.save(state, path)  # noqa: E731
    else:
        from safetensors.torch import save_file

        parts = {"encoder": trained.encoder_state, "head": trained.head_state or {},
                 "classifier": trained.classifier_state or {}}  # fmt: skip
        tensors = {f"{part}.{k}": v.contiguous() for part, tensors in parts.items()
                   for k, v in tensors.items()}  # fmt: skip
        metadata = _metadata(trained, model.encoder.feature_dim)
        write = lambda path: save_file(tensors, path, metadata=metadata)  # noqa: E731
    with StagedOutputs() as staged:
        staged.write(out, write)
        check_outputs([(out, "model file")], list(inputs), overwrite=overwrite,
                      example="model.safetensors")  # fmt: skip
        staged.commit()
    return out


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    fmt: str,
    out_path: str | os.PathLike,
    *,
    include_head: bool = False,
    overwrite: bool = False,
) -> Path:
    """Exports the encoder f of a checkpoint, plus a model card ``<out>.MODEL_CARD.md``.

    Formats (all take (B, C, S, S) floats in [0, 1], no mean/std, and give h of shape (B, D)):

    * ``torchvision``: a plain dict of tensors (``torch.save``; loads with weights_only=True)
      that ``torchvision.models.resnetNN()`` loads with ``strict=False``, only ``fc.*``
      missing. Needs width 1, the ImageNet stem and 3 input channels.
    * ``safetensors``: ``encoder.*`` tensors (and ``head.*`` with ``include_head``) plus
      metadata (architecture, preprocessing, version, training facts, evaluation), and the
      classifier (``classifier.*``, with the head when it reads through head layers) of a
      fine-tuned, distilled or imported network; :func:`load_encoder` and
      :func:`load_classifier` read it.
    * ``torchscript``: the traced encoder in eval mode (metadata in the archive's extra file
      ``simclrkit.json``).
    * ``onnx``: opset 18, dynamic batch axis, input ``images``, output ``h`` (needs the
      ``onnx`` and ``onnxscript`` packages; checked against PyTorch with onnxruntime when it
      is installed).

    TorchScript and ONNX exports are checked against the PyTorch encoder before they are
    given their names.

    The export and its card are one unit: both are written completely under temporary names
    (the card records the weights' sha256), then renamed into place together
    (:class:`StagedOutputs`); an error at any point leaves no new file and every existing file
    as it was. Outputs get the usual permissions of a new file (the umask's).

    Args:
        checkpoint_path: a training checkpoint, a run folder or a safetensors export.
        fmt: one of :data:`FORMATS`.
        out_path: the file to write; it may not be the input (under any name), a folder, or
            an existing file unless ``overwrite``.
        include_head: also store the projection head g (safetensors only).
        overwrite: replace an existing ``out_path`` and card.

    Returns:
        The path written.

    Raises:
        ConfigError: unknown format, a head asked of a format without one, an encoder
            torchvision cannot express (the message says why and what to use instead), a
            missing optional package, or an ``out_path`` refused as above.
        CheckpointError: the input is not a simclrkit checkpoint or export, or is damaged.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if include_head and fmt != "safetensors":
        raise ConfigError(
            f"--include-head: only the safetensors format stores the projection head; a {fmt} "
            "export holds the encoder f alone"
        )
    out = Path(out_path)
    card_path = model_card_path(out)
    outputs = [(out, f"{fmt} export"), (card_path, "model card")]
    inputs = _input_files(checkpoint_path)
    check_outputs(outputs, inputs, overwrite=overwrite, example=_EXAMPLE_NAMES[fmt])
    trained = read_trained(checkpoint_path)
    arch = trained.architecture
    if include_head and trained.head_state is None:
        raise ConfigError(f"--include-head: {checkpoint_path} holds no projection head")
    if fmt == "torchvision":
        blockers = _torchvision_blockers(arch)
        if blockers:
            raise ConfigError(
                f"--format torchvision: this encoder cannot be loaded into "
                f"torchvision.models.{arch['encoder']}() because of {'; '.join(blockers)}. "
                "Export with --format safetensors instead (load it with "
                "simclrkit.load_encoder), or torchscript / onnx for a self-contained model"
            )
    model = build_model_from(trained)
    encoder = model.encoder
    write: Callable[[str], None]
    if fmt == "torchvision":
        # Clones: a state dict's tensors may share storage with the live module.
        state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        write = lambda path: torch.save(state, path)  # noqa: E731
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
        # A classifier that reads through head layers needs the head (classifier.py).
        if include_head or (trained.classifier_state is not None and trained.classifier_input):
            head = model.head.state_dict()
            tensors.update({f"head.{k}": v.contiguous() for k, v in head.items()})
        if trained.classifier_state is not None:
            tensors.update({f"classifier.{k}": v.contiguous()
                            for k, v in trained.classifier_state.items()})  # fmt: skip
        metadata = _metadata(trained, encoder.feature_dim)
        write = lambda path: save_file(tensors, path, metadata=metadata)  # noqa: E731
    elif fmt == "torchscript":
        write = _torchscript_writer(encoder, trained)
    else:
        write = _onnx_writer(encoder, trained)
    with StagedOutputs() as staged:
        weights = staged.write(out, write)
        card = _model_card(trained, encoder, fmt, out, include_head, sha256_of(weights))
        staged.write(card_path, lambda path: Path(path).write_text(card, encoding="utf-8"))
        # The inputs were checked before the work; a file put in an output's place since
        # (a folder, a link to an input) is refused now, before anything is renamed.
        check_outputs(outputs, inputs, overwrite=overwrite, example=_EXAMPLE_NAMES[fmt])
        staged.commit()
    return out
