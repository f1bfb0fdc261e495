"""Hostile configurations: every numeric setting fed every kind of value, YAML files built to
break a parser, and the real command refusing each with exit 2 and one line.

Properties (hypothesis) cover every numeric field of every config section: a value is either
accepted as a finite number of the field's type within the field's documented bounds, or
refused with a :class:`ConfigError` that names the field, never another exception. The
command-line cases run ``python -m simclrkit`` in a real process and check that nothing in the
run folder was created beyond the lock, and nothing that existed was changed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Literal, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simclrkit import config as C

from hostile import assert_user_error, simclrkit, snapshot

# --------------------------------------------------------------------------------------
# (a) Every numeric field, every kind of value
# --------------------------------------------------------------------------------------

_INF = math.inf
# Documented bounds of every numeric setting: (low, high, low excluded, high excluded). A new
# numeric field must be added here (test_every_numeric_field_has_documented_bounds).
BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "data.image_size": (1, C.MAX_IMAGE_SIZE, False, False),
    "data.num_workers": (0, C.MAX_WORKERS, False, False),
    "data.max_bad_fraction": (0, 1, False, False),
    "data.holdout": (0, C.MAX_INT, False, False),
    "augment.color_jitter_strength": (0, _INF, False, True),
    "augment.color_jitter_prob": (0, 1, False, False),
    "augment.grayscale_prob": (0, 1, False, False),
    "augment.blur_prob": (0, 1, False, False),
    "augment.crop_min_scale": (0, 1, True, False),
    "augment.flip_prob": (0, 1, False, False),
    "model.width": (0, C.MAX_WIDTH, True, False),
    "model.head_layers": (1, C.MAX_HEAD_LAYERS, False, False),
    "model.proj_dim": (1, C.MAX_PROJ_DIM, False, False),
    "model.sk_ratio": (0, 1, False, False),
    "model.se_ratio": (0, 1, False, False),
    "loss.temperature": (0, _INF, True, True),
    "loss.chunk_size": (1, C.MAX_INT, False, False),
    "optim.lr": (0, C.MAX_LR, True, False),
    "optim.momentum": (0, 1, False, True),
    "optim.weight_decay": (0, _INF, False, True),
    "optim.trust_coefficient": (0, _INF, True, True),
    "optim.warmup_epochs": (0, C.MAX_EPOCHS, False, False),
    "train.epochs": (0, C.MAX_EPOCHS, True, False),
    "train.max_steps": (1, C.MAX_INT, False, False),
    "train.batch_size": (2, C.MAX_INT, False, False),
    "train.checkpoint_every": (1, C.MAX_INT, False, False),
    "train.keep_last": (1, C.MAX_INT, False, False),
    "train.log_every": (1, C.MAX_INT, False, False),
    "train.micro_batch_size": (1, C.MAX_INT, False, False),
    "train.collective_timeout": (0, C.MAX_TIMEOUT, True, False),
    "eval.batch_size": (1, C.MAX_INT, False, False),
    "eval.max_share": (0, 1, False, False),
    "eval.min_seconds": (0, _INF, False, True),
    "eval.max_train_images": (1, C.MAX_INT, False, False),
    "eval.max_test_images": (1, C.MAX_INT, False, False),
    "eval.monitor_every": (0, C.MAX_INT, False, False),
    "eval.monitor_images": (1, C.MAX_INT, False, False),
    "eval.ft_proj_selector": (0, C.MAX_HEAD_LAYERS, False, False),
    "distill.temperature": (0, _INF, True, True),
    "distill.alpha": (0, 1, False, False),
    "distill.label_fraction": (0, 1, True, False),
    "seed": (0, C.MAX_SEED, False, False),
}


def _numeric_types(annotation) -> set[type]:
    """int and/or float among the types an annotation admits (bool is its own type)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_numeric_types(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return set()
    return {annotation} & {int, float}


def numeric_fields() -> dict[str, set[type]]:
    """Dotted key -> numeric types, for every numeric field of every section and the top."""
    found = {}
    top_hints = typing.get_type_hints(C.Config)
    for top in dataclasses.fields(C.Config):
        annotation = top_hints[top.name]
        if dataclasses.is_dataclass(annotation):
            hints = typing.get_type_hints(annotation)
            for item in dataclasses.fields(annotation):
                kinds = _numeric_types(hints[item.name])
                if kinds:
                    found[f"{top.name}.{item.name}"] = kinds
        elif _numeric_types(annotation):
            found[top.name] = _numeric_types(annotation)
    return found


NUMERIC = numeric_fields()

EDGES = [
    2**70, -(2**70), 2**63, 2**63 - 1, 2**64, 2**64 - 1, -(2**63), 10**5000, -1, 0, 1, 2,
    4096, 4097, 65536, 65537, 8, 9, 256, 257, 16.0, 16.000001, 1e9, 1.000001e9, 1e6, 1e300,
    1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 0.9999999, 1.0000001, _INF, -_INF, math.nan,
    604800.0, 604800.5, 1_000_000.0, 1_000_000.5,
]
NUMBER_WORDS = [
    "1e999", "-1e999", "1e-4", "2e9", "1e5", "inf", ".inf", "-.inf", ".nan", "nan", "NaN",
    "1_000", "0x10", "0o7", "1e300", "auto", "", " ", "\0", "1\0", "true", "null", "[1]",
]
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2, max_value=2),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=5000),
    st.sampled_from(EDGES),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(NUMBER_WORDS),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _as_text(value) -> str:
    """``str(value)``, also for an integer beyond the 4,300 digits ``str`` converts."""
    if isinstance(value, int) and value.bit_length() > 10_000:
        return "7" * (len(str(value.bit_length())) + 5000)
    return str(value)


PROPERTY = settings(
    max_examples=120, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _nested(key: str, value) -> dict:
    *sections, name = key.split(".")
    data: dict = {name: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def _field_value(config: C.Config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _assert_valid(config: C.Config, key: str, given_value) -> None:
    """The accepted value: the field's type, finite, and within its documented bounds."""
    value = _field_value(config, key)
    if value is None or value == "auto":
        assert given_value is None or given_value == "auto", (key, given_value, value)
        return
    kinds = NUMERIC[key]
    assert not isinstance(value, bool), (key, value)
    assert type(value) in kinds, (key, type(value), value)
    assert math.isfinite(value), (key, value)
    low, high, low_open, high_open = BOUNDS[key]
    assert (value > low) if low_open else (value >= low), (key, value)
    assert (value < high) if high_open else (value <= high), (key, value)
    if type(value) is int:
        assert abs(value) <= C.MAX_SEED, (key, value)


def _assert_refusal(error: C.ConfigError, key: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert key in message, (key, message)


def test_every_numeric_field_has_documented_bounds():
    assert set(NUMERIC) == set(BOUNDS)
    # The enumeration sees through unions: these take None or "auto" besides a number.
    assert NUMERIC["data.image_size"] == {int} and NUMERIC["data.num_workers"] == {int}
    assert NUMERIC["model.width"] == {float} and NUMERIC["seed"] == {int}


@pytest.mark.parametrize("key", sorted(NUMERIC))
@PROPERTY
@given(value=VALUES)
def test_a_numeric_field_takes_a_bounded_finite_number_or_refuses_it(key, value):
    try:
        config = C.from_dict(_nested(key, value))
    except C.ConfigError as error:
        _assert_refusal(error, key)
    else:
        _assert_valid(config, key, value)


@pytest.mark.parametrize("key", sorted(NUMERIC))
@settings(PROPERTY, max_examples=60)
@given(text=st.one_of(
    st.text(max_size=20),
    st.sampled_from(NUMBER_WORDS),
    st.sampled_from(EDGES).map(_as_text),
    st.floats().map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
))
def test_a_numeric_override_from_the_command_line_is_bounded_or_refused(key, text):
    try:
        config = C.load_config(None, [f"{key}={text}"])
    except C.ConfigError as error:
        _assert_refusal(error, key)
    else:
        _assert_valid(config, key, C._parse_override(text))


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("optim.lr", 1e300, ["optim.lr", "MAX_LR"]),
        ("optim.lr", C.MAX_LR * 1.0001, ["optim.lr", "MAX_LR"]),
        ("optim.weight_decay", _INF, ["optim.weight_decay", "finite"]),
        ("optim.warmup_epochs", math.nan, ["optim.warmup_epochs", "finite"]),
        ("seed", 2**70, ["seed", "64 bits"]),
        ("seed", -1, ["seed", "0 <= seed"]),
        ("train.batch_size", 2**63, ["train.batch_size", "2**63 - 1"]),
        ("train.batch_size", True, ["train.batch_size", "an integer"]),
        pytest.param("model.proj_dim", 10**5000, ["model.proj_dim", "bits"], id="10**5000"),
        ("model.width", "1e999", ["model.width", "finite"]),
    ],
)
def test_named_refusals_say_what_is_allowed(key, value, words):
    with pytest.raises(C.ConfigError) as info:
        C.from_dict(_nested(key, value))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_the_largest_learning_rate_stays_finite_in_float32_at_any_batch():
    from simclrkit.optim import scale_learning_rate

    scaled = scale_learning_rate(C.MAX_LR, C.MAX_INT, "linear")
    assert scaled < 3.4e38  # float32's largest finite number


# --------------------------------------------------------------------------------------
# (b) YAML files built to break the parser
# --------------------------------------------------------------------------------------

_ALIAS_BOMB = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
)
HOSTILE_YAML = {
    "non-utf8": (b"train:\n  epochs: 2\n  device: \xff\xfe\n", ["not UTF-8", "line 3"]),
    "utf16": ("train: {epochs: 2}\n".encode("utf-16"), ["not UTF-8"]),
    "duplicate": (b"seed: 1\nseed: 2\n", ["'seed' appears twice", "line 2", "line 1"]),
    "duplicate-nested": (
        b"train:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n", ["'epochs' appears twice", "line 4"]
    ),
    "duplicate-deep": (
        b"optim: {lr: 0.1}\ntrain: {epochs: 1}\neval:\n  linear: true\n  linear: false\n",
        ["'linear' appears twice", "line 5"],
    ),
    "empty": (b"", ["is empty"]),
    "blank": (b"\n   \n\n", ["is empty"]),
    "comments": (b"# a recipe\n# train: {epochs: 1}\n", ["is empty"]),
    "null": (b"null\n", ["is empty"]),
    "tilde": (b"~\n", ["is empty"]),
    "alias-bomb": (b"l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + _ALIAS_BOMB.encode(), ["alias *l0"]),
    "self-alias": (b"train: &t\n  epochs: 1\n  again: *t\n", ["alias *t"]),
    "merge-alias": (b"base: &b {epochs: 1}\ntrain:\n  <<: *b\n", ["alias *b"]),
    "deep-flow": (b"train: " + b"[" * 200_000 + b"]" * 200_000 + b"\n", ["nested too deeply"]),
    "deep-mapping": (b"train: " + b"{a: " * 100_000 + b"1" + b"}" * 100_000 + b"\n",
                     ["nested too deeply"]),
    "two-megabytes": (b"# padding\n" + b"#" * (2 << 20) + b"\ntrain: {epochs: 1}\n",
                      ["larger than 1 MiB"]),
    "nul-byte": (b"data:\n  root: a\x00b\n", ["not valid YAML", "line 2", "#x0000", "NUL"]),
    "nul-escaped": (b'data:\n  root: "a\\0b"\n', ["data.root", "NUL"]),
    "list": (b"- train\n- epochs\n", ["mapping"]),
    "scalar": (b"train.epochs=3\n", ["mapping"]),
    "python-tag": (b"seed: !!python/object/apply:os.getpid []\n", ["not valid YAML", "python"]),
    "tab": (b"train:\n\tepochs: 2\n", ["not valid YAML", "line 2"]),
    "unterminated": (b'data: {root: "abc\n', ["not valid YAML", "line 2"]),
    "bad-date": (b"seed: 2001-13-45\n", ["YAML cannot read", "month"]),
    "huge-integer": (b"seed: " + b"7" * 5000 + b"\n", ["YAML cannot read", "4300"]),
    "unhashable-key": (b"? [a, b]\n: 1\n", ["not valid YAML", "unhashable"]),
    "non-string-key": (b"1: 2\n", ["unknown key '1'"]),
    "newline-key": (b'train: {"ep\\nochs": 1}\n', ["unknown key", "\\n"]),
    "section-not-mapping": (b"train: 3\n", ["train", "mapping"]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_YAML))
def test_a_hostile_yaml_file_is_refused_naming_the_problem(tmp_path, name):
    raw, words = HOSTILE_YAML[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(raw)
    with pytest.raises(C.ConfigError) as info:
        C.load_config(str(path))
    message = str(info.value)
    assert "\n" not in message, message
    assert len(message) < 400, message
    for word in words:
        assert word in message, (word, message)


def test_a_python_tag_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"seed: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(str(path))
    assert not marker.exists()


def test_an_explicit_empty_mapping_means_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert C.load_config(str(path)) == C.Config()
    path.write_text("# the paper's defaults\n{}\n")
    assert C.load_config(str(path)) == C.Config()


def test_aliases_of_single_values_are_still_allowed(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("train: {epochs: &n 3, log_every: *n}\n")
    config = C.load_config(str(path))
    assert config.train.epochs == 3.0 and config.train.log_every == 3


# --------------------------------------------------------------------------------------
# (c) The real command: exit 2, one line, nothing created, nothing changed
# --------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A folder with files that must survive every refused run: an unrelated file, and a run
    folder that already holds one."""
    (tmp_path / "keep.txt").write_text("not simclrkit's\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("the user's notes\n")
    return tmp_path


def _refused(workspace: Path, args: list[str], words: list[str], created: set[str]) -> str:
    """Runs ``pretrain --run-dir WORKSPACE/run ARGS``; checks exit 2 with one line naming
    ``words``, that the files created are among ``created`` and that none that existed
    changed."""
    before = snapshot(workspace)
    result = simclrkit("pretrain", "--run-dir", workspace / "run", *args, cwd=workspace)
    line = assert_user_error(result, *words)
    after = snapshot(workspace)
    assert {k: after.get(k) for k in before} == before, "a file that existed was changed"
    new = set(after) - set(before)
    assert new <= created, f"created {sorted(new - created)}"
    # Refused before training: no metrics, checkpoints, logs or saved config.
    for name in ("metrics.jsonl", "config.yaml", "checkpoints", "tb", "summary.json"):
        assert not (workspace / "run" / name).exists(), name
    return line


CONFIG_FILES = {
    "non-utf8": (b"train:\n  epochs: \xe9\n", ["--config", "not UTF-8"]),
    "duplicate-nested": (b"optim:\n  lr: 0.1\n  lr: 0.2\n", ["'lr' appears twice", "line 3"]),
    "empty": (b"# nothing yet\n", ["is empty"]),
    "alias-bomb": (b"l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + _ALIAS_BOMB.encode(), ["alias"]),
    "invalid": (b"train:\n\tepochs: 2\n", ["not valid YAML", "line 2"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_pretrain_refuses_a_hostile_config_file(workspace, name):
    raw, words = CONFIG_FILES[name]
    (workspace / "bad.yaml").write_bytes(raw)
    _refused(workspace, ["--config", str(workspace / "bad.yaml")], words, created=set())


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.weight_decay=.inf", ["optim.weight_decay", "finite"]),
        ("optim.warmup_epochs=.inf", ["optim.warmup_epochs", "finite"]),
        (f"seed={2**70}", ["seed", "64 bits"]),
        ("data.image_size=100000", ["data.image_size", "MAX_IMAGE_SIZE"]),
        ("model.width=1e9", ["model.width", "MAX_WIDTH"]),
        ("model.proj_dim=100000000000", ["model.proj_dim", "MAX_PROJ_DIM"]),
        # Before MAX_LR this trained, overflowed float32 (scaled to 1.6e301) and stopped later.
        ("optim.lr=1e300", ["optim.lr", "MAX_LR"]),
    ],
)
def test_pretrain_refuses_an_impossible_override(workspace, override, words):
    _refused(workspace, [override], words, created=set())


def test_pretrain_refuses_a_file_list_that_is_not_utf8(workspace):
    (workspace / "list.txt").write_bytes(b"a.png\n\xff\xfeb.png\n")
    _refused(workspace, ["data.dataset=filelist", f"data.root={workspace / 'list.txt'}"],
             ["data.root", "UTF-8", "line 2"], created={"run/.lock"})


def test_pretrain_refuses_an_absurd_label_in_a_file_list(workspace):
    (workspace / "list.txt").write_text("a.png 0\nb.png 99999999999\n")
    _refused(workspace, ["data.dataset=filelist", f"data.root={workspace / 'list.txt'}"],
             ["data.root", "99999999999", "line 2"], created={"run/.lock"})


def test_pretrain_refuses_a_run_that_cannot_fit_in_memory(workspace):
    # Each setting within its bound, together far beyond any machine: refused by budget.py
    # before the model is built (mnist5k has 4,000 training images, hence batch 2048).
    line = _refused(
        workspace,
        ["model.encoder=resnet152", "model.width=16", "data.image_size=4096",
         "train.batch_size=2048", "train.device=cpu"],
        ["memory", "GB", "train.batch_size", "train.micro_batch_size"], created={"run/.lock"},
    )
    assert "RAM" in line
