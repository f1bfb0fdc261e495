"""Every bundled recipe holds the values of the source its first line cites.

Each expectation is written from the source itself (the reference README's commands, the
SimCLR paper's §2.3 / App. B.1 / B.9, SimCLRv2 §3), not read back from the recipe, so a recipe
that drifts from its source fails here.
"""

from __future__ import annotations

import pytest

from simclrkit import config as C

# recipe -> {dotted key: value in the source}
SOURCES = {
    # reference README, "pretrain the model on CIFAR-10 with a single GPU"
    "cifar10_r18": {
        "train.batch_size": 512, "train.epochs": 1000, "optim.lr": 1.0,
        "optim.weight_decay": 1e-4, "loss.temperature": 0.5, "model.encoder": "resnet18",
        "augment.blur": False, "augment.color_jitter_strength": 0.5,
        "augment.crop_sampler": "reference",  # CIFAR images are natively 32 px
    },
    # paper App. B.9: CIFAR-10, ResNet-50 with the CIFAR stem, s = 0.5, no blur
    "cifar10_r50": {
        "model.encoder": "resnet50", "augment.blur": False,
        "augment.color_jitter_strength": 0.5, "augment.crop_sampler": "reference",
    },
    # paper §2.3 and App. B.1: LARS, 0.3 x B/256, weight decay 1e-6, batch 4096, 100 epochs,
    # 10 warmup epochs, temperature 0.1
    "imagenet_r50_linear": {
        "optim.name": "lars", "optim.lr": 0.3, "optim.lr_scaling": "linear",
        "optim.weight_decay": 1e-6, "train.batch_size": 4096, "train.epochs": 100,
        "optim.warmup_epochs": 10, "loss.temperature": 0.1, "model.encoder": "resnet50",
        "augment.color_jitter_strength": 1.0, "augment.blur": True,
        "augment.crop_sampler": "reference", "data.image_size": 224,
    },
    # paper App. B.1 / Table B.1: square-root scaling, 0.075 x sqrt(B)
    "imagenet_r50_sqrt": {
        "optim.lr": 0.075, "optim.lr_scaling": "sqrt", "model.encoder": "resnet50",
        "augment.crop_sampler": "reference", "data.image_size": 224,
    },
    # SimCLRv2 §3: 3-layer head, lr 0.1 x sqrt(B) "linearly increased for the first 5% of
    # epochs" (40 of 800), weight decay 1e-4, batch 4096; fine-tuned "from the first layer of
    # projection head" (ft_proj_selector 1)
    "imagenet_r50_v2": {
        "model.head_layers": 3, "optim.lr": 0.1, "optim.lr_scaling": "sqrt",
        "optim.weight_decay": 1e-4, "train.epochs": 800, "train.batch_size": 4096,
        "optim.warmup_epochs": 40, "eval.ft_proj_selector": 1,
        "loss.temperature": 0.1, "augment.crop_sampler": "reference",
    },
}


def _value(data: dict, key: str):
    node = data
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("recipe", sorted(SOURCES))
def test_recipe_holds_the_values_of_its_source(recipe):
    config = C.to_dict(C.load_config(recipe, []))
    for key, expected in SOURCES[recipe].items():
        assert _value(config, key) == expected, (recipe, key)


def test_every_recipe_names_its_source_on_its_first_line():
    for name, source in C.list_recipes().items():
        assert len(source) > 30, (name, source)
