"""Config: recipes, overrides, type and value validation, derived values."""

import dataclasses

import pytest

from simclrkit import config as C


def test_defaults_follow_the_paper():
    cfg = C.Config()
    assert cfg.optim.name == "lars" and cfg.optim.momentum == 0.9
    assert cfg.optim.trust_coefficient == 0.001
    assert cfg.optim.lr == 0.3 and cfg.optim.lr_scaling == "linear"
    assert cfg.optim.warmup_epochs == 10
    assert cfg.loss.temperature == 0.1
    assert cfg.model.proj_dim == 128 and cfg.model.head_layers == 2
    assert cfg.augment.color_jitter_prob == 0.8 and cfg.augment.grayscale_prob == 0.2


def test_config_is_frozen():
    cfg = C.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_overrides_parse_yaml_scalars_and_merge_into_recipe():
    cfg = C.load_config(
        "mnist5k",
        ["train.epochs=2", "loss.temperature=0.2", "model.cifar_stem=true", "data.image_size=null"],
    )
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.loss.temperature == 0.2
    assert cfg.model.cifar_stem is True
    assert cfg.data.image_size is None
    # the recipe's other values survive
    assert cfg.model.width == 0.25 and cfg.recipe == "mnist5k"


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string '1e-4'; a float setting must still take it,
    # on the command line and in a file, and an integer setting must still refuse it.
    cfg = C.load_config("mnist5k", ["optim.weight_decay=1e-4", "optim.lr=+3E-1"])
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 0.3
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  weight_decay: 5e-5\n")
    assert C.load_config(str(path)).optim.weight_decay == 5e-5
    with pytest.raises(C.ConfigError, match="train.batch_size"):
        C.load_config("mnist5k", ["train.batch_size=1e2"])
    with pytest.raises(C.ConfigError, match="optim.lr"):
        C.load_config("mnist5k", ["optim.lr=1e"])


def test_round_trip_through_dict():
    cfg = C.load_config("mnist5k", ["seed=7"])
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=3", ["unknown key 'train.epoch'", "did you mean 'epochs'"]),
        ("trian.epochs=3", ["unknown key 'trian'", "did you mean 'train'"]),
        ("train.batch_size=abc", ["train.batch_size", "an integer"]),
        ("train.batch_size=1.5", ["train.batch_size", "an integer"]),
        ("train.batch_size=0", ["train.batch_size", "> 0"]),
        ("optim.lr=-0.1", ["optim.lr", "> 0"]),
        ("optim.name=adam", ["optim.name", "lars", "did you mean 'adamw'"]),
        ("loss.temperature=0", ["loss.temperature", "> 0"]),
        ("model.encoder=resnet19", ["model.encoder", "resnet18"]),
        ("model.width=0", ["model.width", "> 0"]),
        ("data.dataset=folder", ["data.root", "data.root=DIR"]),
        ("augment.flip_prob=1.5", ["augment.flip_prob", "<= 1"]),
        ("train.device=tpu", ["train.device", "cuda"]),
        ("model.cifar_stem=maybe", ["model.cifar_stem", "true/false"]),
        ("seed", ["KEY=VALUE"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(C.ConfigError) as info:
        C.load_config("mnist5k", [override])
    for word in words:
        assert word in str(info.value)


def test_unknown_recipe_suggests_a_close_name():
    with pytest.raises(C.ConfigError, match="did you mean 'mnist5k'"):
        C.load_config("mnist5", [])


def test_yaml_file_with_a_typo_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(C.ConfigError, match="unknown key 'optim.learning_rate'"):
        C.load_config(str(path), [])


def cfg_overrides(cfg) -> list[str]:
    return ["train.batch_size=256", "train.epochs=3", "optim.warmup_epochs=1"]


def _reference_steps(num_examples, epochs, batch_size, warmup_epochs):
    """model_util.get_train_steps and WarmUpAndCosineDecay's warmup, as the reference writes
    them (train_steps unset)."""
    total = num_examples * epochs // batch_size + 1
    warmup = int(round(warmup_epochs * num_examples // batch_size))
    return total, warmup


@pytest.mark.parametrize("num_examples,epochs,batch_size,warmup", [
    (1000, 3, 256, 1), (50000, 1000, 512, 10), (1281167, 100, 4096, 10), (4000, 50, 256, 1),
    (1281167, 800, 4096, 40), (5000, 7, 5000, 0), (999, 1, 2, 0.5),
])  # fmt: skip
def test_reference_step_counting_equals_the_reference_formulas(num_examples, epochs, batch_size,
                                                                warmup):  # fmt: skip
    cfg = C.load_config(None, [f"train.batch_size={batch_size}", f"train.epochs={epochs}",
                               f"optim.warmup_epochs={warmup}"])  # fmt: skip
    plan = C.resolve(cfg, num_examples=num_examples, native_image_size=32, in_channels=3)
    assert (plan.total_steps, plan.warmup_steps) == _reference_steps(
        num_examples, epochs, batch_size, warmup
    )


def test_resolve_derives_batch_lr_and_steps():
    cfg = C.load_config(None, ["train.batch_size=256", "train.epochs=3", "optim.warmup_epochs=1"])
    plan = C.resolve(cfg, num_examples=1000, native_image_size=28, in_channels=1, world_size=2)
    assert plan.batch_size_per_device == 128
    # the reference's get_train_steps: 1000 * 3 // 256 + 1; warmup int(round(1 * 1000 // 256))
    assert plan.total_steps == 12 and plan.warmup_steps == 3
    assert plan.images_per_epoch == 1000 and plan.steps_per_epoch == 1000 / 256
    drop = C.resolve(C.load_config(None, [*cfg_overrides(cfg), "train.step_counting=drop_last"]),
                     num_examples=1000, native_image_size=28, in_channels=1, world_size=2)
    assert drop.steps_per_epoch == 3 and drop.images_per_epoch == 768  # the rest dropped
    assert drop.total_steps == 9 and drop.warmup_steps == 3
    assert plan.scaled_lr == pytest.approx(0.3 * 256 / 256)
    assert plan.cifar_stem is True and plan.blur is False and plan.image_size == 28

    sqrt = C.load_config(None, ["train.batch_size=400", "optim.lr_scaling=sqrt", "optim.lr=0.075"])
    plan = C.resolve(sqrt, num_examples=1000, native_image_size=96, in_channels=3)
    assert plan.scaled_lr == pytest.approx(0.075 * 20)
    assert plan.cifar_stem is False and plan.blur is True


def test_max_steps_caps_the_schedule():
    cfg = C.load_config(None, ["train.batch_size=10", "train.epochs=5", "train.max_steps=7"])
    plan = C.resolve(cfg, num_examples=100, native_image_size=28, in_channels=1)
    assert plan.total_steps == 7


def test_resolve_rejects_impossible_batches():
    cfg = C.load_config(None, ["train.batch_size=255"])
    with pytest.raises(C.ConfigError, match="multiple of 2"):
        C.resolve(cfg, num_examples=1000, native_image_size=28, in_channels=1, world_size=2)
    with pytest.raises(C.ConfigError, match="larger than the 100 training images"):
        C.resolve(cfg, num_examples=100, native_image_size=28, in_channels=1)


def test_every_bundled_recipe_is_valid():
    recipes = C.list_recipes()
    assert "mnist5k" in recipes
    for name in recipes:
        assert C.load_config(name, []).recipe == name


def test_colour_strength_auto_follows_the_image_size_as_the_paper_sets_it():
    from simclrkit.augment import build_augment

    for size, strength in ((32, 0.5), (28, 0.5), (96, 1.0), (224, 1.0)):
        cfg = C.from_dict({"data": {"image_size": size}})
        plan = C.resolve(cfg, num_examples=10000, native_image_size=size, in_channels=3)
        assert plan.color_jitter_strength == strength
        assert build_augment(cfg, size, plan.blur).color_jitter_strength == strength
    explicit = C.from_dict({"augment": {"color_jitter_strength": 0.7}})
    plan = C.resolve(explicit, num_examples=10000, native_image_size=32, in_channels=3)
    assert plan.color_jitter_strength == 0.7
    with pytest.raises(C.ConfigError, match="color_jitter_strength"):
        C.from_dict({"augment": {"color_jitter_strength": "strong"}})
