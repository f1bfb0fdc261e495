"""read_tf_model against checkpoints written here in the published SimCLR layouts.

The checkpoints are written without the reference's code, from what it creates: TF1
name-based checkpoints (``base_model/conv2d_K/kernel`` and ``base_model/batch_normalization_K/*``
numbered in creation order, ``head_contrastive/nl_J/...``, ``head_supervised/linear_layer/
dense/...``, with ``/Momentum`` slots, ``ema_model/`` averages and ``global_step`` that must be
ignored, a ``checkpoint`` file and a ``.meta`` graph) and TF2 SavedModels whose object graph has
the attribute names of ``tf2/resnet.py`` / ``tf2/model.py`` under a module that, like
``tf2/run.py``'s exporter, also lists the trainable variables (so those are saved under
``trainable_variables_list/N``). The weights are random and the BatchNorm statistics are set
from a batch of real photos, so activations stay O(1) through every block.

The expected h, z and logits are computed here straight from the same arrays in TensorFlow,
NHWC, in float64, with the reference's conventions (fixed padding before strided convolutions,
'SAME' otherwise, 'SAME' max-pool, ResNet-D's padded average pools, selective kernels,
squeeze-excitation, inference BatchNorm with epsilon 1e-5), and compared with the simclrkit
module built from the import. The ResNets are ResNet-50 at width 0.25 (the reference's widths
are integers; the layout is the same with every channel count scaled) at 64 px, plus one
ResNet-50 (1x) with selective kernels, a released configuration, for scale.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclrkit.checkpoint import CheckpointError, validate_architecture
from simclrkit.errors import UserError
from simclrkit.importtf import (
    SK_RATIO,
    build_imported_classifier,
    build_imported_model,
    read_tf_model,
)
from simclrkit.models import TFSameMaxPool2d, build_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

EPSILON = 1e-5  # the reference's BATCH_NORM_EPSILON
IMAGE_SIZE = 64
TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------
# A SimCLR ResNet-50 with random weights, as nested dicts of float32 arrays
# --------------------------------------------------------------------------------------------


def _conv(rng, size, cin, cout, bias=False):
    scale = np.sqrt(2.0 / (size * size * cin))
    layer = {"kernel": (rng.standard_normal((size, size, cin, cout)) * scale).astype(np.float32)}
    if bias:
        layer["bias"] = rng.uniform(-0.2, 0.2, cout).astype(np.float32)
    return layer


def _bn(rng, channels, center=True):
    layer = {"gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
             "moving_mean": np.zeros(channels, np.float32),
             "moving_variance": np.ones(channels, np.float32)}  # fmt: skip
    if center:
        layer["beta"] = rng.uniform(-0.2, 0.2, channels).astype(np.float32)
    return layer


def make_net(seed, *, width, sk, se_ratio=0.0, head_layers=0, proj_dim=128, classes=0, selector=0):
    """The variables of a SimCLR ResNet-50 (reference resnet.py / model_util.py)."""
    rng = np.random.default_rng(seed)
    c = lambda base: int(base * width)  # noqa: E731
    if sk:  # ResNet-D stem: 3x3/2, 3x3, 3x3
        stem = [_conv(rng, 3, 3, c(32)), _bn(rng, c(32)), _conv(rng, 3, c(32), c(32)),
                _bn(rng, c(32)), _conv(rng, 3, c(32), c(64)), _bn(rng, c(64))]  # fmt: skip
    else:
        stem = [_conv(rng, 7, 3, c(64)), _bn(rng, c(64))]
    groups, cin = [], c(64)
    for g, blocks in enumerate((3, 4, 6, 3)):
        planes, group = c(64 * 2**g), []
        for i in range(blocks):
            stride = (2 if g else 1) if i == 0 else 1
            block = {"stride": stride, "proj": None, "sk": None, "se": None}
            if i == 0:
                block["proj"] = {"conv": _conv(rng, 1, cin, 4 * planes), "bn": _bn(rng, 4 * planes)}
            block["conv1"], block["bn1"] = _conv(rng, 1, cin, planes), _bn(rng, planes)
            if sk:
                mid = max(int(planes * SK_RATIO), 32)
                block["sk"] = {"conv": _conv(rng, 3, planes, 2 * planes),
                               "bn": _bn(rng, 2 * planes), "fc1": _conv(rng, 1, planes, mid),
                               "bn_fc": _bn(rng, mid),
                               "fc2": _conv(rng, 1, mid, 2 * planes)}  # fmt: skip
            else:
                block["conv2"], block["bn2"] = _conv(rng, 3, planes, planes), _bn(rng, planes)
            block["conv3"], block["bn3"] = _conv(rng, 1, planes, 4 * planes), _bn(rng, 4 * planes)
            # small, as trained last gammas are (the reference starts them at zero): a random
            # net with unit gammas here is chaotic and magnifies float32 rounding block by block
            block["bn3"]["gamma"] = rng.uniform(0.1, 0.4, 4 * planes).astype(np.float32)
            if se_ratio:
                reduced = max(1, int(planes * se_ratio))
                block["se"] = {"reduce": _conv(rng, 1, 4 * planes, reduced, bias=True),
                               "expand": _conv(rng, 1, reduced, 4 * planes, bias=True)}  # fmt: skip
            group.append(block)
            cin = 4 * planes
        groups.append(group)
    head, dim = [], cin
    for j in range(head_layers):  # hidden layers as wide as h; the last has no beta
        out = proj_dim if j == head_layers - 1 else cin
        head.append({"kernel": (rng.standard_normal((dim, out)) * 0.05).astype(np.float32),
                     "bn": _bn(rng, out, center=j < head_layers - 1)})  # fmt: skip
        dim = out
    supervised = None
    if classes:
        fan_in = proj_dim if selector == head_layers and head_layers else cin
        kernel = rng.standard_normal((fan_in, classes)) / np.sqrt(fan_in)
        supervised = {"kernel": kernel.astype(np.float32),
                      "bias": rng.uniform(-0.1, 0.1, classes).astype(np.float32)}  # fmt: skip
    return {"sk": sk, "stem": stem, "groups": groups, "head": head, "supervised": supervised,
            "selector": selector, "rng": rng}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The reference's forward pass, NHWC, float64, in TensorFlow
# --------------------------------------------------------------------------------------------


def _tf_conv(x, layer, stride=1):
    kernel = tf.constant(layer["kernel"], tf.float64)
    size = layer["kernel"].shape[0]
    if stride > 1:  # fixed padding, independent of the input size, then VALID
        begin = (size - 1) // 2
        padding = [[0, 0], [begin, size - 1 - begin], [begin, size - 1 - begin], [0, 0]]
    else:
        padding = "SAME"
    y = tf.nn.conv2d(x, kernel, strides=stride, padding=padding)
    return y + layer["bias"].astype(np.float64) if "bias" in layer else y


def _tf_bn(x, layer, net, calibrate, relu=True):
    if calibrate:  # statistics near the batch's: normalised activations of order one
        axes = list(range(len(x.shape) - 1))
        mean, var = (t.numpy() for t in tf.nn.moments(x, axes))
        rng = net["rng"]
        shifted = mean + 0.1 * np.sqrt(var) * rng.standard_normal(mean.shape)
        layer["moving_mean"] = shifted.astype(np.float32)
        # floored at the layer's mean variance: a near-constant channel (four photos, a dead
        # ReLU) would otherwise magnify float32 rounding by 1 / sqrt(epsilon)
        floored = var + var.mean()
        layer["moving_variance"] = (floored * rng.uniform(0.7, 1.4, var.shape)).astype(np.float32)
    f64 = lambda name: layer[name].astype(np.float64) if name in layer else None  # noqa: E731
    y = tf.nn.batch_normalization(x, f64("moving_mean"), f64("moving_variance"), f64("beta"),
                                  f64("gamma"), EPSILON)  # fmt: skip
    return tf.nn.relu(y) if relu else y


def _tf_block(x, block, net, calibrate):
    stride = block["stride"]
    shortcut = x
    if block["proj"] is not None:
        if net["sk"]:  # ResNet-D: 2x2 average pool (zero-padded bottom/right at stride 2)
            if stride > 1:
                padded = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
                pooled = tf.nn.avg_pool2d(padded, 2, stride, "VALID")
            else:
                pooled = tf.nn.avg_pool2d(x, 2, 1, "SAME")
            shortcut = _tf_conv(pooled, block["proj"]["conv"])
        else:
            shortcut = _tf_conv(x, block["proj"]["conv"], stride)
        shortcut = _tf_bn(shortcut, block["proj"]["bn"], net, calibrate, relu=False)
    y = _tf_bn(_tf_conv(x, block["conv1"]), block["bn1"], net, calibrate)
    if block["sk"] is not None:  # two streams from one conv, mixed by a softmax gate
        sk = block["sk"]
        both = _tf_bn(_tf_conv(y, sk["conv"], stride), sk["bn"], net, calibrate)
        streams = tf.stack(tf.split(both, 2, axis=3))
        pooled = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
        gate = _tf_conv(_tf_bn(_tf_conv(pooled, sk["fc1"]), sk["bn_fc"], net, calibrate), sk["fc2"])
        y = tf.reduce_sum(streams * tf.nn.softmax(tf.stack(tf.split(gate, 2, axis=3)), axis=0), 0)
    else:
        y = _tf_bn(_tf_conv(y, block["conv2"], stride), block["bn2"], net, calibrate)
    y = _tf_bn(_tf_conv(y, block["conv3"]), block["bn3"], net, calibrate, relu=False)
    if block["se"] is not None:
        squeezed = tf.reduce_mean(y, [1, 2], keepdims=True)
        reduced = tf.nn.relu(_tf_conv(squeezed, block["se"]["reduce"]))
        y = y * tf.sigmoid(_tf_conv(reduced, block["se"]["expand"]))
    return tf.nn.relu(y + shortcut)


def reference_forward(net, images_nhwc, calibrate=False):
    """(h, [h, head layer 1, ...], logits or None) as the reference computes them in eval mode."""
    x = tf.constant(images_nhwc, tf.float64)
    stem = net["stem"]
    for index in range(0, len(stem), 2):
        x = _tf_conv(x, stem[index], 2 if index == 0 else 1)
        x = _tf_bn(x, stem[index + 1], net, calibrate)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for group in net["groups"]:
        for block in group:
            x = _tf_block(x, block, net, calibrate)
    h = tf.reduce_mean(x, [1, 2])
    hiddens = [h]
    for j, layer in enumerate(net["head"]):
        y = tf.matmul(hiddens[-1], layer["kernel"].astype(np.float64))
        hiddens.append(_tf_bn(y, layer["bn"], net, calibrate, relu=j < len(net["head"]) - 1))
    logits = None
    if net["supervised"] is not None:
        sup = net["supervised"]
        logits = tf.matmul(hiddens[net["selector"]], sup["kernel"].astype(np.float64))
        logits += sup["bias"].astype(np.float64)
    return h.numpy(), [t.numpy() for t in hiddens], None if logits is None else logits.numpy()


@pytest.fixture(scope="module")
def photos():
    """Four real RGB photos (crops of scikit-learn's two samples), 64 px, NHWC in [0, 1]."""
    from sklearn.datasets import load_sample_images

    china, flower = (torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
                     for image in load_sample_images().images)  # fmt: skip
    crops = [china, flower, china[:, 100:400, 200:500], flower[:, :300, 300:600]]
    batch = torch.stack([F.interpolate(crop[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                       antialias=True, align_corners=False)[0]
                         for crop in crops])  # fmt: skip
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------------------------
# Writing the published layouts
# --------------------------------------------------------------------------------------------


def tf1_variables(net):
    """{TF1 name: array}: tf.layers numbers conv2d / batch_normalization in creation order."""
    names, counters = {}, {"conv2d": 0, "batch_normalization": 0}

    def add(kind, layer):
        n = counters[kind]
        counters[kind] += 1
        scope = f"base_model/{kind}" + (f"_{n}" if n else "")
        for field, array in layer.items():
            names[f"{scope}/{field}"] = array

    stem = net["stem"]
    for index in range(0, len(stem), 2):
        add("conv2d", stem[index])
        add("batch_normalization", stem[index + 1])
    for group in net["groups"]:
        for block in group:
            if block["proj"] is not None:  # the shortcut is built first
                add("conv2d", block["proj"]["conv"])
                add("batch_normalization", block["proj"]["bn"])
            add("conv2d", block["conv1"])
            add("batch_normalization", block["bn1"])
            if block["sk"] is not None:
                sk = block["sk"]
                for kind, layer in (("conv2d", sk["conv"]), ("batch_normalization", sk["bn"]),
                                    ("conv2d", sk["fc1"]), ("batch_normalization", sk["bn_fc"]),
                                    ("conv2d", sk["fc2"])):  # fmt: skip
                    add(kind, layer)
            else:
                add("conv2d", block["conv2"])
                add("batch_normalization", block["bn2"])
            add("conv2d", block["conv3"])
            add("batch_normalization", block["bn3"])
            if block["se"] is not None:
                add("conv2d", block["se"]["reduce"])
                add("conv2d", block["se"]["expand"])
    for j, layer in enumerate(net["head"]):
        names[f"head_contrastive/nl_{j}/dense/kernel"] = layer["kernel"]
        for field, array in layer["bn"].items():
            names[f"head_contrastive/nl_{j}/batch_normalization/{field}"] = array
    if net["supervised"] is not None:
        for field, array in net["supervised"].items():
            names[f"head_supervised/linear_layer/dense/{field}"] = array
    return names


def write_tf1(folder, net, *, step=250228, ema=False, extra=None, meta=True):
    """model.ckpt-STEP.{index,data,meta} and a checkpoint file, as TPUEstimator leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    variables = tf1_variables(net)
    saved = dict(variables)
    for name, array in variables.items():
        if not name.endswith(("moving_mean", "moving_variance")):
            saved[f"{name}/Momentum"] = np.zeros_like(array)  # the optimiser's slot
        if ema:
            saved[f"ema_model/{name}"] = array * 0.5
    saved["global_step"] = np.array(step, np.int64)
    saved.update(extra or {})
    prefix = folder / f"model.ckpt-{step}"
    names = sorted(saved)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[saved[n] for n in names])  # fmt: skip
    (folder / "checkpoint").write_text(
        f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
    )
    if meta and net["supervised"] is not None:
        _write_tf1_meta(f"{prefix}.meta", net)
    return prefix


def _write_tf1_meta(path, net):
    """The ops that show which hidden the supervised head reads (model_util.py's names)."""
    graph = tf.Graph()
    v1 = tf.compat.v1
    with graph.as_default():
        width = (net["head"] or [net["supervised"]])[0]["kernel"].shape[0]
        h = tf.identity(v1.placeholder(tf.float32, [None, width]), name="base_model/final_avg_pool")
        hiddens = [h]
        for j, layer in enumerate(net["head"]):
            with graph.name_scope(f"head_contrastive/nl_{j}/"):
                kernel = v1.placeholder(tf.float32, layer["kernel"].shape, name="dense/kernel")
                y = tf.matmul(hiddens[-1], kernel, name="dense/MatMul")
                y = tf.identity(y, name=f"nl_{j}_out")
            if j < len(net["head"]) - 1:
                with graph.name_scope("head_contrastive/"):
                    y = tf.nn.relu(y)
            hiddens.append(y)
        with graph.name_scope("head_supervised/linear_layer/dense/"):
            kernel = v1.placeholder(tf.float32, net["supervised"]["kernel"].shape, name="kernel")
            tf.matmul(hiddens[net["selector"]], kernel, name="MatMul")
        v1.train.export_meta_graph(filename=path, graph=graph)


def write_tf2(folder, net):
    """A SavedModel with tf2/*.py's attribute names, saved as tf2/run.py's exporter saves."""
    trainable = []

    def variables(layer, owner=None, trainable_fields=("kernel", "bias", "gamma", "beta")):
        owner = owner or tf.Module()
        for name, array in layer.items():
            variable = tf.Variable(array, name=name, trainable=name in trainable_fields)
            setattr(owner, name, variable)
            if variable.trainable:
                trainable.append(variable)
        return owner

    def conv_fixed(layer):  # Conv2dFixedPadding: its Keras Conv2D is `conv2d`
        module = tf.Module()
        module.conv2d = variables(layer)
        return module

    def bn_relu(layer):  # BatchNormRelu: its Keras BatchNormalization is `bn`
        module = tf.Module()
        module.bn = variables(layer)
        return module

    empty = tf.Module  # FixedPadding, pooling, DropBlock, IdentityLayer: no variables
    resnet = tf.Module()
    stem = net["stem"]
    if net["sk"]:
        resnet.initial_conv_relu_max_pool = [
            conv_fixed(stem[0]), bn_relu(stem[1]), conv_fixed(stem[2]), bn_relu(stem[3]),
            conv_fixed(stem[4]), empty(), bn_relu(stem[5]), empty(), empty(),
        ]  # fmt: skip
    else:
        resnet.initial_conv_relu_max_pool = [
            conv_fixed(stem[0]), empty(), bn_relu(stem[1]), empty(), empty(),
        ]  # fmt: skip
    resnet.block_groups = []
    for group in net["groups"]:
        block_group = tf.Module()
        block_group.layers = []
        for block in group:
            module = tf.Module()
            projection = []
            if block["proj"] is not None:
                if net["sk"]:
                    projection = [empty()] * (2 if block["stride"] > 1 else 1)
                projection += [conv_fixed(block["proj"]["conv"]), bn_relu(block["proj"]["bn"])]
            module.projection_layers = projection
            module.shortcut_dropblock = empty()
            main = [conv_fixed(block["conv1"]), bn_relu(block["bn1"]), empty()]
            if block["sk"] is not None:
                sk, layer = block["sk"], tf.Module()
                layer.conv2d_fixed_padding = conv_fixed(sk["conv"])
                layer.batch_norm_relu = bn_relu(sk["bn"])
                layer.conv2d_0 = variables(sk["fc1"])
                layer.batch_norm_relu_1 = bn_relu(sk["bn_fc"])
                layer.conv2d_1 = variables(sk["fc2"])
                main.append(layer)
            else:
                main += [conv_fixed(block["conv2"]), bn_relu(block["bn2"])]
            main += [empty(), conv_fixed(block["conv3"]), bn_relu(block["bn3"]), empty()]
            if block["se"] is not None:
                se = tf.Module()
                se.se_reduce = variables(block["se"]["reduce"])
                se.se_expand = variables(block["se"]["expand"])
                main.append(se)
            module.conv_relu_dropblock_layers = main
            block_group.layers.append(module)
        resnet.block_groups.append(block_group)

    model = tf.Module()
    model.resnet_model = resnet
    head = tf.Module()
    head.linear_layers = []
    for layer in net["head"]:
        linear = tf.Module()
        linear.dense = variables({"kernel": layer["kernel"]})
        linear.bn_relu = bn_relu(layer["bn"])
        head.linear_layers.append(linear)
    model._projection_head = head
    if net["supervised"] is not None:
        supervised = tf.Module()
        supervised.linear_layer = tf.Module()
        supervised.linear_layer.dense = variables(net["supervised"])
        model.supervised_head = supervised

    root = tf.Module()
    root.model = model
    root.trainable_variables_list = trainable
    if net["supervised"] is not None:
        root.__call__ = _tf2_function(net, head, supervised)
    tf.saved_model.save(root, str(folder))


def _tf2_function(net, head, supervised):
    """The exported function's head ops, named as tf2/model.py names them."""
    width = (net["head"] or [net["supervised"]])[0]["kernel"].shape[0]

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32)])
    def call(h):
        with tf.name_scope("projection_head"):
            hiddens = [tf.identity(h, "proj_head_input")]
            for j, linear in enumerate(head.linear_layers):
                with tf.name_scope(f"nl_{j}"):
                    y = tf.matmul(hiddens[-1], linear.dense.kernel)
                hiddens.append(tf.nn.relu(y) if j < len(head.linear_layers) - 1 else y)
        x = tf.stop_gradient(hiddens[net["selector"]])  # lineareval_while_pretraining
        dense = supervised.linear_layer.dense
        with tf.name_scope("head_supervised"), tf.name_scope("linear_layer"):
            with tf.name_scope("dense"):
                logits = tf.matmul(x, dense.kernel, name="MatMul")
        return {"logits_sup": logits}

    return call


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def _simclrkit_outputs(imported, photos):
    model = build_imported_model(imported).eval()
    classifier = build_imported_classifier(imported)
    with torch.no_grad():
        h = model.encoder(torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous())
        hiddens = model.head.forward_layers(h)
        logits = None if classifier is None else classifier(hiddens[imported.ft_proj_selector])
    return h.numpy(), [t.numpy() for t in hiddens], None if logits is None else logits.numpy()


def _assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    assert np.abs(ours - theirs).max() <= TOLERANCE, (what, np.abs(ours - theirs).max())


CASES = {
    # SimCLRv1's release: no projection head, a linear classifier on h; a checkpoint prefix.
    "v1_r50_tf1": dict(fmt="tf1", width=0.25, sk=False, head_layers=0, classes=10, selector=0),
    # SimCLRv2 fine-tuned: SK, 3-layer head, classifier on head layer 1 (told by the .meta);
    # EMA copies; the folder holding the `checkpoint` file.
    "v2_r50_sk_head3_tf1": dict(fmt="tf1", width=0.25, sk=True, head_layers=3, classes=10,
                                selector=1, ema=True),
    # TF2 SavedModel with SK and SE, the classifier on h (told by the exported function); the
    # folder with a saved_model/ subfolder, as gs://simclr-checkpoints-tf2 has them.
    "v2_r50_sk_se_tf2": dict(fmt="tf2", width=0.25, sk=True, se_ratio=0.25, head_layers=3,
                             classes=7, selector=0),
    # TF2 with SE and no SK, a 2-layer head, no classifier; the SavedModel folder itself.
    "v2_r50_se_tf2": dict(fmt="tf2", width=0.25, sk=False, se_ratio=0.125, head_layers=2,
                          proj_dim=64),
    # A released configuration at its real size: ResNet-50 (1x) with selective kernels.
    "r50_1x_sk1_tf1": dict(fmt="tf1", width=1, sk=True, head_layers=3, classes=16, selector=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_computes_what_the_tensorflow_model_computes(case, photos, tmp_path):
    spec = dict(CASES[case])
    fmt, ema = spec.pop("fmt"), spec.pop("ema", False)
    net = make_net(sum(map(ord, case)), **spec)
    reference_forward(net, photos, calibrate=True)
    h_ref, hiddens_ref, logits_ref = reference_forward(net, photos)
    assert 0.05 < np.abs(h_ref).mean() < 20  # the comparison is of O(1) numbers

    if fmt == "tf1":
        prefix = write_tf1(tmp_path / case, net, ema=ema)
        path = tmp_path / case if spec["head_layers"] else prefix
    else:
        write_tf2(tmp_path / case / "saved_model", net)
        bundle = tmp_path / case / "saved_model" / "variables" / "variables"
        keys = tf.train.list_variables(str(bundle))
        assert any(key.startswith("trainable_variables_list/") for key, _ in keys)  # as exported
        path = tmp_path / case if spec.get("classes") else tmp_path / case / "saved_model"
    imported = read_tf_model(path)

    arch = imported.architecture
    assert validate_architecture(arch, "test") == arch
    assert (arch["encoder"], arch["width"]) == ("resnet50", spec["width"])
    assert not arch["cifar_stem"]
    assert arch["sk_ratio"] == (SK_RATIO if spec["sk"] else 0)
    assert arch["se_ratio"] == spec.get("se_ratio", 0)
    assert imported.source_format == fmt
    assert imported.global_step == (250228 if fmt == "tf1" else None)
    plain = build_model(arch)  # the state dicts fit models.py's modules exactly
    plain.encoder.load_state_dict(imported.encoder_state, strict=True)
    if spec["head_layers"]:
        assert (arch["head"], arch["head_layers"]) == ("nonlinear", spec["head_layers"])
        assert arch["proj_dim"] == spec.get("proj_dim", 128)
        plain.head.load_state_dict(imported.head_state, strict=True)
    else:
        assert imported.head_state is None and arch["head_layers"] == 2 and imported.notes
    if spec.get("classes"):
        assert imported.ft_proj_selector == spec["selector"]
        weight = imported.classifier_state["weight"]
        assert weight.shape == (spec["classes"], imported.classifier_input_dim)
    else:
        assert imported.classifier_state is None and imported.ft_proj_selector is None
    counted = sum(a.size > 0 for a in tf1_variables(net).values())
    assert imported.variables_read == counted + (fmt == "tf1")  # + global_step

    h, hiddens, logits = _simclrkit_outputs(imported, photos)
    _assert_close(h, h_ref, "h")
    if spec["head_layers"]:
        for j, (ours, theirs) in enumerate(zip(hiddens, hiddens_ref)):
            _assert_close(ours, theirs, f"head layer {j}")
    if logits_ref is not None:
        _assert_close(logits, logits_ref, "logits")


def test_tf_same_max_pool_matches_tensorflow():
    x = np.random.default_rng(0).standard_normal((2, 5, 8, 7)).astype(np.float32)
    ours = TFSameMaxPool2d()(torch.from_numpy(x)).numpy()
    theirs = tf.nn.max_pool2d(x.transpose(0, 2, 3, 1), 3, 2, "SAME").numpy().transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, theirs)
    # torchvision's stem pool (models.py) looks one pixel up/left on the even side
    torchvision_style = torch.nn.MaxPool2d(3, 2, padding=1)(torch.from_numpy(x)).numpy()
    assert torchvision_style.shape == ours.shape and not np.array_equal(torchvision_style, ours)


@pytest.fixture(scope="module")
def small_v1(tmp_path_factory):
    """A SimCLRv1-style ResNet-50 (width 1/8) as TF1 variables, for the refusals below."""
    net = make_net(3, width=0.125, sk=False, head_layers=0, classes=5)
    return tf1_variables(net), tmp_path_factory.mktemp("small")


def _save(folder, variables):
    folder.mkdir(parents=True)
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt-1"), tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[variables[n] for n in names])  # fmt: skip
    return folder / "model.ckpt-1"


def test_a_variable_of_the_wrong_shape_is_named(small_v1):
    variables, root = small_v1
    wrong = dict(variables)
    wrong["base_model/conv2d_5/kernel"] = np.zeros((3, 3, 8, 9), np.float32)
    prefix = _save(root / "wrong_shape", wrong)
    named = r"model\.ckpt-1.*base_model/conv2d_5/kernel has shape \[3, 3, 8, 9\]"
    with pytest.raises(CheckpointError, match=named):
        read_tf_model(prefix)


def test_unknown_and_missing_variables_are_named(small_v1):
    variables, root = small_v1
    extra = {**variables, "base_model/conv2d_999/kernel": np.zeros((1, 1, 2, 2), np.float32)}
    named = r"unrecognised variable base_model/conv2d_999/kernel \(shape \[1, 1, 2, 2\]\)"
    with pytest.raises(CheckpointError, match=named):
        read_tf_model(_save(root / "extra", extra))
    missing = {n: a for n, a in variables.items() if n != "base_model/batch_normalization_7/beta"}
    named = r"base_model/batch_normalization_7/beta \(shape \[32\]\) is missing"
    with pytest.raises(CheckpointError, match=named):
        read_tf_model(_save(root / "missing", missing))
    no_bias = {n: a for n, a in variables.items() if n != "head_supervised/linear_layer/dense/bias"}
    named = r"supervised head.*dense/bias \(shape \[5\]\) is missing"
    with pytest.raises(CheckpointError, match=named):
        read_tf_model(_save(root / "no_bias", no_bias))


def test_resnet18_is_refused_with_the_reason(tmp_path):
    basic = {"base_model/conv2d/kernel": np.zeros((7, 7, 3, 64), np.float32),
             "base_model/conv2d_1/kernel": np.zeros((1, 1, 64, 64), np.float32),
             "base_model/conv2d_2/kernel": np.zeros((3, 3, 64, 64), np.float32)}  # fmt: skip
    with pytest.raises(CheckpointError, match="ResNet-18/34"):
        read_tf_model(_save(tmp_path / "r18", basic))


def test_paths_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no TensorFlow checkpoint"):
        read_tf_model(tmp_path)
    with pytest.raises(CheckpointError, match="is not a TensorFlow checkpoint"):
        read_tf_model(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not found"):
        read_tf_model(tmp_path / "model.ckpt-5")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.ckpt-5.index").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read TensorFlow checkpoint .*model.ckpt-5"):
        read_tf_model(tmp_path / "bad")


def test_the_selector_argument_is_checked_against_the_shapes(small_v1, tmp_path):
    net = make_net(5, width=0.125, sk=False, head_layers=3, proj_dim=16, classes=4, selector=1)
    prefix = write_tf1(tmp_path / "v2", net)
    assert read_tf_model(prefix).ft_proj_selector == 1  # from the .meta graph
    asked = read_tf_model(prefix, ft_proj_selector=2)  # the caller's word wins, with a note
    assert asked.ft_proj_selector == 2 and any("graph says 1" in n for n in asked.notes)
    with pytest.raises(CheckpointError, match="reads 256 features, but ft_proj_selector=-1 gives"):
        read_tf_model(prefix, ft_proj_selector=-1)
    with pytest.raises(UserError, match="allowed 0 to 3"):
        read_tf_model(prefix, ft_proj_selector=4)
    (tmp_path / "v2" / "model.ckpt-250228.meta").unlink()  # without the graph: not told
    untold = read_tf_model(prefix)
    assert untold.ft_proj_selector is None
    assert any("pass ft_proj_selector" in note for note in untold.notes)


def test_without_tensorflow_the_install_is_named(small_v1, monkeypatch):
    variables, root = small_v1
    prefix = _save(root / "no_tf", variables)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
    with pytest.raises(UserError, match=r"pip install 'simclrkit\[tf\]'"):
        read_tf_model(prefix)


# --------------------------------------------------------------------------------------------
# simclrkit import-tf: the files it writes, through every reader
# --------------------------------------------------------------------------------------------


def _imagefolder(root, photos):
    """train/ and test/ of two classes made from the photos (flipped copies for test)."""
    from PIL import Image

    for split in ("train", "test"):
        for index, photo in enumerate(photos):
            image = photo if split == "train" else photo[:, ::-1]
            folder = root / split / ("china" if index % 2 == 0 else "flower")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{index}.png")
    return root


def test_imported_files_give_the_tensorflow_outputs_through_every_reader(photos, tmp_path,
                                                                         capsys):  # fmt: skip
    from simclrkit.cli import main
    from simclrkit.export import load_classifier, load_encoder

    net = make_net(11, width=0.25, sk=True, head_layers=3, classes=10, selector=1)
    reference_forward(net, photos, calibrate=True)
    h_ref, _, logits_ref = reference_forward(net, photos)
    prefix = write_tf1(tmp_path / "tf1", net)
    x = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()
    for name in ("model.safetensors", "model.pt"):
        out = tmp_path / name
        assert main(["import-tf", str(prefix), "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert "resnet50 width 0.25, sk_ratio 0.0625, 3-layer projection head" in said
        assert "10-class supervised head on head layer 1" in said
        with torch.no_grad():
            h = load_encoder(out)(x).numpy()
            logits = load_classifier(out)(x).numpy()
        _assert_close(h, h_ref, f"h from {name}")
        _assert_close(logits, logits_ref, f"logits from {name}")
    # export, embed and evaluate take the file like one of their own.
    assert main(["export", str(tmp_path / "model.pt"), "--format", "safetensors",
                 "--out", str(tmp_path / "again.safetensors")]) == 0  # fmt: skip
    with torch.no_grad():
        _assert_close(load_classifier(tmp_path / "again.safetensors")(x).numpy(), logits_ref,
                      "logits after export")  # fmt: skip
    assert main(["embed", str(tmp_path / "model.safetensors"), str(_imagefolder(tmp_path / "imgs",
                 photos) / "train"), "--out", str(tmp_path / "h.npy"), "--quiet"]) == 0  # fmt: skip
    assert np.load(tmp_path / "h.npy").shape == (4, h_ref.shape[1])
    assert main(["export", str(tmp_path / "model.pt"), "--format", "torchvision",
                 "--out", str(tmp_path / "tv.pt")]) == 2  # fmt: skip
    assert "'SAME' stem max-pool" in capsys.readouterr().err
    capsys.readouterr()
    results = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "model.pt"), "--protocol", "knn", "--device", "cpu",
                 "--out-dir", str(results), "data.dataset=imagefolder",
                 f"data.root={tmp_path / 'imgs'}", "eval.tsne_points=0", "eval.knn_k=2",
                 "eval.random_init_baseline=false", "eval.raw_pixels_baseline=false",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["protocol"] == "knn"
    # Without a saved graph the selector is unknown: the command asks for it.
    (tmp_path / "tf1" / "model.ckpt-250228.meta").unlink()
    assert main(["import-tf", str(prefix), "--out", str(tmp_path / "untold.pt")]) == 2
    assert "pass --ft-proj-selector" in capsys.readouterr().err
    assert not (tmp_path / "untold.pt").exists()
    assert main(["import-tf", str(prefix), "--out", str(tmp_path / "told.pt"),
                 "--ft-proj-selector", "1"]) == 0  # fmt: skip
