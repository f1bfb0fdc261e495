"""Encoders, the projection head, and the SimCLR model that returns (h, z).

The encoder f is a ResNet whose output h is the vector after global average pooling
(paper §2.1, §2.3; reference ``resnet.py``). The projection head g is a small MLP that maps
h to the embedding z used by the contrastive loss (paper §2.1, §4.2 and Fig. 8; SimCLRv2
§2; reference ``model_util.projection_head`` / ``tf2/model.py``). :class:`SimCLR` glues the two
together and returns both, because the training loop needs z for the loss and h for the
online linear probe and for evaluation.

Encoder layer names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), and the blocks are torchvision's own ``BasicBlock`` and
``Bottleneck``, so a width-1 encoder exchanges state dicts with ``torchvision.models.resnet*``
(minus ``fc``). Known differences from the TensorFlow reference, all in favour of torchvision
compatibility (none is thought to matter for accuracy):

* Convolutions are initialised as torchvision does (Kaiming normal, fan-out, ReLU gain); the
  reference uses ``VarianceScaling()`` (truncated normal, fan-in, scale 1).
* The ImageNet stem's 3x3/2 max-pool pads one pixel on every side (torchvision); the reference
  uses TF ``SAME`` padding, which pads only the bottom/right for even inputs. Output sizes
  are identical.
* In ResNet-18/34 the reference gives the first block of ``block_group1`` a 1x1 projection
  shortcut even though its shape does not change; torchvision (and this module) uses the
  identity shortcut there.

SimCLRv2's encoders (``sk_ratio`` / ``se_ratio`` > 0, SimCLRv2 §2) are built exactly as the
reference's ``resnet.py`` builds them when its flags are set: :class:`SelectiveKernel` in place
of each bottleneck's 3x3 convolution, ResNet-D's stem of three 3x3 convolutions and its
average-pool shortcuts (:class:`_AvgDown`), and :class:`SqueezeExcitation` after each block's
last BatchNorm; their parameter counts match the reference README's table of released models.
These blocks have their own names (``layerK.i.conv2.fc1``, ``.se.reduce``, ...): torchvision
has no such ResNets.

Nothing here moves tensors to a device or asks for a process rank (STYLE: boundaries).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "BOTTLENECK_BLOCKS",
    "BOTTLENECK_ENCODERS",
    "ENCODER_NAMES",
    "BatchNorm1dNoBeta",
    "ProjectionHead",
    "ResNetEncoder",
    "SKBottleneck",
    "SelectiveKernel",
    "SimCLR",
    "SqueezeExcitation",
    "build_encoder",
    "stem_for_image_size",
]

# depth -> (block type, number of blocks in layer1..layer4), as in He et al. (2016) Table 1.
_RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}
ENCODER_NAMES: tuple[str, ...] = tuple(f"resnet{depth}" for depth in _RESNET_SPECS)
# The encoders SimCLRv2's blocks (sk_ratio, se_ratio) apply to.
BOTTLENECK_ENCODERS: tuple[str, ...] = tuple(
    f"resnet{depth}" for depth, (block, _) in _RESNET_SPECS.items() if block is Bottleneck
)
# Their blocks per stage: depth -> (layer1..layer4), for readers of other layouts (tflayout.py).
BOTTLENECK_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    depth: blocks for depth, (block, blocks) in _RESNET_SPECS.items() if block is Bottleneck
}

# Images at most this many pixels on a side get the CIFAR stem (paper App. B.9; the reference
# switches on ``image_size <= 32``).
_CIFAR_STEM_MAX_IMAGE_SIZE = 32

_PROJECTION_HEAD_KINDS = ("nonlinear", "linear", "none")


def _scaled_channels(base_channels: int, width: float) -> int:
    """Returns ``base_channels * width`` rounded to an integer, at least 1."""
    return max(1, int(round(base_channels * width)))


def stem_for_image_size(image_size: int) -> bool:
    """Says whether an image of this side length should use the CIFAR stem.

    Small images lose too much resolution to the ImageNet stem's 7x7/2 convolution and
    3x3/2 max-pool (a 32 px image would enter ``layer1`` at 8x8), so the paper replaces them
    with a 3x3/1 convolution and no pooling for CIFAR-10 (App. B.9).

    Args:
        image_size: side length of the (square) input image in pixels.

    Returns:
        True (use the CIFAR stem) when ``image_size <= 32``, else False.

    Raises:
        ValueError: if ``image_size`` is not a positive integer.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size <= _CIFAR_STEM_MAX_IMAGE_SIZE


class SelectiveKernel(nn.Module):
    """Selective-kernel convolution (Li et al. 2019), as the reference's ``SK_Conv2D``.

    One 3x3 convolution makes two streams of ``planes`` channels; a gate computed from their
    sum (global average pool, 1x1 to ``max(int(planes * sk_ratio), 32)`` channels, BN, ReLU,
    1x1 back to two sets of ``planes``, softmax across the streams) mixes them per channel.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, sk_ratio: float,
                 min_dim: int = 32) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(in_planes, 2 * planes, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * planes)
        mid = max(int(planes * sk_ratio), min_dim)
        self.fc1 = nn.Conv2d(planes, mid, 1, bias=False)
        self.bn_fc = nn.BatchNorm2d(mid)
        self.fc2 = nn.Conv2d(mid, 2 * planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.bn(self.conv(x))).chunk(2, dim=1)
        pooled = (a + b).mean(dim=(2, 3), keepdim=True)
        mix = self.fc2(torch.relu(self.bn_fc(self.fc1(pooled))))
        weights = torch.stack(mix.chunk(2, dim=1)).softmax(dim=0)
        return a * weights[0] + b * weights[1]


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018), as the reference's ``SE_Layer``: the reduced
    width is ``max(1, int(planes * se_ratio))`` of the block's inner width, with biases."""

    def __init__(self, channels: int, planes: int, se_ratio: float) -> None:
        super().__init__()
        reduced = max(1, int(planes * se_ratio))
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class _AvgDown(nn.Module):
    """ResNet-D's shortcut pooling (He et al. 2019), as the reference builds it: a 2x2 average
    pool after padding the bottom and right by one; at stride 2 the padding is zeros and
    counts (TF ``VALID`` after ``FixedPadding``), at stride 1 it is TF ``SAME``, whose average
    leaves the padding out, which repeating the edge reproduces exactly."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "constant" if self.stride > 1 else "replicate"
        padded = nn.functional.pad(x, (0, 1, 0, 1), mode=mode)
        return nn.functional.avg_pool2d(padded, 2, stride=self.stride)


class SKBottleneck(nn.Module):
    """The SimCLRv2 bottleneck (reference ``BottleneckBlock`` with ``sk_ratio``/``se_ratio``):
    1x1, BN, ReLU; a selective kernel (or a 3x3 and BN, ReLU) at the block's stride; 1x1,
    BN (gamma zero-initialised); squeeze-excitation; plus the shortcut (ResNet-D's average
    pool and 1x1 when selective kernels are on, else a strided 1x1), then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, projection: bool,
                 sk_ratio: float, se_ratio: float) -> None:  # fmt: skip
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if sk_ratio > 0:
            self.conv2: nn.Module = SelectiveKernel(planes, planes, stride, sk_ratio)
        else:
            self.conv2 = nn.Sequential(
                nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            )
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.se = SqueezeExcitation(out_planes, planes, se_ratio) if se_ratio > 0 else None
        self.downsample: nn.Module | None = None
        if projection and sk_ratio > 0:
            self.downsample = nn.Sequential(
                _AvgDown(stride), nn.Conv2d(in_planes, out_planes, 1, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        elif projection:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.conv2(out)))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class TFSameMaxPool2d(nn.Module):
    """Max-pooling with TensorFlow's ``'SAME'`` padding (the reference's stem pool, 3x3/2).

    TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` in total, the smaller half first: for
    the 3x3/2 pool that is one pixel at the bottom/right of an even-sized map and one on each
    side of an odd one. ``nn.MaxPool2d(3, 2, padding=1)`` gives the same output size but on
    even sizes looks one pixel up/left of TF's window.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size
                        - size, 0)  # fmt: skip
            pads += [total // 2, total - total // 2]
        x = nn.functional.pad(x, pads, value=float("-inf"))
        return nn.functional.max_pool2d(x, self.kernel_size, self.stride)


STEM_POOLS = ("symmetric", "tf_same")


def _stem_pool(kind: str) -> nn.Module:
    return TFSameMaxPool2d() if kind == "tf_same" else nn.MaxPool2d(3, stride=2, padding=1)


class ResNetEncoder(nn.Module):
    """ResNet encoder f: image -> h after global average pooling (paper §2.1, §2.3).

    Built from torchvision's ``BasicBlock`` / ``Bottleneck`` with torchvision's attribute
    names, so ``ResNetEncoder(50)`` loads ``torchvision.models.resnet50()``'s state dict
    minus ``fc.*`` with ``strict=True`` and vice versa.

    The width multiplier follows SimCLR (paper Table 6, reference ``resnet.py``): it scales
    EVERY channel count, the stem included, so ResNet-50 (2x) has a 128-channel stem,
    bottleneck widths 128/256/512/1024 and h of size 4096. This is not torchvision's
    ``wide_resnet50_2``, which keeps the 64-channel stem and block outputs (h of size 2048)
    and widens only the inner 3x3 convolution of each bottleneck. Fractional widths (0.25,
    0.5, ...) give small CPU-friendly models; channel counts are ``max(1, round(c * width))``.

    Attributes:
        depth: number of layers (18, 34, 50, 101 or 152).
        width: the width multiplier.
        cifar_stem: whether the CIFAR stem (3x3/1 conv, no max-pool) is used.
        feature_dim: size D of h, e.g. 512 for ResNet-18 and 2048 * width for ResNet-50.
    """

    def __init__(
        self,
        depth: int,
        width: float = 1.0,
        in_channels: int = 3,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        stem_pool: str = "symmetric",
    ) -> None:
        """Builds the encoder.

        Args:
            depth: 18, 34, 50, 101 or 152.
            width: width multiplier (> 0) applied to every channel count.
            in_channels: channels of the input image (3 for RGB, 1 for grayscale).
            cifar_stem: use a 3x3 stride-1 first convolution and no max-pool (paper App. B.9)
                instead of the ImageNet 7x7 stride-2 convolution and 3x3 stride-2 max-pool.
            zero_init_residual: initialise the last BatchNorm gamma of each residual block to
                zero, so each block starts as the identity on its shortcut path (reference
                ``init_zero=True``; Goyal et al., 2017).
            sk_ratio: > 0 builds SimCLRv2's selective-kernel ResNet (SimCLRv2 §2; the
                released models use 0.0625): :class:`SelectiveKernel` in every bottleneck,
                ResNet-D's three-convolution stem (unless ``cifar_stem``) and average-pool
                shortcuts. Bottleneck depths (50+) only.
            se_ratio: > 0 adds :class:`SqueezeExcitation` to every bottleneck.
            stem_pool: the ImageNet stem's 3x3/2 max-pool: "symmetric" (one pixel of padding
                on every side, torchvision's) or "tf_same" (:class:`TFSameMaxPool2d`, the
                reference's, which imported TensorFlow weights need).

        Raises:
            ValueError: on an unknown depth, a non-positive or non-finite width, or a
                non-positive ``in_channels``.
        """
        super().__init__()
        if isinstance(depth, bool) or depth not in _RESNET_SPECS:
            raise ValueError(
                f"depth must be one of {tuple(_RESNET_SPECS)}, got {depth!r}"
            )
        if isinstance(width, bool) or not isinstance(width, (int, float)):
            raise ValueError(f"width must be a positive number (width > 0), got {width!r}")
        if not math.isfinite(width) or width <= 0:
            raise ValueError(f"width must be a positive number (width > 0), got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")

        block, blocks_per_stage = _RESNET_SPECS[depth]
        for name, ratio in (("sk_ratio", sk_ratio), ("se_ratio", se_ratio)):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
                math.isfinite(ratio) and 0 <= ratio <= 1
            ):
                raise ValueError(f"{name} must be a number in [0, 1], got {ratio!r}")
        if stem_pool not in STEM_POOLS:
            raise ValueError(f"stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}")
        v2_blocks = sk_ratio > 0 or se_ratio > 0
        if v2_blocks and f"resnet{depth}" not in BOTTLENECK_ENCODERS:
            raise ValueError(
                f"sk_ratio and se_ratio apply to bottleneck ResNets (50, 101, 152, 200), not "
                f"resnet{depth}"
            )
        self.depth = depth
        self.width = float(width)
        self.cifar_stem = bool(cifar_stem)
        self.sk_ratio, self.se_ratio = float(sk_ratio), float(se_ratio)

        stem_channels = _scaled_channels(64, width)
        if sk_ratio > 0 and not cifar_stem:
            # ResNet-D's stem (reference resnet.py): three 3x3 convolutions, the first strided.
            half = _scaled_channels(32, width)
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_channels, 3, stride=1, padding=1, bias=False),
            )
            self.maxpool: nn.Module = _stem_pool(stem_pool)
        elif cifar_stem:
            self.conv1 = nn.Conv2d(
                in_channels, stem_channels, kernel_size=3, stride=1, padding=1, bias=False
            )
            # No pooling: a 32 px image enters layer1 at full resolution (paper App. B.9).
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(
                in_channels, stem_channels, kernel_size=7, stride=2, padding=3, bias=False
            )
            self.maxpool = _stem_pool(stem_pool)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)

        self._in_planes = stem_channels
        make = self._make_v2_stage if v2_blocks else self._make_stage
        self.layer1 = make(block, _scaled_channels(64, width), blocks_per_stage[0], 1)
        self.layer2 = make(block, _scaled_channels(128, width), blocks_per_stage[1], 2)
        self.layer3 = make(block, _scaled_channels(256, width), blocks_per_stage[2], 2)
        self.layer4 = make(block, _scaled_channels(512, width), blocks_per_stage[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = self._in_planes
        del self._in_planes

        self._init_weights(zero_init_residual)

    def _make_stage(
        self, block: type[nn.Module], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        """Builds one stage (``layerK``); the first block may downsample and change width."""
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_planes != out_planes:
            # Projection shortcut, named ``downsample.0`` / ``.1`` as in torchvision.
            downsample = nn.Sequential(
                nn.Conv2d(self._in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        blocks = [block(self._in_planes, planes, stride, downsample)]
        self._in_planes = out_planes
        blocks.extend(block(self._in_planes, planes) for _ in range(1, num_blocks))
        return nn.Sequential(*blocks)

    def _make_v2_stage(
        self, block: type[nn.Module], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        """One stage of :class:`SKBottleneck` blocks; the first projects its shortcut (as
        every first block of the reference's block groups)."""
        blocks = []
        for number in range(num_blocks):
            blocks.append(SKBottleneck(
                self._in_planes, planes, stride if number == 0 else 1, number == 0,
                self.sk_ratio, self.se_ratio,
            ))  # fmt: skip
            self._in_planes = planes * SKBottleneck.expansion
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation, so a fresh encoder matches a fresh torchvision ResNet
        # in distribution (see the module docstring for the reference's choice).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:  # squeeze-excitation's (Keras starts them at 0)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # gamma = 0 on the block's last BN makes the residual branch output exactly zero
            # (its beta is 0 too), so every block starts as relu(shortcut(x)) (reference
            # BatchNormRelu(init_zero=True), SPEC §3).
            for module in self.modules():
                if isinstance(module, (Bottleneck, SKBottleneck)):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the representation h.

        Args:
            x: images, shape (B, in_channels, H, W); channels_last memory format is fine.

        Returns:
            h, shape (B, feature_dim): the globally average-pooled output of ``layer4``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # flatten rather than view: a channels_last activation is not contiguous in NCHW.
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`: (B, C, H, W) -> h of shape (B, feature_dim)."""
        return self.forward_features(x)


def build_encoder(
    name: str,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 224,
    cifar_stem: bool | None = None,
    *,
    zero_init_residual: bool = True,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
    stem_pool: str = "symmetric",
) -> ResNetEncoder:
    """Builds a :class:`ResNetEncoder` from its name.

    Args:
        name: one of ``ENCODER_NAMES`` ("resnet18", "resnet34", "resnet50", "resnet101",
            "resnet152").
        width: width multiplier applied to every channel count.
        in_channels: channels of the input images.
        image_size: side length of the training images in pixels; picks the stem when
            ``cifar_stem`` is None.
        cifar_stem: force the CIFAR stem on (True) or off (False); None chooses it from
            ``image_size`` with :func:`stem_for_image_size`.
        zero_init_residual: zero-initialise the last BN gamma of each block.
        sk_ratio, se_ratio: SimCLRv2's selective kernels and squeeze-excitation
            (:class:`ResNetEncoder`).
        stem_pool: "symmetric" or "tf_same" (:class:`ResNetEncoder`).

    Returns:
        The encoder; its ``feature_dim`` is the size of h.

    Raises:
        ValueError: on an unknown name (the message lists the allowed ones) or bad sizes.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r}; expected one of {list(ENCODER_NAMES)}")
    use_cifar_stem = stem_for_image_size(image_size) if cifar_stem is None else bool(cifar_stem)
    return ResNetEncoder(
        depth=int(name.removeprefix("resnet")),
        width=width,
        in_channels=in_channels,
        cifar_stem=use_cifar_stem,
        zero_init_residual=zero_init_residual,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
        stem_pool=stem_pool,
    )


class BatchNorm1dNoBeta(nn.BatchNorm1d):
    """BatchNorm1d with a learnable scale gamma but no shift beta (TF ``center=False``).

    The reference ends the projection head with a BatchNorm without beta (``linear_layer``
    with ``use_bias=False, use_bn=True``), so z has zero mean per feature in training mode.
    Subclassing ``nn.BatchNorm1d`` and dropping ``bias`` (rather than a separate scale module
    or a frozen zero bias) keeps ``isinstance(m, nn.BatchNorm1d)`` true, so optimiser
    parameter grouping (no weight decay / no LARS trust ratio for BN) and
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (which copies ``bias=None``) both treat it
    as the BatchNorm it is, and there is no dead parameter to decay or checkpoint.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1
    ) -> None:
        """Builds the layer (always affine, always tracking running statistics).

        Args:
            num_features: number of features C of the (B, C) input.
            eps: added to the variance for numerical stability (reference: 1e-5).
            momentum: running-statistics momentum; 0.1 equals the reference's decay 0.9.
        """
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        # Assigning None to a registered parameter unregisters its tensor (bias stays None).
        self.bias = None

    def reset_parameters(self) -> None:
        """Resets running statistics and sets gamma to one (there is no beta)."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)


class ProjectionHead(nn.Module):
    """Projection head g: h -> z (paper §2.1, §4.2; SimCLRv2 §2; reference model_util.py).

    ``kind="nonlinear"`` with ``num_layers`` layers (2 in SimCLR v1, 3 in v2): every layer
    but the last is ``Linear(bias=False) -> BatchNorm1d -> ReLU`` of width ``hidden_dim``;
    the last is ``Linear(bias=False) -> BatchNorm1d without beta`` to ``out_dim``, no ReLU.
    ``kind="linear"`` is that last layer alone; ``kind="none"`` returns h unchanged
    (paper Fig. 8 compares the three).

    Linear weights are drawn from N(0, 0.01^2) as in the reference's ``linear_layer``.
    BatchNorm follows every linear layer (the reference's ``use_bn=True`` everywhere in the
    head), so the linear layers need no bias.

    Attributes:
        kind: "nonlinear", "linear" or "none".
        out_dim: size of z (equals ``in_dim`` for ``kind="none"``).
        layers: ``nn.ModuleList`` of ``nn.Sequential`` layers, in order.
    """

    def __init__(
        self,
        in_dim: int,
        num_layers: int = 2,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        kind: str = "nonlinear",
    ) -> None:
        """Builds the head.

        Args:
            in_dim: size of h (the encoder's ``feature_dim``).
            num_layers: number of linear layers for ``kind="nonlinear"`` (v1: 2, v2: 3);
                ignored by the other kinds.
            hidden_dim: width of the hidden layers; None means ``in_dim`` (reference).
            out_dim: size of z (128 in the paper); ignored for ``kind="none"``.
            kind: "nonlinear", "linear" or "none".

        Raises:
            ValueError: on an unknown kind or non-positive sizes.
        """
        super().__init__()
        if kind not in _PROJECTION_HEAD_KINDS:
            raise ValueError(f"kind must be one of {list(_PROJECTION_HEAD_KINDS)}, got {kind!r}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        sizes = (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim))
        for arg_name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg_name} must be a positive integer, got {value!r}")
        if kind == "nonlinear" and (
            isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
        ):
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")

        self.kind = kind
        self.in_dim = in_dim
        self.layers = nn.ModuleList()
        if kind == "nonlinear":
            dim = in_dim
            for _ in range(num_layers - 1):
                self.layers.append(
                    nn.Sequential(
                        nn.Linear(dim, hidden_dim, bias=False),
                        nn.BatchNorm1d(hidden_dim),
                        nn.ReLU(inplace=True),
                    )
                )
                dim = hidden_dim
            self.layers.append(self._output_layer(dim, out_dim))
        elif kind == "linear":
            self.layers.append(self._output_layer(in_dim, out_dim))
        self.out_dim = out_dim if kind != "none" else in_dim

        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)

    @staticmethod
    def _output_layer(in_dim: int, out_dim: int) -> nn.Sequential:
        # No beta and no ReLU on the output (reference: "neither bias nor relu is used").
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), BatchNorm1dNoBeta(out_dim))

    def forward_layers(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Returns the input and every layer's output (reference ``hiddens_list``).

        Index 0 is h itself and index j is the output of layer j (after its ReLU), so
        SimCLRv2 fine-tuning from the middle of the head (``ft_proj_selector``, v2 uses 1)
        picks ``forward_layers(h)[selector]``.

        Args:
            h: representations, shape (B, in_dim).

        Returns:
            ``1 + len(self.layers)`` tensors: (B, in_dim), then (B, hidden_dim) ..., with
            the last of shape (B, out_dim).
        """
        outputs = [h]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        return outputs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Maps h of shape (B, in_dim) to z of shape (B, out_dim)."""
        for layer in self.layers:
            h = layer(h)
        return h


class SimCLR(nn.Module):
    """Encoder f plus projection head g: x -> (h, z) (paper §2.1, Fig. 2)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        """Wraps an encoder and a head.

        Args:
            encoder: a module with ``forward_features(x) -> h`` (e.g. :class:`ResNetEncoder`).
            head: maps h to z (e.g. :class:`ProjectionHead`).
        """
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (B, C, H, W) to h of shape (B, D)."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes and projects a batch of views.

        Args:
            x: images, shape (B, C, H, W) (for pretraining, both views stacked: B = 2N).

        Returns:
            (h, z): h of shape (B, D) for evaluation, z of shape
            (B, out_dim) for the contrastive loss.
        """
        h = self.encoder.forward_features(x)
        return h, self.head(h)


def build_model(arch: dict[str, Any]) -> SimCLR:
    """The encoder and projection head an architecture dict describes (the one
    ``train.architecture`` makes and every checkpoint stores)."""
    encoder = build_encoder(
        arch["encoder"],
        width=arch["width"],
        in_channels=arch["in_channels"],
        image_size=arch["image_size"],
        cifar_stem=arch["cifar_stem"],
        # absent from architectures stored before SimCLRv2's blocks existed: plain ResNets
        sk_ratio=arch.get("sk_ratio", 0.0),
        se_ratio=arch.get("se_ratio", 0.0),
        stem_pool=arch.get("stem_pool", "symmetric"),  # "tf_same": imported TF weights
    )
    head = ProjectionHead(
        encoder.feature_dim,
        num_layers=arch["head_layers"],
        out_dim=arch["proj_dim"],
        kind=arch["head"],
    )
    return SimCLR(encoder, head)
