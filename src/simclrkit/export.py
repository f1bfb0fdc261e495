"""Using a trained encoder: export it and load it in one line.

After pretraining, the projection head g is thrown away and the encoder f is what is used
(paper §2.1, §4.2: h, not z, is the representation). This module turns a training checkpoint
into files other code can use, and back into a module:

* :func:`export_checkpoint` writes the encoder as a torchvision state dict, a safetensors file
  with metadata, TorchScript or ONNX, each with a model card ``<out>.MODEL_CARD.md`` beside
  it. The card's name is the export's name plus a suffix (``encoder.onnx.MODEL_CARD.md``), so
  several exports can share a folder without overwriting each other's cards. The card's text
  is written by ``modelcard.py``.
* :func:`load_encoder` rebuilds the encoder from a training checkpoint or a safetensors export
  (weights only: ``torch.load(weights_only=True)`` or safetensors, nothing that can run code)
  and attaches ``preprocess``, the test-time transform it was evaluated with.

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
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclrkit import __version__
from simclrkit.augment import apply_eval
from simclrkit.checkpoint import CheckpointError, load_checkpoint
from simclrkit.config import ConfigError
from simclrkit.modelcard import _model_card, _preprocessing

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "Preprocess",
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
