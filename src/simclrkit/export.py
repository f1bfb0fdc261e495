"""Using a trained encoder: export it, load it in one line, embed folders of images with it.

After pretraining, the projection head g is thrown away and the encoder f is what is used
(paper §2.1, §4.2: h, not z, is the representation). This module turns a training checkpoint
into files other code can use, and back into a module:

* :func:`export_checkpoint` writes the encoder as a torchvision state dict, a safetensors file
  with metadata, TorchScript or ONNX, each with a model card ``<out>.MODEL_CARD.md`` beside
  it. The card's name is the export's name plus a suffix (``encoder.onnx.MODEL_CARD.md``), so
  several exports can share a folder without overwriting each other's cards.
* :func:`load_encoder` rebuilds the encoder from a training checkpoint or a safetensors export
  (weights only: ``torch.load(weights_only=True)`` or safetensors, nothing that can run code)
  and attaches ``preprocess``, the test-time transform it was evaluated with.
* :func:`embed_images` computes h for every image of some files and folders, with the same
  safe decoding as training (``data.py``), and writes ``.npy`` or ``.parquet``.

Inputs are the reference's: floats in [0, 1] with no mean/std normalisation (SPEC §2), and the
test-time view is a centre crop of 0.875 of the shorter side resized to the training size (the
whole image for sizes <= 32 px), bicubic. Users of the torchvision export must NOT apply the
usual ImageNet mean/std: these weights never saw normalised inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrkit import __version__
from simclrkit.augment import apply_eval
from simclrkit.checkpoint import CheckpointError, load_checkpoint
from simclrkit.config import ConfigError

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "Preprocess",
    "embed_images",
    "export_checkpoint",
    "load_encoder",
    "model_card_path",
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


@dataclass(frozen=True)
class _Trained:
    """What an export needs: weights, the architecture, and what is known about the run."""

    encoder_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor] | None
    architecture: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # step, config, data, evaluation


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
    model's accuracy. The same holds for eval/eval.json when it records a step.
    """
    info: dict[str, Any] = {
        "step": state.get("step"),
        "train_seconds": state.get("train_seconds"),
        "config": state.get("config", {}),
    }
    if path.parent.name != "checkpoints":
        return info
    run_dir = path.parent.parent
    summary = _read_json(run_dir / "summary.json")
    if summary.get("data"):
        data = dict(summary["data"])
        files = data.pop("skipped_files", [])
        data["skipped_examples"] = [Path(name).name for name in files[:5]]
        info["data"] = data
    if summary.get("plan"):
        info["plan"] = summary["plan"]
    evaluation: dict[str, Any] = {}
    if summary.get("eval") and summary.get("steps") == state.get("step"):
        evaluation.update(_numbers(summary["eval"]))
    separate = _read_json(run_dir / "eval" / "eval.json")
    if separate and separate.get("step", state.get("step")) == state.get("step"):
        evaluation.update(_numbers(separate))
    if evaluation:
        info["evaluation"] = evaluation
    return info


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed "outer.inner" (booleans are not numbers)."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key != "step"
            and not key.endswith("seconds")  # how long evaluation took is not a result
        ):
            flat[f"{prefix}{key}"] = value
    return flat


def _read_checkpoint(path: Path, map_location: str | torch.device) -> _Trained:
    try:
        state = load_checkpoint(path, map_location=map_location)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_EXPECTED}") from None
    if not isinstance(state.get("architecture"), dict):
        raise CheckpointError(f"{path} has no 'architecture' entry; {_EXPECTED}")
    info = _run_info(path, state)
    return _Trained(state["encoder"], state.get("head"), state["architecture"], info)


def _read_safetensors(path: Path, map_location: str | torch.device) -> _Trained:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:
                raise CheckpointError(
                    f"{path} is a safetensors file without simclrkit metadata (format "
                    f"{metadata.get('format')!r}, not {EXPORT_FORMAT!r}); {_EXPECTED}"
                )
            if int(metadata.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} has export format version {metadata['format_version']}; this "
                    f"simclrkit reads up to {EXPORT_FORMAT_VERSION}: upgrade simclrkit"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {path} as safetensors ({error}); {_EXPECTED}") from None
    try:
        architecture = json.loads(metadata["architecture"])
        info = json.loads(metadata.get("training", "{}"))
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: damaged simclrkit metadata ({error})") from None
    if "evaluation" in metadata:
        info["evaluation"] = json.loads(metadata["evaluation"])

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return _Trained(part("encoder."), part("head.") or None, architecture, info)


def _read_trained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> _Trained:
    """Reads a training checkpoint, a run folder (its checkpoints/last.pt) or a safetensors export.

    Raises:
        CheckpointError: missing file, or a file that is not one of these (the message says
            what was expected).
    """
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"{path} is a folder without checkpoints/last.pt; {_EXPECTED}")
        path = last
    if not path.is_file():
        raise CheckpointError(f"not found: {path}")
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


def _build(trained: _Trained) -> nn.Module:
    """The SimCLR module (encoder f and head g) with the stored weights, in eval mode."""
    from simclrkit.train import build_model

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
    trained = _read_trained(path)
    encoder = _build(trained).encoder.to(device)
    encoder.architecture = dict(trained.architecture)
    encoder.preprocess = Preprocess(
        trained.architecture["image_size"], trained.architecture["in_channels"], device
    )
    return encoder


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def model_card_path(out_path: str | os.PathLike) -> Path:
    """Where :func:`export_checkpoint` writes the card of ``out_path``: ``<out>.MODEL_CARD.md``."""
    return Path(f"{out_path}.MODEL_CARD.md")


def _write_atomically(out: Path, write: Callable[[str], None]) -> None:
    """Runs ``write(temporary_path)`` in ``out``'s folder, then renames it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp, whose 0600 mode would make a file meant for sharing
    # private: the writer creates it with the user's usual permissions.
    temporary = str(out.parent / f".tmp-{secrets.token_hex(8)}{out.suffix}")
    try:
        write(temporary)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    return reasons


def _preprocessing(arch: dict[str, Any]) -> dict[str, Any]:
    size = arch["image_size"]
    crop = (
        f"centre crop of 0.875 of the shorter side, resized to {size}x{size}"
        if size > 32
        else f"whole image resized to {size}x{size} (no crop at <= 32 px)"
    )
    return {
        "image_size": size,
        "in_channels": arch["in_channels"],
        "input_range": "[0, 1]",
        "normalization": "none (no mean/std: inputs are floats in [0, 1], as in the reference)",
        "eval_transform": f"{crop}, bicubic (simclrkit.augment.apply_eval(train=False))",
        "layout": "(B, C, H, W) float32",
    }


def _metadata(trained: _Trained, feature_dim: int) -> dict[str, str]:
    """safetensors metadata (strings only) that makes the file self-describing."""
    info = {key: value for key, value in trained.info.items() if key != "evaluation"}
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_FORMAT_VERSION),
        "simclrkit_version": __version__,
        "architecture": json.dumps(trained.architecture),
        "feature_dim": str(feature_dim),
        "preprocessing": json.dumps(_preprocessing(trained.architecture)),
        "training": json.dumps(info),
    }
    if trained.info.get("evaluation"):
        metadata["evaluation"] = json.dumps(trained.info["evaluation"])
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


def _export_torchscript(encoder: nn.Module, trained: _Trained, out: Path) -> None:
    example = _example_input(trained.architecture, 2, seed=0)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export but still the format many
        # deployment stacks (and the issue) ask for; the warning would only alarm users.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            # check_trace would trace a second time; _check_agreement below is the stronger
            # check (the saved file, another batch size).
            program = torch.jit.trace(encoder, (example,), check_trace=False)
        extra = {"simclrkit.json": json.dumps(_metadata(trained, encoder.feature_dim))}

        def write(path: str) -> None:
            torch.jit.save(program, path, _extra_files=extra)
            loaded = torch.jit.load(path)  # checked before it takes the final name
            with torch.no_grad():
                _check_agreement("TorchScript", loaded, encoder, trained.architecture)

        _write_atomically(out, write)


def _export_onnx(encoder: nn.Module, trained: _Trained, out: Path) -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs the {' and '.join(missing)} package(s): "
            f"pip install {' '.join(missing)} (and onnxruntime to check and run the file)"
        )
    import onnx

    example = _example_input(trained.architecture, 2, seed=0)
    metadata = _metadata(trained, encoder.feature_dim)

    def write(path: str) -> None:
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

    # The exporter reports its progress on stdout; that is noise for a library call.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        _write_atomically(out, write)


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    fmt: str,
    out_path: str | os.PathLike,
    *,
    include_head: bool = False,
) -> Path:
    """Exports the encoder f of a checkpoint, plus a model card ``<out>.MODEL_CARD.md``.

    Formats (all take (B, C, S, S) floats in [0, 1], no mean/std, and give h of shape (B, D)):

    * ``torchvision``: a plain dict of tensors (``torch.save``; loads with weights_only=True)
      that ``torchvision.models.resnetNN()`` loads with ``strict=False``, only ``fc.*``
      missing. Needs width 1, the ImageNet stem and 3 input channels.
    * ``safetensors``: ``encoder.*`` tensors (and ``head.*`` with ``include_head``) plus
      metadata (architecture, preprocessing, version, training facts, evaluation);
      :func:`load_encoder` reads it.
    * ``torchscript``: the traced encoder in eval mode (metadata in the archive's extra file
      ``simclrkit.json``).
    * ``onnx``: opset 18, dynamic batch axis, input ``images``, output ``h`` (needs the
      ``onnx`` and ``onnxscript`` packages; checked against PyTorch with onnxruntime when it
      is installed).

    TorchScript and ONNX exports are checked against the PyTorch encoder after writing.

    Args:
        checkpoint_path: a training checkpoint, a run folder or a safetensors export.
        fmt: one of :data:`FORMATS`.
        out_path: the file to write (replaced atomically).
        include_head: also store the projection head g (safetensors only).

    Returns:
        The path written.

    Raises:
        ConfigError: unknown format, a head asked of a format without one, an encoder
            torchvision cannot express (the message says why and what to use instead), or a
            missing optional package.
        CheckpointError: the input is not a simclrkit checkpoint or export.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if include_head and fmt != "safetensors":
        raise ConfigError(
            f"--include-head: only the safetensors format stores the projection head; a {fmt} "
            "export holds the encoder f alone"
        )
    out = Path(out_path)
    trained = _read_trained(checkpoint_path)
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
    model = _build(trained)
    encoder = model.encoder
    if fmt == "torchvision":
        # Clones: a state dict's tensors may share storage with the live module.
        state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        _write_atomically(out, lambda path: torch.save(state, path))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
        if include_head:
            head = model.head.state_dict()
            tensors.update({f"head.{k}": v.contiguous() for k, v in head.items()})
        metadata = _metadata(trained, encoder.feature_dim)
        _write_atomically(out, lambda path: save_file(tensors, path, metadata=metadata))
    elif fmt == "torchscript":
        _export_torchscript(encoder, trained, out)
    else:
        _export_onnx(encoder, trained, out)
    card = _model_card(trained, encoder, fmt, out, include_head)
    _write_atomically(model_card_path(out), lambda path: Path(path).write_text(card))
    return out


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _how_to_load(fmt: str, out: Path, arch: dict[str, Any]) -> list[str]:
    shape = f"(B, {arch['in_channels']}, {arch['image_size']}, {arch['image_size']})"
    snippets = {
        "safetensors": [
            "import simclrkit",
            f'encoder = simclrkit.load_encoder("{out.name}")  # eval mode, on the CPU',
            "h = encoder(encoder.preprocess(image))  # a PIL image or (C, H, W) tensor -> (1, D)",
        ],
        "torchvision": [
            "import torch, torchvision",
            f"model = torchvision.models.{arch['encoder']}()",
            f'model.load_state_dict(torch.load("{out.name}", weights_only=True), strict=False)',
            "model.fc = torch.nn.Identity()  # h instead of ImageNet logits",
            f"h = model.eval()(x)  # x: {shape} floats in [0, 1], NO mean/std",
        ],
        "torchscript": [
            "import torch",
            f'encoder = torch.jit.load("{out.name}")',
            f"h = encoder(x)  # x: {shape} floats in [0, 1]",
        ],
        "onnx": [
            "import onnxruntime",
            f'session = onnxruntime.InferenceSession("{out.name}")',
            f'h = session.run(["h"], {{"images": x}})[0]  # x: float32 {shape} in [0, 1]',
        ],
    }
    return ["```python", *snippets[fmt], "```"]


def _card_data(info: dict[str, Any]) -> list[str]:
    data = info.get("data") or {}
    dataset = data.get("name") or (info.get("config") or {}).get("data", {}).get("dataset", "?")
    lines = [f"- dataset: {dataset}" + (f" ({data['split']} split)" if data.get("split") else "")]
    if isinstance(data.get("size"), int):
        lines.append(f"- images: {data['size']:,} used for pretraining; labels unused")
    if "skipped" in data:
        examples = ", ".join(data.get("skipped_examples", []))
        examples = f" (e.g. {examples})" if examples else ""
        lines.append(f"- unreadable files skipped: {data['skipped']}{examples}")
    return lines


def _card_recipe(info: dict[str, Any]) -> list[str]:
    config, plan = info.get("config") or {}, info.get("plan") or {}
    if not config:
        return ["- not recorded with this file"]
    optim, augment = config.get("optim", {}), config.get("augment", {})
    step = info.get("step")
    epochs = (
        f" ({step / plan['steps_per_epoch']:.2f} epochs)"
        if step is not None and plan.get("steps_per_epoch")
        else ""
    )
    scaled = f" -> {plan['scaled_lr']:.4g}" if "scaled_lr" in plan else ""
    lines = [
        f"- steps: {step}{epochs}; global batch {config.get('train', {}).get('batch_size')}; "
        f"seed {config.get('seed')}",
        f"- optimiser: {optim.get('name')}, base lr {optim.get('lr')} ({optim.get('lr_scaling')} "
        f"scaling{scaled}), weight decay {optim.get('weight_decay')}, warmup "
        f"{optim.get('warmup_epochs')} epochs then cosine decay",
        f"- NT-Xent temperature {config.get('loss', {}).get('temperature')}",
        f"- augmentation: colour jitter strength {augment.get('color_jitter_strength')} "
        f"(p {augment.get('color_jitter_prob')}), grayscale p {augment.get('grayscale_prob')}, "
        f"blur {plan.get('blur', augment.get('blur'))}, crop min scale "
        f"{augment.get('crop_min_scale')}",
    ]
    if info.get("train_seconds"):
        lines.append(f"- training time: {info['train_seconds']:.0f} s")
    return lines


def _card_evaluation(info: dict[str, Any]) -> list[str]:
    evaluation = info.get("evaluation") or {}
    if not evaluation:
        return ["No evaluation was recorded for this checkpoint (pretrain with eval.linear=true)."]
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4f} |" for key, value in evaluation.items()]
    if "linear_top1" in evaluation:
        lines += [
            "",
            "linear_*: logistic regression on frozen h, fitted on the labelled train split and "
            "scored on the test split; random_init_*: the same architecture at its initial "
            "weights (what pretraining added).",
        ]
    return lines


def _model_card(
    trained: _Trained, encoder: nn.Module, fmt: str, out: Path, include_head: bool
) -> str:
    """The markdown model card: what the model is, what it saw, how good it is, how to use it."""
    arch, info = trained.architecture, trained.info
    size, channels = arch["image_size"], arch["in_channels"]
    colour = "grayscale" if channels == 1 else "RGB"
    stem = "CIFAR (3x3/1, no max-pool)" if arch["cifar_stem"] else "ImageNet (7x7/2, max-pool)"
    parameters = sum(p.numel() for p in encoder.parameters())
    head = "included (head.* tensors)" if include_head else "not included"
    data = info.get("data") or {}
    count = data.get("size")
    how_many = f"{count:,}" if isinstance(count, int) else "an unknown number of"
    lines = [
        f"# {arch['encoder']} (width {arch['width']}) SimCLR encoder, "
        f"h of size {encoder.feature_dim}",
        "",
        f"Exported by simclrkit {__version__} as **{fmt}** (`{out.name}`, sha256 "
        f"`{_sha256(out)}`) from a training checkpoint at step {info.get('step', '?')}.",
        "",
        "## Model",
        "",
        f"- encoder f: {arch['encoder']}, width multiplier {arch['width']}, {stem} stem, "
        f"{parameters:,} parameters",
        f"- output h: {encoder.feature_dim} values per image after global average pooling "
        "(paper §2.1: the representation used downstream)",
        f"- projection head g ({arch['head']}, {arch['head_layers']} layers, z of size "
        f"{arch['proj_dim']}): {head}",
        "",
        "## Input",
        "",
        f"- {channels}-channel ({colour}) float images in [0, 1], shape (B, {channels}, {size}, "
        f"{size}); **no mean/std normalisation** (as the reference trains).",
        f"- test-time view: {_preprocessing(arch)['eval_transform']}.",
        "- `simclrkit.load_encoder(...).preprocess` does all of this for PIL images and tensors.",
        "",
        "## Training data",
        "",
        *_card_data(info),
        "",
        "## Training recipe",
        "",
        *_card_recipe(info),
        "",
        "## Evaluation",
        "",
        *_card_evaluation(info),
        "",
        "## Intended use and limits",
        "",
        f"- A feature extractor for images like its training data ({how_many} {colour} images "
        f"at {size}x{size} px): fit a linear classifier or a kNN on h, or fine-tune.",
        "- Self-supervised features carry the biases of their training images; they are not "
        "validated on other domains, at resolutions far from the training size, or for any "
        "decision about people. Check accuracy on your own labelled data first.",
    ]
    if isinstance(count, int) and count < 50_000:
        lines.append(
            f"- Trained on only {count:,} images: expect features far weaker than the paper's "
            "ImageNet models (SPEC §8)."
        )
    if fmt == "torchvision":
        lines.append("- torchvision users: do NOT apply the ImageNet mean/std; feed [0, 1] floats.")
    lines += ["", "## How to load", "", *_how_to_load(fmt, out, arch), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Embedding folders of images
# --------------------------------------------------------------------------------------------


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given and folders expanded recursively (sorted), without repeats, in order."""
    from simclrkit.data import find_image_files

    paths, seen = [], set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = find_image_files(item)
        elif item.is_file():
            found = [str(item)]
        else:
            raise ConfigError(f"inputs: {item} is neither a file nor a folder")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _write_embeddings(out: Path, paths: list[str], h: np.ndarray, source: str) -> Path | None:
    """Writes .npy (+ ``<out>.files.txt``) or .parquet; returns the sidecar's path if any."""
    if out.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as parquet

        # list<float32> has 32-bit offsets; beyond 2**31 values only large_list can hold them.
        large = h.size >= 2**31
        offsets = np.arange(0, h.size + 1, h.shape[1], dtype=np.int64 if large else np.int32)
        values = pa.array(h.reshape(-1), pa.float32())
        lists = pa.LargeListArray if large else pa.ListArray
        embedding = lists.from_arrays(pa.array(offsets), values)
        table = pa.table({"path": pa.array(paths, pa.string()), "embedding": embedding})
        table = table.replace_schema_metadata({"simclrkit.encoder": source, "dim": str(h.shape[1])})
        _write_atomically(out, lambda path: parquet.write_table(table, path))
        return None

    def save(path: str) -> None:
        with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to a name
            np.save(handle, h)

    _write_atomically(out, save)
    sidecar = Path(f"{out}.files.txt")
    _write_atomically(sidecar, lambda path: Path(path).write_text("".join(p + "\n" for p in paths)))
    return sidecar


def embed_images(
    checkpoint_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    batch_size: int = 256,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Computes h for every image of ``inputs`` and writes them to ``out_path``.

    Folders are searched recursively for image files (``data.find_image_files``); files are
    decoded by data.py's safe decoder, in threads, while the previous batch runs through the
    encoder. Files that do not decode (empty, truncated, not an image, decompression bombs) are
    skipped, printed once each and returned. Each image gets the test-time view
    (:class:`Preprocess`), as in evaluation.

    Output: ``.npy`` holds float32 (N, D) with ``<out>.files.txt`` naming row i's file on line i;
    ``.parquet`` has columns ``path`` (string) and ``embedding`` (list<float32>).

    Args:
        checkpoint_path: a training checkpoint, run folder or safetensors export.
        inputs: image files and folders.
        out_path: ends with ``.npy`` or ``.parquet``.
        batch_size: images per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        quiet: no progress bar (skipped files are still listed on stderr).

    Returns:
        ``{"count": N, "skipped": [{"path", "reason"}, ...], "dim": D, "out": path, "files":
        sidecar path or None}``.

    Raises:
        ConfigError: a bad output name, batch size, device or input path; no image files; no
            file that decodes; pyarrow missing for parquet.
        CheckpointError: the checkpoint is not a simclrkit checkpoint or export.
    """
    from tqdm import tqdm

    from simclrkit.data import DEFAULT_MAX_IMAGE_PIXELS, decode_file, to_chw

    out = Path(out_path)
    if not out.name.endswith((".npy", ".parquet")):
        raise ConfigError(f"--out: {out} must end with .npy or .parquet")
    if out.name.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(
            "--out: writing .parquet needs pyarrow: pip install pyarrow (or write .npy)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size!r}; allowed: an integer >= 1")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path, not a sequence of characters
    from simclrkit.train import select_device

    target = select_device(device, key="--device")
    paths = _expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"inputs: no image files found in {', '.join(map(str, inputs))}")
    encoder = load_encoder(checkpoint_path, device=target)
    # Preprocess on the CPU, next to the decoder; one transfer per batch.
    preprocess = Preprocess(encoder.preprocess.image_size, encoder.preprocess.in_channels)
    decode = partial(decode_file, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    rows: list[torch.Tensor] = []
    workers = min(8, os.cpu_count() or 1)
    show_bar = not quiet and sys.stderr.isatty()
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(paths), unit="image", disable=not show_bar) as bar,
        torch.inference_mode(),
    ):
        pending = pool.map(decode, batches[0])
        for index, batch in enumerate(batches):
            decoded = list(pending)
            if index + 1 < len(batches):
                pending = pool.map(decode, batches[index + 1])  # decodes while this batch runs
            views = []
            for path, (pixels, reason) in zip(batch, decoded):
                if pixels is None:
                    skipped.append({"path": path, "reason": reason})
                    # Always said, also when quiet: a skipped file is a result, not progress.
                    tqdm.write(f"simclrkit: skipping {path}: {reason}", file=sys.stderr)
                    continue
                views.append(preprocess(to_chw(pixels)))
                kept.append(path)
            if views:
                rows.append(encoder(torch.cat(views).to(target)).float().cpu())
            bar.update(len(batch))
    if not rows:
        raise ConfigError(f"inputs: none of the {len(paths)} image files could be decoded")
    h = torch.cat(rows).numpy()
    sidecar = _write_embeddings(out, kept, h, str(checkpoint_path))
    return {
        "count": len(kept),
        "skipped": skipped,
        "dim": int(h.shape[1]),
        "out": str(out),
        "files": None if sidecar is None else str(sidecar),
    }
