"""The variables the reference creates for a SimCLR ResNet and its heads, in both namings.

For an architecture (depth, width, stem, selective kernels, squeeze-excitation, head) this
lists every variable the reference's TF1 code (``tf.layers`` names numbered in creation
order: ``base_model/conv2d_K/kernel``, ``base_model/batch_normalization_K/gamma``, ...) and
its TF2 code (object-graph paths under the Keras model: ``resnet_model/block_groups/G/
layers/I/...``) would hold, with its shape, its TF layout (HWIO, (in, out) or a vector) and
the simclrkit state-dict key it becomes. ``importtf.py`` matches a checkpoint against these
lists to recognise the architecture and to read the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from simclrkit.models import BOTTLENECK_BLOCKS

SK_MIN_DIM = 32  # the reference's floor on a selective kernel's attention width
STEM = "resnet_model/initial_conv_relu_max_pool"


# --------------------------------------------------------------------------------------------
# The expected variables of an architecture, in both namings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One TF variable: its TF1 name, TF2 path, TF shape, and where it goes in PyTorch."""

    tf1: str
    tf2: str
    shape: tuple[int, ...]
    part: str  # "encoder", "head" or "classifier"
    key: str  # the state-dict key
    layout: str  # "conv" (HWIO), "dense" ((in, out)) or "vector"
    ratio: str = ""  # "sk" / "se": a width the selective-kernel / SE ratio sets


class Layout:
    """Collects :class:`Entry` s in the reference's creation order (TF1's numbering)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.batch_norms: dict[str, list[str]] = {"encoder": [], "head": []}
        self._convs = 0
        self._bns = 0

    def conv(self, tf2: str, key: str, shape: tuple[int, ...], bias: bool = False,
             ratio: str = "") -> None:  # fmt: skip
        tf1 = "base_model/conv2d" + (f"_{self._convs}" if self._convs else "")
        self._convs += 1
        self.entries.append(Entry(f"{tf1}/kernel", f"{tf2}/kernel", shape, "encoder",
                                   f"{key}.weight", "conv", ratio))  # fmt: skip
        if bias:
            self.entries.append(Entry(f"{tf1}/bias", f"{tf2}/bias", (shape[-1],), "encoder",
                                       f"{key}.bias", "vector"))  # fmt: skip

    def batch_norm(self, tf2: str, key: str, channels: int, *, tf1: str | None = None,
                   part: str = "encoder", center: bool = True) -> None:  # fmt: skip
        if tf1 is None:
            tf1 = "base_model/batch_normalization" + (f"_{self._bns}" if self._bns else "")
            self._bns += 1
        names = [("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                 ("moving_variance", "running_var")]  # fmt: skip
        for tf_name, torch_name in names:
            if tf_name == "beta" and not center:  # the head's last layer: no beta
                continue
            self.entries.append(Entry(f"{tf1}/{tf_name}", f"{tf2}/{tf_name}", (channels,), part,
                                       f"{key}.{torch_name}", "vector"))  # fmt: skip
        self.batch_norms[part].append(key)

    def dense(self, tf1: str, tf2: str, key: str, shape: tuple[int, int], part: str,
              bias: bool = False) -> None:  # fmt: skip
        self.entries.append(Entry(f"{tf1}/kernel", f"{tf2}/kernel", shape, part,
                                   f"{key}weight", "dense"))  # fmt: skip
        if bias:
            self.entries.append(Entry(f"{tf1}/bias", f"{tf2}/bias", (shape[1],), part,
                                       f"{key}bias", "vector"))  # fmt: skip


def channels(base: int, width: float) -> int:
    """A channel count at a width multiplier, rounded as ``models.py`` rounds it."""
    return max(1, int(round(base * width)))


def encoder_layout(depth: int, width: float, stem: str, in_channels: int, sk_ratio: float,
                    se_ratio: float) -> Layout:  # fmt: skip
    """The encoder's variables: reference ``resnet.py`` (TF1) / ``tf2/resnet.py`` (TF2)."""
    layout = Layout()
    stem_channels = channels(64, width)
    if stem == "resnet_d":  # three 3x3 convolutions, the first strided (ResNet-D)
        half = channels(32, width)
        layout.conv(f"{STEM}/0/conv2d", "conv1.0", (3, 3, in_channels, half))
        layout.batch_norm(f"{STEM}/1/bn", "conv1.1", half)
        layout.conv(f"{STEM}/2/conv2d", "conv1.3", (3, 3, half, half))
        layout.batch_norm(f"{STEM}/3/bn", "conv1.4", half)
        layout.conv(f"{STEM}/4/conv2d", "conv1.6", (3, 3, half, stem_channels))
        layout.batch_norm(f"{STEM}/6/bn", "bn1", stem_channels)
    else:  # 7x7/2 (ImageNet) or 3x3/1 (CIFAR); an identity layer sits between conv and BN
        kernel = 7 if stem == "imagenet" else 3
        layout.conv(f"{STEM}/0/conv2d", "conv1", (kernel, kernel, in_channels, stem_channels))
        layout.batch_norm(f"{STEM}/2/bn", "bn1", stem_channels)

    v2_blocks = sk_ratio > 0 or se_ratio > 0  # models.SKBottleneck, else torchvision's
    in_planes = stem_channels
    for group, (blocks, base) in enumerate(zip(BOTTLENECK_BLOCKS[depth], (64, 128, 256, 512))):
        planes, stride = channels(base, width), 1 if group == 0 else 2
        out_planes = 4 * planes
        for index in range(blocks):
            path = f"resnet_model/block_groups/{group}/layers/{index}"
            key = f"layer{group + 1}.{index}"
            if index == 0:  # every group's first block projects its shortcut
                shortcut = f"{path}/projection_layers"
                if sk_ratio > 0:  # [FixedPadding,] AveragePooling2D, conv, BN
                    at, conv_key, bn_key = (2 if stride > 1 else 1), "downsample.1", "downsample.2"
                else:
                    at, conv_key, bn_key = 0, "downsample.0", "downsample.1"
                layout.conv(f"{shortcut}/{at}/conv2d", f"{key}.{conv_key}",
                            (1, 1, in_planes, out_planes))  # fmt: skip
                layout.batch_norm(f"{shortcut}/{at + 1}/bn", f"{key}.{bn_key}", out_planes)
            # conv, BN, DropBlock, (SK | conv, BN), DropBlock, conv, BN, DropBlock, [SE]
            main = f"{path}/conv_relu_dropblock_layers"
            layout.conv(f"{main}/0/conv2d", f"{key}.conv1", (1, 1, in_planes, planes))
            layout.batch_norm(f"{main}/1/bn", f"{key}.bn1", planes)
            if sk_ratio > 0:
                mid = max(int(planes * sk_ratio), SK_MIN_DIM)
                layout.conv(f"{main}/3/conv2d_fixed_padding/conv2d", f"{key}.conv2.conv",
                            (3, 3, planes, 2 * planes))  # fmt: skip
                layout.batch_norm(f"{main}/3/batch_norm_relu/bn", f"{key}.conv2.bn", 2 * planes)
                layout.conv(f"{main}/3/conv2d_0", f"{key}.conv2.fc1", (1, 1, planes, mid),
                            ratio="sk")  # fmt: skip
                layout.batch_norm(f"{main}/3/batch_norm_relu_1/bn", f"{key}.conv2.bn_fc", mid)
                layout.conv(f"{main}/3/conv2d_1", f"{key}.conv2.fc2", (1, 1, mid, 2 * planes))
                last = 5
            else:
                conv2, bn2 = ("conv2.0", "conv2.1") if v2_blocks else ("conv2", "bn2")
                layout.conv(f"{main}/3/conv2d", f"{key}.{conv2}", (3, 3, planes, planes))
                layout.batch_norm(f"{main}/4/bn", f"{key}.{bn2}", planes)
                last = 6
            layout.conv(f"{main}/{last}/conv2d", f"{key}.conv3", (1, 1, planes, out_planes))
            layout.batch_norm(f"{main}/{last + 1}/bn", f"{key}.bn3", out_planes)
            if se_ratio > 0:
                reduced = max(1, int(planes * se_ratio))
                layout.conv(f"{main}/{last + 3}/se_reduce", f"{key}.se.reduce",
                            (1, 1, out_planes, reduced), bias=True, ratio="se")  # fmt: skip
                layout.conv(f"{main}/{last + 3}/se_expand", f"{key}.se.expand",
                            (1, 1, reduced, out_planes), bias=True)  # fmt: skip
            in_planes = out_planes
    return layout


def head_layout(layout: Layout, feature_dim: int, layers: int, proj_dim: int,
                 tf1_names: list[str]) -> None:  # fmt: skip
    """The projection head (reference ``model_util.projection_head`` / ``tf2/model.py``):
    per layer a dense kernel without bias and a BatchNorm, the last without beta."""
    dim = feature_dim
    for index, name in enumerate(tf1_names[:layers]):
        last = index == layers - 1
        out = proj_dim if last else feature_dim
        tf1, tf2 = f"head_contrastive/{name}", f"_projection_head/linear_layers/{index}"
        layout.dense(f"{tf1}/dense", f"{tf2}/dense", f"layers.{index}.0.", (dim, out), "head")
        layout.batch_norm(f"{tf2}/bn_relu/bn", f"layers.{index}.1", out, part="head",
                          tf1=f"{tf1}/batch_normalization", center=not last)
        dim = out
