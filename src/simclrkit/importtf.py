"""Reading the published SimCLR TensorFlow checkpoints into simclrkit's PyTorch layout.

google-research/simclr published its SimCLRv1 and SimCLRv2 ResNets (50/101/152, widths 1-4,
with and without selective kernels) as TF1 checkpoints (``model.ckpt-N.index`` /
``.data-*`` beside a ``checkpoint`` file) and as TF2 SavedModels (``saved_model.pb`` and
``variables/``). :func:`read_tf_model` reads either, finds the architecture from the
variables' names and shapes alone, and returns state dicts that ``build_model(architecture)``'s
encoder and head load with ``strict=True``, plus the supervised head (``head_supervised``) as a
linear classifier. :func:`build_imported_model` builds the module and loads them.

How names map. The TF1 code names its layers by creation order, so the mapping is an order:
the k-th ``base_model/conv2d_k/kernel`` and the k-th ``base_model/batch_normalization_k/*``
of the encoder are its k-th convolution and BatchNorm in the order the reference's forward
pass creates them (stem; then per block the projection shortcut, the 1x1, the 3x3 or the
selective kernel's three convolutions, the last 1x1, squeeze-excitation's two biased 1x1s).
The TF2 code names variables by the attributes that hold them, so there the mapping is a path
in the object graph (``resnet_model/block_groups/G/layers/I/conv_relu_dropblock_layers/J/
conv2d/kernel``, ``_projection_head/linear_layers/J/bn_relu/bn/gamma``, ...), read from the
checkpoint's own object graph, whatever key the variable was saved under (the exporter saves
trainable variables under ``trainable_variables_list/N``). The projection head is
``head_contrastive/nl_J`` (TF1) or ``_projection_head/linear_layers/J`` (TF2): a dense kernel
without bias and a BatchNorm (without beta on the last layer), as :class:`ProjectionHead`.
Kernels are transposed from TF's HWIO / (in, out) to PyTorch's OIHW / (out, in); ``gamma``,
``beta``, ``moving_mean``, ``moving_variance`` become ``weight``, ``bias``, ``running_mean``,
``running_var``. Optimiser slots (``.../Momentum``), exponential moving averages
(``ema_model/...``), ``global_step`` counters and anything outside the model are not read;
an unknown variable inside the model, a missing one or a wrong shape is refused.

Which projection-head layer the supervised head reads (the reference's ``ft_proj_selector``)
is not in the variables: every hidden head layer is as wide as h. It is taken from the
caller, else from the graph saved beside the weights (TF1 ``.meta``, the SavedModel's
functions), else from the shapes where they decide it; otherwise it is left unknown (None).

Numerics. TF pads its 3x3/2 stem max-pool 'SAME' (bottom/right only on even sizes) while the
torchvision-style stem of ``models.py`` pads every side, so an imported architecture says
``stem_pool: "tf_same"`` (``models.TFSameMaxPool2d``) and every model built from it, here or
from the file it is saved in, computes what the TensorFlow model computes. Inputs are
RGB floats in [0, 1] without mean/std normalisation, as the reference's. BatchNorm epsilon is
the reference's 1e-5 (PyTorch's default; TF1's fused kernel, used when the reference runs
without global BN, raises it to 1.001e-5, a difference far below float32 rounding).

Cost: TensorFlow (``pip install 'simclrkit[tf]'``) is imported on first use (a few seconds),
and every model tensor is read once, 4 bytes a parameter: about 0.14 GB for a ResNet-50 (1x)
with its heads, 0.7 GB for a ResNet-50 (2x) with selective kernels, 3.5 GB for the largest
release, ResNet-152 (3x, SK); the peak is that plus the largest single tensor. The graph saved
beside the weights (tens of MB) is parsed when the file has a supervised head. Nothing is
executed: no TensorFlow graph runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrkit.checkpoint import CheckpointError, expected_shapes, validate_architecture
from simclrkit.errors import UserError
from simclrkit.models import BOTTLENECK_BLOCKS
from simclrkit.tflayout import (
    SK_MIN_DIM,
    STEM,
    Entry,
    Layout,
    channels,
    encoder_layout,
    head_layout,
)

__all__ = [
    "SK_RATIO",
    "ImportedModel",
    "build_imported_classifier",
    "build_imported_model",
    "read_tf_model",
]

# The reference's recommended (and the released models') selective-kernel ratio. With its
# floor of 32 channels the ratio shows in the shapes only where planes * ratio > 32.
SK_RATIO = 0.0625
# What a checkpoint without a projection head (SimCLRv1's releases) gets: SimCLRv1's head.
_DEFAULT_HEAD = {"head": "nonlinear", "head_layers": 2, "proj_dim": 128}
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_INSTALL_HINT = "pip install 'simclrkit[tf]'"


@dataclass(frozen=True)
class ImportedModel:
    """A TensorFlow SimCLR checkpoint in simclrkit's layout (see the module docstring).

    Attributes:
        architecture: what ``build_model`` takes; passes ``validate_architecture``. Its
            ``image_size`` is 224 (32 for a CIFAR stem): the models are fully convolutional.
        encoder_state: ``model.encoder``'s state dict (BN statistics included).
        head_state: ``model.head``'s, or None when the checkpoint has no projection head (then
            the architecture names SimCLRv1's head, 2 layers to 128, freshly initialised).
        classifier_state: ``{"weight": (K, D), "bias": (K,)}`` from ``head_supervised``, or None.
        classifier_input_dim: D, the classifier's input size, or None.
        ft_proj_selector: which ``model.head.forward_layers(h)`` entry the classifier reads
            (0 is h), or None when neither the caller, the graph nor the shapes tell.
        global_step: the training step stored with the weights, or None.
        source_format: "tf1" (name-based checkpoint) or "tf2" (object-based).
        variables_read: how many tensors were read.
        source: the checkpoint prefix or SavedModel folder read.
        notes: what the caller should know (defaults chosen, what could not be told).
    """

    architecture: dict[str, Any]
    encoder_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor] | None
    classifier_state: dict[str, torch.Tensor] | None
    classifier_input_dim: int | None
    global_step: int | None
    source_format: str
    variables_read: int
    ft_proj_selector: int | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# Finding and opening the checkpoint
# --------------------------------------------------------------------------------------------


def _import_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter, unless asked
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(
            f"reading TensorFlow checkpoints needs TensorFlow, which is not installed: "
            f"{_INSTALL_HINT}"
        ) from None
    return tf


def _prefix_in_folder(folder: Path) -> str | None:
    """The TF1 checkpoint a folder holds: its ``checkpoint`` file's latest, else the ``.index``
    file with the highest step."""
    state = folder / "checkpoint"
    if state.is_file():
        found = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"))
        if found:  # the file may name a path on the machine that trained (gs://...)
            prefix = folder / Path(found.group(1)).name
            if Path(f"{prefix}.index").is_file():
                return str(prefix)
    indexes = sorted(folder.glob("*.index"))
    if not indexes:
        return None

    def step(index: Path) -> int:
        number = re.search(r"-(\d+)$", index.stem)
        return int(number.group(1)) if number else -1

    return str(max(indexes, key=step).with_suffix(""))


def _resolve(path: Path) -> tuple[str, Path]:
    """("bundle", checkpoint prefix) or ("saved_model", SavedModel folder) for ``path``."""
    if path.is_dir():
        for folder in (path, path / "saved_model"):
            if (folder / "saved_model.pb").is_file():
                return "saved_model", folder
        # tf2/run.py exports to MODEL_DIR/saved_model/<global_step>/
        exports = [p for p in (path / "saved_model").glob("*")
                   if p.name.isdigit() and (p / "saved_model.pb").is_file()]  # fmt: skip
        if exports:
            return "saved_model", max(exports, key=lambda p: int(p.name))
        prefix = _prefix_in_folder(path)
        if prefix is not None:
            return "bundle", Path(prefix)
        raise CheckpointError(
            f"{path} holds no TensorFlow checkpoint: no saved_model.pb (here or in "
            f"saved_model/), no 'checkpoint' file and no *.index file"
        )
    prefix = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", str(path))
    if Path(f"{prefix}.index").is_file():
        return "bundle", Path(prefix)
    if not path.exists():
        raise CheckpointError(f"TensorFlow checkpoint not found: {path} (no {prefix}.index)")
    raise CheckpointError(
        f"{path} is not a TensorFlow checkpoint: name a checkpoint prefix "
        f"(model.ckpt-N, beside model.ckpt-N.index), its folder, or a SavedModel folder"
    )


def _object_paths(reader: Any, source: str) -> tuple[dict[str, str], str | None]:
    """For an object-based (TF2) checkpoint: {path below the Keras model: checkpoint key} of
    every variable, and the key of a ``global_step`` variable beside the model, if any."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    nodes = graph.nodes

    def value_key(node_id: int) -> str | None:
        for attribute in nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                return attribute.checkpoint_key
        return None

    # Breadth first from the root to the object that holds the ResNet (the Keras model).
    model, global_step, queue, seen = None, None, [0], {0}
    while queue and model is None:
        node_id = queue.pop(0)
        for child in nodes[node_id].children:
            if child.local_name == "resnet_model":
                model = node_id
            if child.local_name == "global_step" and global_step is None:
                global_step = value_key(child.node_id)
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append(child.node_id)
    if model is None:
        raise CheckpointError(
            f"{source}: no SimCLR model in this TensorFlow 2 checkpoint (no object holds a "
            f"'resnet_model')"
        )
    paths: dict[str, str] = {}
    stack = [(model, "", frozenset([model]))]
    while stack:
        node_id, prefix, on_path = stack.pop()
        for child in nodes[node_id].children:
            path = f"{prefix}{child.local_name}"
            key = value_key(child.node_id)
            if key is not None:
                paths.setdefault(path, key)
            elif child.node_id not in on_path:
                stack.append((child.node_id, f"{path}/", on_path | {child.node_id}))
    return paths, global_step


# --------------------------------------------------------------------------------------------
# Which projection-head layer the supervised head reads, from a saved graph
# --------------------------------------------------------------------------------------------

_SUPERVISED_MATMUL = re.compile(r"(?:^|/)head_supervised(?:_\d+)?/linear_layer/[^/]+/MatMul$")
_PASS_THROUGH = {"Identity", "StopGradient", "IdentityN", "Cast", "Snapshot"}


def _selector_of(name: str) -> int | None:
    """The head layer a tensor of this name is the output of (0: h), or None."""
    head = r"(?:^|/)(?:head_contrastive|projection_head)(?:_\d+)?/"
    if re.search(r"(?:^|/)(?:base_model|resnet)(?:_\d+)?/final_avg_pool$", name) or re.search(
        head + r"proj_head_input$", name
    ):
        return 0
    relu = re.search(head + r"Relu(?:_(\d+))?$", name)  # after every layer but the last
    if relu:
        return int(relu.group(1) or 0) + 1
    layer = re.search(head + r"n?l_(\d+)/", name)  # inside a layer: the last one's output
    return int(layer.group(1)) + 1 if layer else None


def _selector_in(node_lists: list[Any]) -> int | None:
    """Follows the supervised head's MatMul input back to a head layer in each graph."""
    found = set()
    for nodes in node_lists:
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            if node.op != "MatMul" or not _SUPERVISED_MATMUL.search(node.name):
                continue
            name = node.input[0].split(":")[0]
            for _ in range(32):
                selector = _selector_of(name)
                source = by_name.get(name)
                if selector is not None or source is None or source.op not in _PASS_THROUGH:
                    break
                name = source.input[0].split(":")[0]
            if selector is not None:
                found.add(selector)
    return found.pop() if len(found) == 1 else None


def _selector_from_graph(kind: str, location: Path) -> int | None:
    """The selector recorded in the graph saved with the weights (TF1 ``.meta``, the
    SavedModel's functions), or None when there is no such graph or it does not say."""
    try:
        if kind == "bundle":
            from tensorflow.core.protobuf import meta_graph_pb2

            meta_path = Path(f"{location}.meta")
            if not meta_path.is_file():
                return None
            meta = meta_graph_pb2.MetaGraphDef()
            meta.ParseFromString(meta_path.read_bytes())
            graphs = [meta.graph_def]
        else:
            from tensorflow.core.protobuf import saved_model_pb2

            saved = saved_model_pb2.SavedModel()
            saved.ParseFromString((location / "saved_model.pb").read_bytes())
            graphs = [meta.graph_def for meta in saved.meta_graphs]
    except Exception:  # an unreadable graph only means "not told"
        return None
    node_lists = []
    for graph in graphs:
        node_lists.append(graph.node)
        node_lists.extend(function.node_def for function in graph.library.function)
    return _selector_in(node_lists)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Variables:
    """The checkpoint's variables under one naming (TF1 names or TF2 object paths)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], keys: dict[str, str],
                 naming: str, source: str) -> None:  # fmt: skip
        self.shapes, self.keys, self.naming, self.source = shapes, keys, naming, source

    def name(self, entry: Entry) -> str:
        return entry.tf1 if self.naming == "tf1" else entry.tf2

    def in_scope(self, prefixes: tuple[str, ...]) -> list[str]:
        return sorted(n for n in self.shapes if n.startswith(prefixes))

    def unexpected(self, expected: set[str], prefixes: tuple[str, ...]) -> list[str]:
        """Variables under ``prefixes`` that are neither expected nor a slot of one (an
        optimiser's ``<variable>/Momentum``, a moving average's
        ``<variable>/ExponentialMovingAverage``)."""
        extra = []
        for name in self.in_scope(prefixes):
            owner = name
            while owner not in expected and "/" in owner:
                owner = owner.rsplit("/", 1)[0]
            if owner not in expected:
                extra.append(name)
        return extra

    def problems(self, entries: list[Entry], prefixes: tuple[str, ...]) -> list[str]:
        """What keeps ``entries`` from being exactly the variables under ``prefixes``."""
        missing = [e for e in entries if self.name(e) not in self.shapes]
        extra = self.unexpected({self.name(e) for e in entries}, prefixes)
        found = [f"variable {self.name(e)} (shape {list(e.shape)}) is missing" for e in missing]
        found += [f"unrecognised variable {n} (shape {list(self.shapes[n])})" for n in extra]
        return found

    def check_shapes(self, entries: list[Entry], what: str) -> None:
        for entry in entries:
            shape = self.shapes[self.name(entry)]
            if shape != entry.shape:
                raise CheckpointError(
                    f"{self.source}: variable {self.name(entry)} has shape {list(shape)}, but "
                    f"{what} needs {list(entry.shape)}"
                )


def _stem_kind(variables: _Variables) -> tuple[str, float, int]:
    """("imagenet" | "cifar" | "resnet_d", width, in_channels) from the stem convolutions."""
    tf1 = variables.naming == "tf1"
    name = "base_model/conv2d/kernel" if tf1 else f"{STEM}/0/conv2d/kernel"
    shape = variables.shapes.get(name)
    if shape is None:
        raise CheckpointError(
            f"{variables.source}: not a SimCLR ResNet checkpoint: variable {name} (the stem "
            f"convolution) is missing"
        )
    if len(shape) != 4 or shape[0] != shape[1] or shape[0] not in (3, 7) or min(shape) < 1:
        raise CheckpointError(
            f"{variables.source}: variable {name} has shape {list(shape)}, not a 7x7 or 3x3 "
            f"stem convolution kernel (height, width, in, out)"
        )
    kernel, _, in_channels, out = shape
    if kernel == 7:
        return "imagenet", out / 64, in_channels
    second = "base_model/conv2d_1/kernel" if tf1 else f"{STEM}/2/conv2d/kernel"
    if variables.shapes.get(second, (0,))[0] == 3:  # a second 3x3: ResNet-D's stem
        return "resnet_d", out / 32, in_channels
    return "cifar", out / 64, in_channels


def _basic_block_hint(variables: _Variables) -> str:
    """A reason when the checkpoint holds ResNet-18/34 (basic blocks), else ''."""
    if variables.naming == "tf1":
        third = variables.shapes.get("base_model/conv2d_2/kernel", ())
        first = variables.shapes.get("base_model/conv2d/kernel", ())
        basic = len(third) == 4 and third[:2] == (3, 3) and third[2] == third[3] == first[-1]
    else:
        basic = any("/conv2d_bn_layers/" in name for name in variables.shapes)
    if not basic:
        return ""
    return (
        " It is a ResNet-18/34 (basic blocks): the reference gives the first block of "
        "block_group1 a projection shortcut that simclrkit's resnet18/resnet34 do not have, "
        "so it cannot be imported exactly; the released SimCLR models are ResNet-50 and deeper"
    )


def _fit_ratio(variables: _Variables, entries: list[Entry], kind: str, floor: int,
               default: float) -> float:  # fmt: skip
    """The SK or SE ratio that gives the widths the checkpoint holds: ``default`` if it fits,
    else the ratio the widest block shows (checked against every block)."""
    # (the block's planes, the width the checkpoint holds, the entry): the selective kernel's
    # fc1 reads `planes` channels, squeeze-excitation's reduce reads the block's 4 * planes.
    found = [(e.shape[2] // (4 if kind == "se" else 1), variables.shapes[variables.name(e)][3], e)
             for e in entries if e.ratio == kind]  # fmt: skip

    def fits(ratio: float) -> Entry | None:
        for planes, width, entry in found:
            if width != max(int(planes * ratio), floor):
                return entry
        return None

    if not found or fits(default) is None:
        return default
    planes, width, _ = max(found, key=lambda item: item[0])
    for ratio in (width / planes, (width + 1e-6) / planes):
        if fits(ratio) is None:
            return ratio
    bad = fits(width / planes)
    assert bad is not None
    raise CheckpointError(
        f"{variables.source}: variable {variables.name(bad)} has shape "
        f"{list(variables.shapes[variables.name(bad)])}: no single "
        f"{'selective-kernel' if kind == 'sk' else 'squeeze-excitation'} ratio gives the "
        f"widths of every block"
    )


def _match_encoder(variables: _Variables) -> tuple[dict[str, Any], Layout]:
    """Finds the bottleneck ResNet whose variables the checkpoint holds exactly."""
    stem, width, in_channels = _stem_kind(variables)
    scope = ("base_model/",) if variables.naming == "tf1" else ("resnet_model/",)
    if variables.naming == "tf1":
        has_se = any(re.fullmatch(r"base_model/conv2d(_\d+)?/bias", n) for n in variables.shapes)
    else:
        has_se = any("/se_reduce/" in n for n in variables.shapes)
    sk_options = [True] if stem == "resnet_d" else [False] if stem == "imagenet" else [False, True]
    best: tuple[int, list[str]] | None = None
    for sk in sk_options:
        for depth in BOTTLENECK_BLOCKS:
            sk_ratio, se_ratio = (SK_RATIO if sk else 0.0), (0.25 if has_se else 0.0)
            layout = encoder_layout(depth, width, stem, in_channels, sk_ratio, se_ratio)
            problems = variables.problems(layout.entries, scope)
            if not problems:
                # The names fit; the SK/SE widths say the ratios. Lay out again with them.
                sk_ratio = _fit_ratio(variables, layout.entries, "sk", SK_MIN_DIM, sk_ratio)
                se_ratio = _fit_ratio(variables, layout.entries, "se", 1, se_ratio)
                layout = encoder_layout(depth, width, stem, in_channels, sk_ratio, se_ratio)
                what = f"a ResNet-{depth} at width {width:g}"
                variables.check_shapes(layout.entries, what)
                arch = {"encoder": f"resnet{depth}", "width": float(width),
                        "in_channels": in_channels, "cifar_stem": stem == "cifar",
                        "image_size": 32 if stem == "cifar" else 224,
                        "sk_ratio": sk_ratio, "se_ratio": se_ratio,
                        "stem_pool": "tf_same"}  # fmt: skip
                return arch, layout
            if best is None or len(problems) < best[0]:
                best = (len(problems), problems)
    assert best is not None
    raise CheckpointError(
        f"{variables.source}: not a SimCLR ResNet (50, 101, 152 or 200) checkpoint: "
        f"{best[1][0]}.{_basic_block_hint(variables)}"
    )


def _match_head(variables: _Variables, layout: Layout, feature_dim: int,
                notes: list[str]) -> dict[str, Any] | None:  # fmt: skip
    """Adds the projection head's entries; returns its architecture keys, None if absent."""
    tf1 = variables.naming == "tf1"
    scope = ("head_contrastive/",) if tf1 else ("_projection_head/",)
    pattern = (r"head_contrastive/(nl_(\d+)|l_0)/dense/kernel" if tf1
               else r"_projection_head/linear_layers/(\d+)/dense/kernel")  # fmt: skip
    kernels: dict[int, tuple[str, str]] = {}  # layer -> (TF1 layer name, variable)
    for name in variables.in_scope(scope):
        found = re.fullmatch(pattern, name)
        if found and tf1:
            kernels[int(found.group(2) or 0)] = (found.group(1), name)
        elif found:
            kernels[int(found.group(1))] = (f"nl_{found.group(1)}", name)
    if not kernels:
        stray = variables.unexpected(set(), scope)
        if stray:
            raise CheckpointError(
                f"{variables.source}: unrecognised variable {stray[0]} (shape "
                f"{list(variables.shapes[stray[0]])}) in the projection head"
            )
        notes.append(
            "the checkpoint has no projection head (as SimCLRv1's releases): the architecture "
            "names SimCLRv1's (2 layers to 128), which starts untrained"
        )
        return None
    layers = len(kernels)
    tf1_names = [kernels[i][0] if i in kernels else f"nl_{i}" for i in range(layers)]
    last = variables.shapes[kernels[max(kernels)][1]]
    proj_dim = last[-1] if len(last) == 2 else 0
    linear = tf1 and tf1_names == ["l_0"]
    entries_before = len(layout.entries)
    head_layout(layout, feature_dim, layers, max(proj_dim, 1), tf1_names)
    head_entries = layout.entries[entries_before:]
    problems = variables.problems(head_entries, scope)
    if problems:
        raise CheckpointError(f"{variables.source}: in the projection head, {problems[0]}")
    variables.check_shapes(head_entries, f"a {layers}-layer head on h of size {feature_dim}")
    return {"head": "linear" if linear else "nonlinear", "head_layers": layers,
            "proj_dim": proj_dim}  # fmt: skip


def _match_classifier(variables: _Variables, layout: Layout) -> tuple[int, int] | None:
    """Adds the supervised head's entries; returns (D, K), None if absent."""
    prefix = "head_supervised/linear_layer/dense" if variables.naming == "tf1" else (
        "supervised_head/linear_layer/dense")
    scope = (prefix.split("/")[0] + "/",)
    kernel = variables.shapes.get(f"{prefix}/kernel")
    if kernel is None:
        stray = variables.unexpected(set(), scope)
        if stray:
            raise CheckpointError(
                f"{variables.source}: unrecognised variable {stray[0]} (shape "
                f"{list(variables.shapes[stray[0]])}) in the supervised head"
            )
        return None
    if len(kernel) != 2 or min(kernel) < 1:
        raise CheckpointError(
            f"{variables.source}: variable {prefix}/kernel has shape {list(kernel)}, not "
            f"(input features, classes)"
        )
    before = len(layout.entries)
    layout.dense(prefix, prefix, "", (kernel[0], kernel[1]), "classifier", bias=True)
    problems = variables.problems(layout.entries[before:], scope)
    if problems:
        raise CheckpointError(f"{variables.source}: in the supervised head, {problems[0]}")
    variables.check_shapes(layout.entries[before:], f"a linear layer of {kernel[1]} classes")
    return kernel[0], kernel[1]


def _to_torch(array: np.ndarray, layout: str) -> torch.Tensor:
    if layout == "conv":
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif layout == "dense":
        array = array.T  # (in, out) -> (out, in)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _choose_selector(requested: int | None, graph: int | None, layers: int,
                     feature_dim: int, proj_dim: int, classifier_dim: int | None,
                     source: str, notes: list[str]) -> int | None:  # fmt: skip
    """The head layer the classifier reads: the caller's, the graph's, or the shapes'."""

    def width(selector: int) -> int:
        return proj_dim if selector == layers and layers else feature_dim

    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise UserError(f"ft_proj_selector must be an integer, got {requested!r}")
        selector = layers if requested == -1 else requested  # -1: the last layer
        if not 0 <= selector <= layers:
            raise UserError(
                f"ft_proj_selector is {requested}, but {source} has a projection head of "
                f"{layers} layers: allowed 0 to {layers} (or -1 for the last)"
            )
        if classifier_dim is not None and width(selector) != classifier_dim:
            raise CheckpointError(
                f"{source}: the supervised head reads {classifier_dim} features, but "
                f"ft_proj_selector={requested} gives {width(selector)}"
            )
        if graph is not None and graph != selector:
            notes.append(f"ft_proj_selector={selector} as asked; the saved graph says {graph}")
        return selector
    if classifier_dim is None:
        return None
    if graph is not None and 0 <= graph <= layers and width(graph) == classifier_dim:
        return graph
    fitting = [s for s in range(layers + 1) if width(s) == classifier_dim]
    if not fitting:
        raise CheckpointError(
            f"{source}: the supervised head reads {classifier_dim} features, but h has "
            f"{feature_dim} and the projection head gives {proj_dim}"
        )
    if len(fitting) == 1:
        return fitting[0]
    notes.append(
        f"which projection-head layer the supervised head reads is not recorded (layers "
        f"{fitting[0]}-{fitting[-1]} all give {classifier_dim} features): pass ft_proj_selector "
        f"(SimCLRv2's fine-tuned releases read layer 1, linear evaluation reads h, 0)"
    )
    return None


def read_tf_model(path: str | os.PathLike, ft_proj_selector: int | None = None) -> ImportedModel:
    """Reads a published SimCLR TensorFlow checkpoint (v1 or v2, TF1 or TF2).

    Args:
        path: a TF1 checkpoint prefix (``.../model.ckpt-250228``, or one of its files), a
            folder holding a TF1 ``checkpoint`` file, a SavedModel folder, or a folder with a
            ``saved_model/`` SavedModel in it (as gs://simclr-checkpoints-tf2 has them).
        ft_proj_selector: which projection-head output the supervised head reads (0: h; j:
            head layer j; -1: the last layer), as the reference's flag. None looks it up (see
            the module docstring).

    Returns:
        The :class:`ImportedModel`.

    Raises:
        UserError: TensorFlow is not installed, or ``ft_proj_selector`` is out of range.
        CheckpointError: ``path`` is not a TensorFlow checkpoint, cannot be read, or holds
            variables that are not a SimCLR ResNet-50/101/152/200 with its heads (the message
            names the first missing, unrecognised or misshapen variable and its shape).
    """
    kind, location = _resolve(Path(path))
    tf = _import_tensorflow()
    bundle = str(location / "variables" / "variables") if kind == "saved_model" else str(location)
    source = str(location)
    try:
        reader = tf.train.load_checkpoint(bundle)
        raw_shapes = {n: tuple(s) for n, s in reader.get_variable_to_shape_map().items()}
    except (tf.errors.OpError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot read TensorFlow checkpoint {source}: {reason}") from None

    global_step_key: str | None = "global_step" if "global_step" in raw_shapes else None
    if _OBJECT_GRAPH_KEY in raw_shapes:
        from google.protobuf.message import DecodeError

        try:
            keys, global_step_key = _object_paths(reader, source)
        except (DecodeError, IndexError, tf.errors.OpError):
            raise CheckpointError(
                f"cannot read TensorFlow checkpoint {source}: its object graph is damaged"
            ) from None
        shapes = {path_: raw_shapes[key] for path_, key in keys.items() if key in raw_shapes}
        variables = _Variables(shapes, keys, "tf2", source)
    else:
        variables = _Variables(raw_shapes, {n: n for n in raw_shapes}, "tf1", source)

    notes: list[str] = []
    arch, layout = _match_encoder(variables)
    feature_dim = 4 * channels(512, arch["width"])  # h: layer4's bottleneck output
    head = _match_head(variables, layout, feature_dim, notes)
    arch.update(head if head is not None else _DEFAULT_HEAD)
    classifier = _match_classifier(variables, layout)
    architecture = validate_architecture(arch, source)

    graph_selector = None
    if classifier is not None and head is not None:  # also to check the caller's word
        graph_selector = _selector_from_graph(kind, location)
    selector = _choose_selector(
        ft_proj_selector, graph_selector, head["head_layers"] if head else 0, feature_dim,
        head["proj_dim"] if head else 0, classifier[0] if classifier else None, source, notes,
    )

    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "head": {}, "classifier": {}}
    try:
        for entry in layout.entries:
            array = reader.get_tensor(variables.keys[variables.name(entry)])
            parts[entry.part][entry.key] = _to_torch(np.asarray(array), entry.layout)
        step = None
        if global_step_key is not None:
            step = int(np.asarray(reader.get_tensor(global_step_key)).reshape(-1)[0])
    except (tf.errors.OpError, ValueError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot read TensorFlow checkpoint {source}: {reason}") from None
    if step is None and kind == "saved_model" and location.name.isdigit():
        step = int(location.name)  # tf2/run.py names each export by its step
    for part, prefixes in layout.batch_norms.items():
        for prefix in prefixes:  # PyTorch's counter; its momentum is fixed, so it is unused
            parts[part][f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    shapes_wanted = expected_shapes(architecture)
    for part in ("encoder", "head") if head is not None else ("encoder",):
        got = {k: tuple(v.shape) for k, v in parts[part].items()}
        if got != shapes_wanted[part]:  # the two layouts above disagree: a bug, not the file
            wrong = sorted(set(got.items()) ^ set(shapes_wanted[part].items()))
            raise RuntimeError(f"the imported {part} does not fit models.py: {wrong[:3]}")
    return ImportedModel(
        architecture=architecture,
        encoder_state=parts["encoder"],
        head_state=parts["head"] if head is not None else None,
        classifier_state=parts["classifier"] or None,
        classifier_input_dim=classifier[0] if classifier else None,
        global_step=step,
        source_format=variables.naming,
        variables_read=len(layout.entries) + (global_step_key is not None),
        ft_proj_selector=selector,
        source=source,
        notes=tuple(notes),
    )


def build_imported_model(imported: ImportedModel) -> nn.Module:
    """The SimCLR module (``models.build_model``) with the imported weights loaded strictly,
    its architecture's ``stem_pool`` ("tf_same") giving TF's stem max-pool, so that in eval
    mode it computes the TensorFlow model's h and z. Returned in training mode, as ``build_model``'s."""
    from simclrkit.models import build_model

    model = build_model(imported.architecture)  # stem_pool "tf_same": TF's max-pool
    model.encoder.load_state_dict(imported.encoder_state, strict=True)
    if imported.head_state is not None:
        model.head.load_state_dict(imported.head_state, strict=True)
    return model


def build_imported_classifier(imported: ImportedModel) -> nn.Linear | None:
    """The supervised head as ``nn.Linear(D, K)``, reading
    ``model.head.forward_layers(h)[imported.ft_proj_selector]``; None if there is none."""
    if imported.classifier_state is None:
        return None
    weight = imported.classifier_state["weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict(imported.classifier_state, strict=True)
    return linear
