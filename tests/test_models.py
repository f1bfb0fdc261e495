"""Tests for simclrkit.models: ResNet encoders, the projection head, and SimCLR (h, z).

Everything runs on CPU with inputs of 32 px or less (64 px where the ImageNet stem's
max-pool must be exercised) and batches of 2-16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from simclrkit.models import (
    ENCODER_NAMES,
    BatchNorm1dNoBeta,
    ProjectionHead,
    ResNetEncoder,
    SimCLR,
    build_encoder,
    stem_for_image_size,
)

_BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _stages(encoder: ResNetEncoder) -> list[nn.Sequential]:
    return [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]


def _blocks(encoder: ResNetEncoder) -> list[nn.Module]:
    return [block for stage in _stages(encoder) for block in stage]


def _last_bn(block: nn.Module) -> nn.BatchNorm2d:
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


def _randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Gives every BN random affine parameters and running statistics, so a state-dict
    mix-up or a missing BN changes the output."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                size = bn.num_features
                bn.weight.copy_(0.5 + torch.rand(size, generator=generator))
                if bn.bias is not None:
                    bn.bias.copy_(0.2 * torch.randn(size, generator=generator))
                bn.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(size, generator=generator))


# --------------------------------------------------------------------------------------
# Encoder: shapes, depths, widths
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, expected_dim", [(18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048)]
)
def test_every_depth_has_torchvision_layout_and_feature_dim(depth, expected_dim):
    encoder = ResNetEncoder(depth).eval()
    assert encoder.feature_dim == expected_dim
    assert tuple(len(stage) for stage in _stages(encoder)) == _BLOCKS_PER_STAGE[depth]
    expected_block = BasicBlock if depth < 50 else Bottleneck
    assert all(type(block) is expected_block for block in _blocks(encoder))

    # Same parameter/buffer names and shapes as torchvision's model without its fc layer.
    reference = getattr(torchvision.models, f"resnet{depth}")()
    reference_shapes = {
        name: tuple(t.shape)
        for name, t in reference.state_dict().items()
        if not name.startswith("fc.")
    }
    assert {name: tuple(t.shape) for name, t in encoder.state_dict().items()} == reference_shapes

    with torch.no_grad():
        h = encoder(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, expected_dim)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize(
    "depth, width, stem_channels, feature_dim",
    [
        (18, 0.25, 16, 128),
        (18, 0.5, 32, 256),
        (18, 2, 128, 1024),
        (50, 0.25, 16, 512),
        (50, 0.5, 32, 1024),
        (50, 2, 128, 4096),
    ],
)
def test_width_multiplier_scales_every_channel_including_the_stem(
    depth, width, stem_channels, feature_dim
):
    encoder = ResNetEncoder(depth, width=width).eval()
    assert encoder.conv1.out_channels == stem_channels
    assert encoder.bn1.num_features == stem_channels
    assert encoder.feature_dim == feature_dim
    expansion = 1 if depth < 50 else 4
    for stage, base in zip(_stages(encoder), (64, 128, 256, 512)):
        planes = round(base * width)
        assert stage[0].conv1.out_channels == planes
        assert stage[-1].conv2.out_channels == planes  # the 3x3 conv in both block types
        assert _last_bn(stage[-1]).num_features == planes * expansion
    with torch.no_grad():
        h = encoder(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, feature_dim)


def test_resnet50_2x_differs_from_torchvision_wide_resnet50_2():
    # SimCLR 2x widens the stem and block outputs (h is 4096-d); torchvision's
    # wide_resnet50_2 keeps a 64-channel stem and 2048-d output.
    simclr_2x = ResNetEncoder(50, width=2)
    wide = torchvision.models.wide_resnet50_2()
    assert (simclr_2x.conv1.out_channels, wide.conv1.out_channels) == (128, 64)
    assert (simclr_2x.feature_dim, wide.fc.in_features) == (4096, 2048)


def test_fractional_width_rounds_and_never_reaches_zero_channels():
    encoder = ResNetEncoder(18, width=0.01, cifar_stem=True).eval()
    # round(64 * 0.01) = 1, round(128 * 0.01) = 1, round(256 * 0.01) = 3, round(512 * 0.01) = 5
    assert encoder.conv1.out_channels == 1
    assert [stage[0].conv1.out_channels for stage in _stages(encoder)] == [1, 1, 3, 5]
    assert encoder.feature_dim == 5
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_resnet50_parameter_count_matches_torchvision_without_fc():
    encoder = ResNetEncoder(50)
    count = sum(p.numel() for p in encoder.parameters())
    assert count == 23_508_032
    reference = torchvision.models.resnet50()
    reference_count = sum(
        p.numel() for name, p in reference.named_parameters() if not name.startswith("fc.")
    )
    assert count == reference_count


def test_single_channel_input():
    encoder = ResNetEncoder(18, width=0.25, in_channels=1, cifar_stem=True).eval()
    assert encoder.conv1.weight.shape == (16, 1, 3, 3)
    with torch.no_grad():
        h = encoder(torch.randn(2, 1, 28, 28))
    assert h.shape == (2, 128)
    with pytest.raises(RuntimeError):
        encoder(torch.randn(2, 3, 28, 28))


def test_channels_last_input_gives_the_same_h():
    torch.manual_seed(0)
    encoder = ResNetEncoder(18, width=0.25, cifar_stem=True).eval()
    _randomise_batchnorm(encoder, torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        h = encoder(x)
        h_channels_last = encoder.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    # The two layouts take different convolution kernels (AVX2 and AVX512 hosts differ too), so
    # fp32 sums round differently (2e-6 seen); a layout mix-up would be off by O(1).
    torch.testing.assert_close(h_channels_last, h, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Stem selection (paper App. B.9)
# --------------------------------------------------------------------------------------


def _assert_cifar_stem(encoder: ResNetEncoder) -> None:
    assert encoder.cifar_stem
    assert encoder.conv1.kernel_size == (3, 3)
    assert encoder.conv1.stride == (1, 1)
    assert encoder.conv1.padding == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)


def _assert_imagenet_stem(encoder: ResNetEncoder) -> None:
    assert not encoder.cifar_stem
    assert encoder.conv1.kernel_size == (7, 7)
    assert encoder.conv1.stride == (2, 2)
    assert encoder.conv1.padding == (3, 3)
    assert isinstance(encoder.maxpool, nn.MaxPool2d)
    assert (encoder.maxpool.kernel_size, encoder.maxpool.stride) == (3, 2)


@pytest.mark.parametrize("image_size", [28, 32])
def test_small_images_get_the_cifar_stem(image_size):
    assert stem_for_image_size(image_size) is True
    _assert_cifar_stem(build_encoder("resnet18", width=0.25, image_size=image_size))


@pytest.mark.parametrize("image_size", [33, 64, 224])
def test_large_images_get_the_imagenet_stem(image_size):
    assert stem_for_image_size(image_size) is False
    _assert_imagenet_stem(build_encoder("resnet18", width=0.25, image_size=image_size))


def test_explicit_stem_choice_overrides_image_size():
    _assert_imagenet_stem(build_encoder("resnet18", 0.25, 3, 32, cifar_stem=False))
    _assert_cifar_stem(build_encoder("resnet18", 0.25, 3, 224, cifar_stem=True))


@pytest.mark.parametrize(
    "cifar_stem, image_size, after_stem, after_layer4",
    [(True, 32, 32, 4), (False, 64, 16, 2), (False, 32, 8, 1)],
)
def test_spatial_size_after_the_stem(cifar_stem, image_size, after_stem, after_layer4):
    encoder = ResNetEncoder(18, width=0.25, cifar_stem=cifar_stem).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        stem = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        features = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(stem))))
        h = encoder(x)
    assert stem.shape == (2, 16, after_stem, after_stem)
    assert features.shape == (2, 128, after_layer4, after_layer4)
    # h is the global average pool of layer4's output (paper §2.1).
    torch.testing.assert_close(h, features.mean(dim=(2, 3)))


def test_stem_for_image_size_rejects_nonsense():
    for bad in (0, -32, 32.0, True):
        with pytest.raises(ValueError, match="image_size"):
            stem_for_image_size(bad)


# --------------------------------------------------------------------------------------
# torchvision interoperability
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_h(depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")()
    _randomise_batchnorm(reference, torch.Generator().manual_seed(depth))
    reference.eval()
    state = {name: t for name, t in reference.state_dict().items() if not name.startswith("fc.")}

    encoder = ResNetEncoder(depth)
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    reference.fc = nn.Identity()

    x = torch.randn(2, 3, 64, 64)  # 64 px so the max-pool and every stride are exercised
    with torch.no_grad():
        expected = reference(x)
        h = encoder.forward_features(x)
    assert h.shape == expected.shape == (2, encoder.feature_dim)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-6)


def test_encoder_state_dict_exports_to_torchvision():
    encoder = ResNetEncoder(18)
    reference = torchvision.models.resnet18()
    result = reference.load_state_dict(encoder.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(reference.layer4[1].bn2.weight, encoder.layer4[1].bn2.weight)


# --------------------------------------------------------------------------------------
# Initialisation (reference init_zero, SPEC §3)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_sets_only_the_last_bn_gamma_of_each_block_to_zero(depth):
    encoder = ResNetEncoder(depth, width=0.25)
    last_bns = {id(_last_bn(block)) for block in _blocks(encoder)}
    assert len(last_bns) == sum(_BLOCKS_PER_STAGE[depth])
    for bn in encoder.modules():
        if isinstance(bn, nn.BatchNorm2d):
            expected_gamma = 0.0 if id(bn) in last_bns else 1.0
            assert torch.all(bn.weight == expected_gamma)
            assert torch.all(bn.bias == 0)

    plain = ResNetEncoder(depth, width=0.25, zero_init_residual=False)
    for bn in plain.modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert torch.all(bn.weight == 1)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("block_index", [0, 1])  # 0: projection shortcut, 1: identity shortcut
def test_zero_initialised_block_is_relu_of_its_shortcut(depth, block_index):
    torch.manual_seed(0)
    encoder = ResNetEncoder(depth, width=0.25).train()
    block = encoder.layer2[block_index]
    assert (block.downsample is not None) == (block_index == 0)
    in_channels = block.conv1.in_channels
    x = torch.randn(4, in_channels, 8, 8)
    with torch.no_grad():
        shortcut = x if block.downsample is None else block.downsample(x)
        expected = torch.relu(shortcut)
        output = block(x.clone())
    torch.testing.assert_close(output, expected)

    # Without zero init the residual branch contributes, so the same check must fail.
    plain_encoder = ResNetEncoder(depth, width=0.25, zero_init_residual=False).train()
    plain_block = plain_encoder.layer2[block_index]
    with torch.no_grad():
        shortcut = x if plain_block.downsample is None else plain_block.downsample(x)
        assert not torch.allclose(plain_block(x.clone()), torch.relu(shortcut))


def test_convolutions_use_torchvision_kaiming_fan_out_init():
    torch.manual_seed(0)
    encoder = ResNetEncoder(50)
    conv = encoder.layer3[0].conv2  # 3x3, 256 -> 256: fan_out = 256 * 9
    expected_std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert conv.bias is None


# --------------------------------------------------------------------------------------
# Projection head (paper §2.1, §4.2; reference model_util.projection_head)
# --------------------------------------------------------------------------------------


def _layer_types(layer: nn.Sequential) -> list[type]:
    return [type(module) for module in layer]


@pytest.mark.parametrize("num_layers", [2, 3])  # SimCLR v1, v2
def test_nonlinear_head_structure(num_layers):
    head = ProjectionHead(48, num_layers=num_layers)
    assert len(head.layers) == num_layers
    assert head.out_dim == 128
    for layer in head.layers[:-1]:
        assert _layer_types(layer) == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
        linear, bn, _ = layer
        assert (linear.in_features, linear.out_features) == (48, 48)  # hidden width = in_dim
        assert linear.bias is None
        assert bn.bias is not None and bn.bias.requires_grad  # hidden BN keeps its beta
    final = head.layers[-1]
    assert _layer_types(final) == [nn.Linear, BatchNorm1dNoBeta]
    linear, bn = final
    assert (linear.in_features, linear.out_features) == (48, 128)
    assert linear.bias is None
    assert isinstance(bn, nn.BatchNorm1d)
    assert bn.bias is None
    assert [name for name, _ in bn.named_parameters()] == ["weight"]
    expected_names = []
    for index in range(num_layers - 1):
        expected_names += [
            f"layers.{index}.0.weight",
            f"layers.{index}.1.weight",
            f"layers.{index}.1.bias",
        ]
    expected_names += [f"layers.{num_layers - 1}.0.weight", f"layers.{num_layers - 1}.1.weight"]
    assert [name for name, _ in head.named_parameters()] == expected_names


def test_hidden_dim_override():
    head = ProjectionHead(32, num_layers=3, hidden_dim=20, out_dim=8)
    shapes = [tuple(layer[0].weight.shape) for layer in head.layers]
    assert shapes == [(20, 32), (20, 20), (8, 20)]
    outputs = head.forward_layers(torch.randn(5, 32))
    assert [tuple(t.shape) for t in outputs] == [(5, 32), (5, 20), (5, 20), (5, 8)]


def test_nonlinear_head_matches_a_hand_written_forward_in_training_mode():
    torch.manual_seed(0)
    head = ProjectionHead(12, num_layers=3, out_dim=6).train()
    _randomise_batchnorm(head, torch.Generator().manual_seed(3))
    h = torch.randn(10, 12)

    def batch_norm(x, gamma, beta):
        mean = x.mean(dim=0)
        var = x.var(dim=0, unbiased=False)  # BN normalises with the biased batch variance
        y = (x - mean) / torch.sqrt(var + 1e-5) * gamma
        return y if beta is None else y + beta

    expected = h
    for index, layer in enumerate(head.layers):
        expected = expected @ layer[0].weight.T
        expected = batch_norm(expected, layer[1].weight, layer[1].bias)
        if index < len(head.layers) - 1:
            expected = torch.relu(expected)

    with torch.no_grad():
        z = head(h)
        expected = expected.detach()
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_final_layer_has_no_beta_so_z_is_centred_per_feature_in_training():
    torch.manual_seed(0)
    head = ProjectionHead(16, num_layers=2).train()
    _randomise_batchnorm(head, torch.Generator().manual_seed(4))  # random gamma, beta in hidden
    h = 3.0 + torch.randn(32, 16)
    with torch.no_grad():
        hidden, z = head.forward_layers(h)[-2:]
        pre_bn_var = (hidden @ head.layers[-1][0].weight.T).var(dim=0, unbiased=False)
    assert z.shape == (32, 128)
    assert z.mean(dim=0).abs().max().item() < 1e-5
    # The scale is still learnable: per-feature std is gamma * sqrt(var / (var + eps)).
    # (eps matters here: with N(0, 0.01^2) weights the pre-BN variance is small.)
    gamma = head.layers[-1][1].weight.detach()
    expected_std = gamma * torch.sqrt(pre_bn_var / (pre_bn_var + 1e-5))
    torch.testing.assert_close(z.std(dim=0, unbiased=False), expected_std, rtol=1e-3, atol=1e-5)


def test_hidden_layers_apply_relu_and_the_output_layer_does_not():
    torch.manual_seed(0)
    head = ProjectionHead(16, num_layers=3).train()
    outputs = head.forward_layers(torch.randn(16, 16))
    assert all((hidden >= 0).all() for hidden in outputs[1:-1])
    assert all((hidden == 0).any() for hidden in outputs[1:-1])
    assert (outputs[-1] < 0).any()


@pytest.mark.parametrize("num_layers", [2, 3])
def test_forward_layers_lists_h_then_every_layer_output(num_layers):
    torch.manual_seed(0)
    head = ProjectionHead(24, num_layers=num_layers).eval()
    _randomise_batchnorm(head, torch.Generator().manual_seed(5))
    h = torch.randn(6, 24)
    with torch.no_grad():
        outputs = head.forward_layers(h)
        z = head(h)
        first_hidden = head.layers[0](h)
    assert len(outputs) == num_layers + 1
    assert outputs[0] is h
    assert [tuple(t.shape) for t in outputs] == [(6, 24)] * num_layers + [(6, 128)]
    torch.testing.assert_close(outputs[1], first_hidden)
    torch.testing.assert_close(outputs[-1], z)


def test_linear_head_is_one_linear_layer_and_bn_without_beta():
    torch.manual_seed(0)
    head = ProjectionHead(20, kind="linear", out_dim=7).train()
    assert len(head.layers) == 1
    assert _layer_types(head.layers[0]) == [nn.Linear, BatchNorm1dNoBeta]
    assert head.layers[0][0].bias is None
    assert head.out_dim == 7
    h = torch.randn(9, 20)
    with torch.no_grad():
        z = head(h)
        linear = h @ head.layers[0][0].weight.T
        expected = (linear - linear.mean(0)) / torch.sqrt(linear.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    assert len(head.forward_layers(h)) == 2


def test_none_head_is_the_identity():
    head = ProjectionHead(20, kind="none")
    h = torch.randn(4, 20)
    assert head.out_dim == 20
    assert list(head.parameters()) == []
    assert torch.equal(head(h), h)
    outputs = head.forward_layers(h)
    assert len(outputs) == 1 and outputs[0] is h


def test_head_linear_weights_follow_the_reference_normal_0_01_init():
    torch.manual_seed(0)
    head = ProjectionHead(256, num_layers=2)
    weight = head.layers[0][0].weight
    assert weight.mean().abs().item() < 3e-4  # standard error 0.01 / 256 ~ 4e-5
    assert weight.std().item() == pytest.approx(0.01, rel=0.02)


def test_batchnorm_without_beta_behaves_as_a_batchnorm():
    bn = BatchNorm1dNoBeta(5)
    assert isinstance(bn, nn.BatchNorm1d)
    assert set(bn.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():
        bn.weight.fill_(3.0)
    bn.reset_parameters()
    assert torch.all(bn.weight == 1) and bn.bias is None

    # Optimiser grouping by module type finds gamma (no weight decay / LARS for BN).
    head = ProjectionHead(8, num_layers=2, out_dim=4)
    bn_parameters = {
        id(p) for m in head.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()
    }
    assert id(head.layers[-1][1].weight) in bn_parameters
    assert len(bn_parameters) == 3  # hidden gamma and beta, output gamma

    # Converting to SyncBatchNorm keeps "no beta"; without a process group it computes the same.
    torch.manual_seed(0)
    head.train()
    h = torch.randn(6, 8)
    with torch.no_grad():
        expected = head(h)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert isinstance(synced.layers[-1][1], nn.SyncBatchNorm)
    assert synced.layers[-1][1].bias is None
    with torch.no_grad():
        torch.testing.assert_close(synced(h), expected)


# --------------------------------------------------------------------------------------
# SimCLR = encoder + head
# --------------------------------------------------------------------------------------


def _tiny_simclr(zero_init_residual: bool = True) -> SimCLR:
    encoder = ResNetEncoder(18, width=0.25, cifar_stem=True, zero_init_residual=zero_init_residual)
    return SimCLR(encoder, ProjectionHead(encoder.feature_dim, num_layers=2, out_dim=32))


def test_simclr_returns_h_and_z():
    torch.manual_seed(0)
    model = _tiny_simclr().eval()
    _randomise_batchnorm(model, torch.Generator().manual_seed(6))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        h, z = model(x)
        h_encoder = model.encoder(x)
        z_head = model.head(h_encoder)
        h_features = model.forward_features(x)
    assert h.shape == (4, 128) and z.shape == (4, 32)
    torch.testing.assert_close(h, h_encoder)
    torch.testing.assert_close(h_features, h_encoder)
    torch.testing.assert_close(z, z_head)


def test_gradients_reach_encoder_and_head():
    torch.manual_seed(0)
    model = _tiny_simclr(zero_init_residual=False).train()
    x = torch.randn(4, 3, 16, 16)
    h, z = model(x)
    # z has zero mean per feature in training mode, so z.sum() would have zero gradient;
    # weight by random coefficients instead.
    loss = (z * torch.randn_like(z)).sum() + (h * torch.randn_like(h)).sum()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_zero_init_blocks_gradient_to_residual_convs_but_not_to_last_gamma():
    # With gamma = 0 the residual branch's convolutions get no gradient at the first step;
    # only the zeroed gamma does, which is how the branch "switches on" (init_zero).
    torch.manual_seed(0)
    model = _tiny_simclr().train()
    h, z = model(torch.randn(4, 3, 16, 16))
    (z * torch.randn_like(z)).sum().backward()
    block = model.encoder.layer3[1]
    assert block.conv1.weight.grad.abs().sum() == 0
    assert block.bn2.weight.grad.abs().sum() > 0
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.head.layers[0][0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 0, 250, True])
def test_unknown_depth_is_rejected_with_the_allowed_values(depth):
    with pytest.raises(ValueError, match=r"18, 34, 50, 101, 152, 200"):
        ResNetEncoder(depth)


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_width_is_rejected(width):
    with pytest.raises(ValueError, match="width > 0"):
        ResNetEncoder(18, width=width)


def test_bad_in_channels_is_rejected():
    with pytest.raises(ValueError, match="in_channels"):
        ResNetEncoder(18, in_channels=0)


@pytest.mark.parametrize("name", ["resnet20", "ResNet50", "vit_b_16", ""])
def test_unknown_encoder_name_is_rejected_with_the_allowed_names(name):
    with pytest.raises(ValueError) as error:
        build_encoder(name, image_size=32)
    for allowed in ENCODER_NAMES:
        assert allowed in str(error.value)


@pytest.mark.parametrize("name, depth", [("resnet18", 18), ("resnet34", 34), ("resnet50", 50)])
def test_build_encoder_maps_names_to_depths(name, depth):
    encoder = build_encoder(name, width=0.25, image_size=32)
    assert encoder.depth == depth
    assert tuple(len(stage) for stage in _stages(encoder)) == _BLOCKS_PER_STAGE[depth]
    assert ENCODER_NAMES == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


def test_bad_projection_head_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"\['nonlinear', 'linear', 'none'\]"):
        ProjectionHead(16, kind="mlp")
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(16, num_layers=0)
    with pytest.raises(ValueError, match="in_dim"):
        ProjectionHead(0)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(16, out_dim=-1)
