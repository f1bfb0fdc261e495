"""The model card written beside every export: what the model is, what it saw, how to load it.

:func:`simclrkit.export.export_checkpoint` writes the markdown of :func:`_model_card` to
``<out>.MODEL_CARD.md`` (:func:`simclrkit.export.model_card_path`). The description of the
encoder's input (:func:`_preprocessing`) is shared with the export's metadata.

Dependencies run one way: ``export.py`` imports this module (and :class:`Trained`, what a
card describes, from here); this module imports nothing of ``export.py``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclrkit import __version__


@dataclass(frozen=True)
class Trained:
    """What an export needs: weights, the architecture, and what is known about the run."""

    encoder_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor] | None
    architecture: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # step, config, data, evaluation
    classifier_state: dict[str, torch.Tensor] | None = None  # classifier.py's linear layer
    classifier_input: int = 0  # the projection-head layers the classifier reads through


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _preprocessing(arch: dict[str, Any]) -> dict[str, Any]:
    """The input the encoder expects: its size, channels, range and test-time view."""
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


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in blocks."""
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
        f"- augmentation: colour jitter strength "
        f"{plan.get('color_jitter_strength', augment.get('color_jitter_strength'))} "
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
    trained: Trained, encoder: nn.Module, fmt: str, out: Path, include_head: bool, sha256: str
) -> str:
    """The markdown model card: what the model is, what it saw, how good it is, how to use it.

    ``sha256`` is the export's digest, passed in rather than read from ``out``: the card is
    written before the export takes its name, so both can appear together.
    """
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
        f"`{sha256}`) from a training checkpoint at step {info.get('step', '?')}.",
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
