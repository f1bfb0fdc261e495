"""SimCLRv2's encoders: selective kernels, ResNet-D stem and shortcuts, squeeze-excitation and
depth 200, against the reference's published parameter counts and formulas written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simclrkit.config import ConfigError, load_config
from simclrkit.models import (
    SelectiveKernel,
    SKBottleneck,
    SqueezeExcitation,
    build_encoder,
    build_model,
)
from simclrkit.models import _AvgDown as AvgDown

# The reference README's table of the released SimCLRv2 models (google-research/simclr):
# (depth, width, selective kernels) -> parameters of the encoder, in millions, as printed.
PUBLISHED = {
    (50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
    (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170, (101, 2, True): 257,
    (152, 1, False): 58, (152, 1, True): 89, (152, 2, False): 233, (152, 2, True): 354,
    (152, 3, True): 795,
}  # fmt: skip
# Two rows print a count 0.6-0.75 M above what their layers hold (232.25 M and 353.40 M here;
# every other row rounds to the table); the count is checked to within 1 M for those.
ROUNDED_UP = {(152, 2, False), (152, 2, True)}


def _count(depth: int, width: int, sk: bool) -> float:
    with torch.device("meta"):
        encoder = build_encoder(f"resnet{depth}", width=width, sk_ratio=0.0625 if sk else 0.0)
    return sum(p.numel() for p in encoder.parameters()) / 1e6


@pytest.mark.parametrize("config", list(PUBLISHED), ids=lambda c: f"r{c[0]}_{c[1]}x_sk{int(c[2])}")
def test_parameter_counts_equal_the_reference_table(config):
    millions = _count(*config)
    if config in ROUNDED_UP:
        assert 0 < PUBLISHED[config] - millions < 1
    else:
        assert round(millions) == PUBLISHED[config]


def test_plain_resnets_are_unchanged_and_torchvision_sized():
    import torchvision

    for depth in (50, 152):
        ours = build_encoder(f"resnet{depth}")
        theirs = getattr(torchvision.models, f"resnet{depth}")()
        del theirs.fc
        ours.load_state_dict(theirs.state_dict(), strict=True)  # same names and shapes
    # ResNet-200 (3-24-36-3 bottlenecks): 64.7 M with its 1000-class layer (timm), 62.6 without
    assert _count(200, 1, False) == pytest.approx(62.6, abs=0.1)


def test_selective_kernel_mixes_its_two_streams_as_the_reference_formula():
    torch.manual_seed(0)
    layer = SelectiveKernel(8, 8, stride=2, sk_ratio=0.25, min_dim=4).eval()
    for bn in (layer.bn, layer.bn_fc):  # non-trivial statistics, so BN is not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(3, 8, 10, 10)

    def batch_norm(t, bn):
        return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)  # fmt: skip

    # SK_Conv2D.call: conv, BN + ReLU, split into two streams; pooled sum; 1x1, BN + ReLU,
    # 1x1; split into two; softmax over the streams; weighted sum.
    streams = F.relu(batch_norm(F.conv2d(x, layer.conv.weight, stride=2, padding=1), layer.bn))
    first, second = streams[:, :8], streams[:, 8:]
    pooled = (first + second).mean(dim=(2, 3), keepdim=True)
    hidden = F.relu(batch_norm(F.conv2d(pooled, layer.fc1.weight), layer.bn_fc))
    mixing = F.conv2d(hidden, layer.fc2.weight)
    logits = torch.stack([mixing[:, :8], mixing[:, 8:]])
    weights = torch.exp(logits) / torch.exp(logits).sum(dim=0)
    expected = first * weights[0] + second * weights[1]
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    assert layer.fc1.out_channels == 4  # max(int(8 * 0.25), min_dim)


def test_squeeze_excitation_scales_channels_by_their_gate():
    torch.manual_seed(1)
    layer = SqueezeExcitation(16, 4, se_ratio=0.5)
    assert (layer.reduce.out_channels, layer.expand.out_channels) == (2, 16)
    x = torch.randn(2, 16, 5, 5)
    squeezed = x.mean(dim=(2, 3))
    gate = torch.sigmoid(
        F.relu(squeezed @ layer.reduce.weight[:, :, 0, 0].T + layer.reduce.bias)
        @ layer.expand.weight[:, :, 0, 0].T + layer.expand.bias
    )
    torch.testing.assert_close(layer(x), x * gate[:, :, None, None])


def _tf_avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """TF's 2x2 stride-1 SAME average pool: bottom/right padding left out of each mean."""
    height, width = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(height):
        for j in range(width):
            out[..., i, j] = x[..., i : i + 2, j : j + 2].mean(dim=(-2, -1))
    return out


def test_resnet_d_shortcut_pools_as_tf_at_both_strides():
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(AvgDown(1)(x), _tf_avg_pool_same(x))
    # stride 2: FixedPadding(2) pads the bottom/right with one zero, then VALID pooling
    padded = F.pad(x, (0, 1, 0, 1))
    expected = torch.stack([torch.stack([padded[..., i : i + 2, j : j + 2].mean(dim=(-2, -1))
                                         for j in range(0, 6, 2)], -1)
                            for i in range(0, 6, 2)], -2)  # fmt: skip
    torch.testing.assert_close(AvgDown(2)(x), expected)


def test_v2_encoder_layout_and_zero_initialised_blocks():
    encoder = build_encoder("resnet50", width=0.25, image_size=64, sk_ratio=0.0625,
                            se_ratio=0.25)  # fmt: skip
    assert len(encoder.conv1) == 7  # ResNet-D stem: three 3x3 convolutions
    first = encoder.layer1[0]
    assert isinstance(first, SKBottleneck) and isinstance(first.conv2, SelectiveKernel)
    assert isinstance(first.downsample[0], AvgDown) and first.se is not None
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in
               (encoder.layer1, encoder.layer4) for b in layer)  # fmt: skip
    x = torch.rand(2, 3, 64, 64)
    assert encoder(x).shape == (2, encoder.feature_dim) == (2, 512)
    # the CIFAR stem stays a single 3x3 with selective kernels too
    small = build_encoder("resnet50", width=0.25, image_size=32, sk_ratio=0.0625)
    assert isinstance(small.conv1, torch.nn.Conv2d) and small.conv1.kernel_size == (3, 3)


def test_config_and_stored_architectures_carry_the_blocks():
    from simclrkit import config as config_lib
    from simclrkit import models

    assert config_lib.BOTTLENECK_ENCODERS == models.BOTTLENECK_ENCODERS  # the two lists agree
    config = load_config("mnist5k", ["model.encoder=resnet50", "model.sk_ratio=0.0625"])
    assert config.model.sk_ratio == 0.0625
    with pytest.raises(ConfigError, match="bottlenecks"):
        load_config("mnist5k", ["model.sk_ratio=0.0625"])  # the recipe's resnet18
    with pytest.raises(ConfigError, match="model.se_ratio"):
        load_config("mnist5k", ["model.encoder=resnet50", "model.se_ratio=2"])
    arch = {"encoder": "resnet50", "width": 0.125, "in_channels": 1, "cifar_stem": True,
            "image_size": 28, "head": "nonlinear", "head_layers": 3, "proj_dim": 32}  # fmt: skip
    plain = build_model(arch)  # an architecture stored before the keys existed
    assert not any(isinstance(m, SKBottleneck) for m in plain.modules())
    v2 = build_model({**arch, "sk_ratio": 0.0625})
    assert any(isinstance(m, SelectiveKernel) for m in v2.modules())


def test_a_selective_kernel_run_trains_exports_and_loads(tmp_path):
    from simclrkit.export import export_checkpoint, load_encoder
    from simclrkit.train import pretrain

    config = load_config("mnist5k", [
        "model.encoder=resnet50", "model.width=0.125", "model.sk_ratio=0.0625",
        "model.se_ratio=0.25", "model.head_layers=3", "train.batch_size=32",
        "train.max_steps=2", "eval.linear=false", "eval.monitor_every=0",
    ])  # fmt: skip
    pretrain(config, tmp_path / "run", quiet=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    exported = export_checkpoint(checkpoint, "safetensors", tmp_path / "f.safetensors")
    images = torch.rand(2, 1, 28, 28)
    from_checkpoint, from_export = load_encoder(checkpoint), load_encoder(exported)
    assert from_checkpoint.sk_ratio == 0.0625 and from_export.se_ratio == 0.25
    torch.testing.assert_close(from_checkpoint(images), from_export(images))
    with pytest.raises(Exception, match="selective kernels"):
        export_checkpoint(checkpoint, "torchvision", tmp_path / "f.pt")
