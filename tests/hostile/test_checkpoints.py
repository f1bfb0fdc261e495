"""Damaged, truncated and forged checkpoints and exports: refused in one line, never run.

What a reader of a checkpoint relies on (the architecture, the config, every tensor's name
and shape, the safetensors metadata) is generated wrong by hypothesis: wrong types, missing
keys, absurd sizes, NaN, strings, nested junk. Every reader (``load_encoder``,
``validate_training_checkpoint``, ``export_checkpoint``) must either refuse it with a
CheckpointError or ConfigError, or accept it and then work; no other exception, ever. Forged
files that claim a model of tens of gigabytes are refused under an address-space limit, so an
allocation would fail loudly. The commands (``evaluate``, ``export``, ``embed``) exit 2 with one
line and no traceback.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from simclrkit.checkpoint import (
    MAX_WIDTH,
    CheckpointError,
    atomic_save,
    expected_shapes,
    validate_training_checkpoint,
)
from simclrkit.config import ConfigError, load_config
from simclrkit.export import export_checkpoint, load_encoder, read_trained
from simclrkit.models import build_model
from simclrkit.train import pretrain

from conftest import TINY
from hostile import assert_user_error, simclrkit

_REFUSED = (CheckpointError, ConfigError)
_SLOW_EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_FAST_EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_FORGED = {  # a valid architecture whose model is ~60 GB of float32 weights
    "encoder": "resnet152", "width": 16, "in_channels": 1, "cifar_stem": True,
    "image_size": 16, "head": "nonlinear", "head_layers": 2, "proj_dim": 128,
}


# --------------------------------------------------------------------------------------------
# A real checkpoint and export, made once
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 2-step run of the tiny MNIST-5k configuration."""
    run = tmp_path_factory.mktemp("trained") / "run"
    pretrain(load_config("mnist5k", [*TINY, "train.max_steps=2"]), run, quiet=True)
    return run


@pytest.fixture(scope="module")
def state(run_dir) -> dict:
    """The checkpoint's entries a model is built from (the optimiser state left out)."""
    full = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    keys = ("format_version", "step", "encoder", "head", "config", "architecture",
            "train_seconds")
    return {key: full[key] for key in keys}


@pytest.fixture(scope="module")
def export(run_dir, tmp_path_factory) -> tuple[dict, dict]:
    """The tensors and metadata of a real safetensors export with the head."""
    from safetensors import safe_open

    out = export_checkpoint(
        run_dir / "checkpoints" / "last.pt", "safetensors",
        tmp_path_factory.mktemp("export") / "enc.safetensors", include_head=True,
    )
    with safe_open(str(out), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder the hypothesis examples overwrite (function-scoped tmp_path is shared)."""
    return tmp_path_factory.mktemp("scratch")


def _save_safetensors(tensors: dict, metadata: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _damaged_state(state: dict, **changes) -> dict:
    """A deep copy of ``state`` with entries replaced (or, for the value ``...``, removed)."""
    damaged = copy.deepcopy(state)
    for key, value in changes.items():
        if value is ...:
            damaged.pop(key, None)
        else:
            damaged[key] = value
    return damaged


def _assert_usable(checked: dict) -> None:
    """An accepted checkpoint must build: its tensors load into its architecture."""
    model = build_model(checked["architecture"])
    model.encoder.load_state_dict(checked["encoder"])
    if checked["head"] is not None:
        model.head.load_state_dict(checked["head"])


# --------------------------------------------------------------------------------------------
# Strategies: junk values and damaged entries
# --------------------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**1000, max_value=2**1100),  # beyond a float: math.isfinite raises
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 5e-324, 1e6, 1e300]),
    st.text(max_size=12),
    st.sampled_from(["resnet18", "resnet152", "1.0", "16", "nonlinear", "none", "", "NaN"]),
)
_JSON_JUNK = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
# A pickle may also hold tensors, tuples and non-string keys.
_PICKLE_JUNK = st.recursive(
    _SCALARS | st.sampled_from([torch.tensor(1.0), torch.zeros(3), torch.tensor(16),
                                torch.zeros(2, 2, dtype=torch.complex64)]),
    lambda children: st.lists(children, max_size=3)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=3),
    max_leaves=8,
)
_ARCH_KEYS = ("encoder", "width", "in_channels", "cifar_stem", "image_size", "head",
              "head_layers", "proj_dim")
_HUGE = {  # values past the bounds (or of no size at all): always refused
    "width": [1e6, MAX_WIDTH + 1, 1e300, float("inf"), float("nan"), 10**400, 0, -1, "1.0"],
    "image_size": [10**9, 0, 4097, 16.0, True],
    "proj_dim": [10**12, 65537, 0, -128],
    "head_layers": [10**6, 9, 0],
    "in_channels": [4, 0, 3.0, 10**9],
    "encoder": ["resnet1000", "", None, ["resnet18"]],
    "head": ["mlp", None, 2],
    "cifar_stem": [1, "true", None],
}
_OTHER_SHAPES = {  # valid values that change some tensor's shape: refused by the shape check
    "encoder": ["resnet34", "resnet50", "resnet152"],
    "width": [0.25, 1, 16],
    "in_channels": [3],
    "cifar_stem": [False],
    "head": ["linear", "none"],
    "head_layers": [3, 8],
    "proj_dim": [64, 65536],
}


# What a damaged example must get: refused, accepted (and then usable), or either (junk that
# may happen to be a valid value).
REFUSE, ACCEPT, EITHER = "refuse", "accept", "either"


@st.composite
def damaged_architectures(draw, original: dict) -> tuple[object, str]:
    """``(architecture, expected)``: one entry removed, past its bounds, changed to a valid
    value implying other shapes, changed harmlessly, replaced by junk, or the whole entry
    replaced by junk."""
    kind = draw(st.sampled_from(
        ["missing", "huge", "other_shape", "harmless", "junk_value", "junk"]
    ))
    arch = dict(original)
    if kind == "missing":
        del arch[draw(st.sampled_from(_ARCH_KEYS))]
        return arch, REFUSE
    if kind == "huge":
        key = draw(st.sampled_from(sorted(_HUGE)))
        arch[key] = draw(st.sampled_from(_HUGE[key]))
        return arch, REFUSE
    if kind == "other_shape":
        key = draw(st.sampled_from(sorted(_OTHER_SHAPES)))
        arch[key] = draw(st.sampled_from(_OTHER_SHAPES[key]))
        return arch, REFUSE
    if kind == "harmless":  # no tensor's shape depends on these
        if draw(st.booleans()):
            arch["image_size"] = draw(st.integers(1, 4096))
        else:
            arch[draw(st.text(max_size=8).filter(lambda k: k not in _ARCH_KEYS))] = draw(
                _PICKLE_JUNK
            )
        return arch, ACCEPT
    if kind == "junk_value":
        arch[draw(st.sampled_from(_ARCH_KEYS))] = draw(_PICKLE_JUNK)
        return arch, EITHER
    junk = draw(_PICKLE_JUNK)
    return junk, REFUSE if not isinstance(junk, dict) or not set(_ARCH_KEYS) <= set(junk) else EITHER


@st.composite
def damaged_states(draw, state: dict) -> tuple[dict, str]:
    """A training checkpoint with one entry damaged: ``(state, expected)``."""
    target = draw(st.sampled_from(
        ["architecture", "encoder_tensor", "encoder", "head", "step", "train_seconds",
         "config_field", "config", "harmless"]
    ))
    damaged = dict(state)  # shallow: the damaged entries are rebuilt, never mutated
    if target == "architecture":
        damaged["architecture"], expected = draw(damaged_architectures(state["architecture"]))
        return damaged, expected
    if target == "encoder_tensor":
        encoder = dict(state["encoder"])
        name = draw(st.sampled_from(sorted(encoder)))
        how = draw(st.sampled_from(["drop", "reshape", "junk", "complex", "meta", "repeat"]))
        shape = tuple(encoder[name].shape)
        if how == "drop":
            del encoder[name]
        elif how == "reshape":
            encoder[name] = torch.zeros((*shape, 2))
        elif how == "junk":
            encoder[name] = draw(_SCALARS)
        elif how == "complex":
            encoder[name] = torch.zeros(shape, dtype=torch.complex64)
        elif how == "meta":
            encoder[name] = torch.empty(shape, device="meta")
        else:  # one stored number viewed as the whole tensor (stride 0)
            encoder[name] = torch.zeros(()).expand(shape) if shape else torch.zeros(()).expand(2)
        damaged["encoder"] = encoder
        # Every change is refused, except a "repeat" of a one-element tensor: that is the
        # tensor itself (a 0-d one is expanded to (2,), a wrong shape).
        one = how == "repeat" and shape and math.prod(shape) == 1
        return damaged, ACCEPT if one else REFUSE
    if target in ("encoder", "head"):
        damaged[target] = draw(_PICKLE_JUNK.filter(lambda v: v is not None))
        return damaged, EITHER
    if target in ("step", "train_seconds"):
        damaged[target] = draw(_PICKLE_JUNK)
        return damaged, EITHER
    if target == "config_field":
        config = copy.deepcopy(state["config"])
        section = draw(st.sampled_from(sorted(k for k, v in config.items() if isinstance(v, dict))))
        field = draw(st.sampled_from(sorted(config[section])))
        config[section][field] = draw(_PICKLE_JUNK)
        damaged["config"] = config
        return damaged, EITHER
    if target == "config":
        damaged["config"] = draw(_PICKLE_JUNK)
        return damaged, EITHER
    # Harmless: entries no reader relies on, or valid values of those it does.
    change = draw(st.sampled_from(["step", "train_seconds", "seed", "extra"]))
    if change == "step":
        damaged["step"] = draw(st.none() | st.integers(0, 2**63 - 1))
    elif change == "train_seconds":
        damaged["train_seconds"] = draw(st.none() | st.floats(0, 1e12) | st.integers(0, 10**9))
    elif change == "seed":
        damaged["config"] = {**state["config"], "seed": draw(st.integers(0, 2**31 - 1))}
    else:
        damaged[draw(st.text(max_size=8).filter(lambda k: k not in state))] = draw(_PICKLE_JUNK)
    return damaged, ACCEPT


def _load_refused_or_usable(path, expected, damaged):
    """``load_encoder(path)``: the encoder when it loads, None when it is refused in one line;
    either outcome checked against what the damage should give."""
    try:
        encoder = load_encoder(path)
    except _REFUSED as error:
        assert "\n" not in str(error)
        _check_outcome(expected, False, damaged)
        return None
    _check_outcome(expected, True, damaged)
    return encoder


def _check_outcome(expected: str, accepted: bool, case: object) -> None:
    event("accepted" if accepted else "refused")
    if expected == REFUSE:
        assert not accepted, f"accepted a damaged checkpoint: {case!r:.2000}"
    if expected == ACCEPT:
        assert accepted, f"refused a valid checkpoint: {case!r:.2000}"


# --------------------------------------------------------------------------------------------
# Properties: refused as a user error, or accepted and usable
# --------------------------------------------------------------------------------------------


@_FAST_EXAMPLES
@given(data=st.data())
def test_validator_refuses_or_accepts_a_usable_checkpoint(state, data):
    damaged, expected = data.draw(damaged_states(state), label="damaged")
    try:
        checked = validate_training_checkpoint(damaged, "ckpt.pt", need_config=True)
    except CheckpointError as error:
        message = str(error)
        assert message.startswith("ckpt.pt") and "\n" not in message and len(message) < 1000
        _check_outcome(expected, False, damaged)
        return
    _check_outcome(expected, True, damaged)
    _assert_usable(checked)


@_SLOW_EXAMPLES
@given(data=st.data())
def test_load_encoder_and_export_refuse_damaged_checkpoint_files(state, scratch, data):
    damaged, expected = data.draw(damaged_states(state), label="damaged")
    path, out = scratch / "damaged.pt", scratch / "out.safetensors"
    try:
        atomic_save(damaged, path)
    except (TypeError, ValueError, RuntimeError, pickle.PicklingError):
        event("unsavable")
        return  # torch.save cannot write it: no file to refuse
    encoder = _load_refused_or_usable(path, expected, damaged)
    if encoder is not None:
        with torch.no_grad():
            h = encoder(encoder.preprocess(torch.zeros(1, 1, 16, 16)))
        assert h.shape == (1, encoder.feature_dim)
    try:
        export_checkpoint(path, "safetensors", out, overwrite=True)
    except _REFUSED as error:
        assert "\n" not in str(error)
        _check_outcome(expected, False, damaged)
    else:
        _check_outcome(expected, True, damaged)
        assert out.stat().st_size > 0
        assert "# resnet" in Path(f"{out}.MODEL_CARD.md").read_text()


@st.composite
def damaged_metadata(draw, metadata: dict) -> tuple[dict, str]:
    """safetensors metadata with one entry damaged: ``(metadata, expected)``."""
    damaged = dict(metadata)
    key = draw(st.sampled_from(
        ["architecture", "training", "evaluation", "format", "format_version", "feature_dim"]
    ))
    how = draw(st.sampled_from(["drop", "text", "json_junk", "architecture", "nested"]))
    unread = key == "feature_dim"  # written for other tools; the reader does not rely on it
    if how == "drop":
        damaged.pop(key, None)
        return damaged, REFUSE if key in ("architecture", "format", "format_version") else ACCEPT
    if how == "text":
        damaged[key] = draw(st.text(max_size=30))
        return damaged, ACCEPT if unread else EITHER
    if how == "json_junk":
        damaged[key] = json.dumps(draw(_JSON_JUNK))  # NaN and Infinity spelled as Python does
        return damaged, ACCEPT if unread else EITHER
    if how == "architecture":
        arch, expected = draw(damaged_architectures(json.loads(metadata["architecture"])))
        damaged["architecture"] = json.dumps(arch, default=str)
        return damaged, expected
    depth = draw(st.sampled_from([40, 5000, 100_000]))  # exhausts a recursive reader
    damaged[key] = "[" * depth + "]" * depth
    return damaged, ACCEPT if unread else REFUSE


@_SLOW_EXAMPLES
@given(data=st.data())
def test_safetensors_with_damaged_metadata_is_refused_or_usable(export, scratch, data):
    tensors, metadata = export
    damaged, expected = data.draw(damaged_metadata(metadata), label="damaged")
    path, out = scratch / "damaged.safetensors", scratch / "re-export.safetensors"
    _save_safetensors(tensors, damaged, path)
    encoder = _load_refused_or_usable(path, expected, damaged)
    if encoder is not None:
        assert encoder.feature_dim == 64
    try:
        export_checkpoint(path, "safetensors", out, include_head=True, overwrite=True)
    except _REFUSED as error:
        assert "\n" not in str(error)
        _check_outcome(expected, False, damaged)
    else:
        _check_outcome(expected, True, damaged)
        load_encoder(out)  # what it wrote reads back


# --------------------------------------------------------------------------------------------
# Named cases: the message says what is wrong
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, says",
    [
        ({"width": 1e6}, "'width' is 1000000.0"),
        ({"width": 10**400}, "'width' is"),
        ({"width": float("nan")}, "'width' is nan"),
        ({"image_size": 10**9}, "'image_size'"),
        ({"proj_dim": "128"}, "'proj_dim' is '128'"),
        ({"encoder": "resnet1000"}, "allowed: resnet18, resnet34"),
        ({"width": 16, "encoder": "resnet152"}, "has shape"),
        ({"width": 0.25}, "has shape"),
    ],
)
def test_safetensors_architecture_is_checked_before_any_model_is_built(
    export, tmp_path, monkeypatch, change, says
):
    tensors, metadata = export
    arch = {**json.loads(metadata["architecture"]), **change}
    path = _save_safetensors(
        tensors, {**metadata, "architecture": json.dumps(arch)}, tmp_path / "forged.safetensors"
    )
    import simclrkit.train

    def no_model(*args, **kwargs):  # only the meta-device build of the shape check may run
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a model was built from a refused file")
        return real_build(*args, **kwargs)

    real_build = simclrkit.train.build_model
    monkeypatch.setattr(simclrkit.train, "build_model", no_model)
    with pytest.raises(CheckpointError) as refused:
        load_encoder(path)
    assert says in str(refused.value) and str(path) in str(refused.value)


def test_training_checkpoint_entries_are_named_when_wrong(state):
    cases = [
        (_damaged_state(state, architecture=...), "no 'architecture' entry"),
        (_damaged_state(state, architecture=[1, 2]), "'architecture' is list"),
        (_damaged_state(state, config=...), "no 'config' entry"),
        (_damaged_state(state, config={}), "no 'config' entry"),
        (_damaged_state(state, config="lr=1"), "'config' is str"),
        (_damaged_state(state, step=-3), "'step' is -3"),
        (_damaged_state(state, step=2**80), "'step' is"),
        (_damaged_state(state, train_seconds=float("nan")), "'train_seconds' is nan"),
        (_damaged_state(state, head=...), "no 'head' entry"),
        (_damaged_state(state, encoder={"conv1.weight": "weights"}), "is str, not a tensor"),
    ]
    bad_config = copy.deepcopy(state["config"])
    bad_config["optim"]["lr"] = "fast"
    cases.append((_damaged_state(state, config=bad_config), "optim.lr"))
    deep = copy.deepcopy(state["config"])
    deep["augment"]["crop_min_scale"] = [[[[[[[[0.08]]]]]]]]
    cases.append((_damaged_state(state, config=deep), "stored config is not valid"))
    for damaged, says in cases:
        with pytest.raises(CheckpointError) as refused:
            validate_training_checkpoint(damaged, "ckpt.pt", need_config=True, need_head=True)
        assert says in str(refused.value), (says, str(refused.value))


def test_tensors_that_repeat_one_stored_number_are_refused(state):
    encoder = dict(state["encoder"])
    name = "conv1.weight"
    encoder[name] = torch.zeros(()).expand(encoder[name].shape)
    with pytest.raises(CheckpointError, match="repeats its data"):
        validate_training_checkpoint(_damaged_state(state, encoder=encoder), "ckpt.pt")
    # Two names for the same tensor (a tied weight) are one set of numbers: still accepted.
    tied = dict(state["encoder"])
    tied["bn1.weight"] = tied["bn1.bias"]
    checked = validate_training_checkpoint(_damaged_state(state, encoder=tied), "ckpt.pt")
    _assert_usable(checked)


# --------------------------------------------------------------------------------------------
# Forged files that claim a huge model, under an address-space limit
# --------------------------------------------------------------------------------------------

_LIMITED = textwrap.dedent(
    """
    import resource, sys
    from simclrkit.checkpoint import CheckpointError
    from simclrkit.export import load_encoder
    import simclrkit.train, safetensors.torch  # everything imported before the limit

    mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                  if line.startswith("VmSize:"))
    limit = mapped + 4 * 2**30  # 4 GB beyond what the imports mapped (CUDA builds map more)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        bytearray(8 * 2**30)
        print("NO LIMIT")
    except MemoryError:
        pass
    for path in sys.argv[1:]:
        try:
            load_encoder(path)
            print("LOADED", path)
        except CheckpointError as error:
            print("REFUSED", error)
    """
)


def test_forged_huge_models_are_refused_without_allocating_them(state, export, tmp_path):
    tensors, metadata = export
    # The real 720 KB of tensors under metadata claiming a ResNet-152 at width 16.
    forged_export = _save_safetensors(
        tensors, {**metadata, "architecture": json.dumps(_FORGED)}, tmp_path / "forged.safetensors"
    )
    # A training checkpoint with every tensor of that model, each one stored number viewed at
    # the full shape: the shapes are right, the file is small, the claimed model is ~60 GB.
    shapes = expected_shapes(_FORGED)
    views = {
        part: {name: torch.zeros((), dtype=torch.long if "num_batches" in name else torch.float)
               .expand(shape) for name, shape in shapes[part].items()}
        for part in ("encoder", "head")
    }
    forged_checkpoint = tmp_path / "forged.pt"
    atomic_save(_damaged_state(state, architecture=_FORGED, **views), forged_checkpoint)
    assert forged_checkpoint.stat().st_size < 5_000_000
    small_tensors = tmp_path / "small.pt"
    atomic_save(_damaged_state(state, architecture=_FORGED), small_tensors)

    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, forged_export, forged_checkpoint, small_tensors],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "NO LIMIT" not in lines, "the address-space limit did not bite"
    assert len(lines) == 3 and all(line.startswith("REFUSED") for line in lines), lines
    for line in (lines[0], lines[2]):  # the first stored tensor the claimed model lacks
        assert "(resnet152, width 16)" in line and ("has shape" in line or "belong" in line)
    assert "repeats its data" in lines[1]


# --------------------------------------------------------------------------------------------
# Truncated, garbage and unsafe files
# --------------------------------------------------------------------------------------------


def _cuts(size: int) -> list[int]:
    return [0, 1, 8, 9, 64, 100, size // 3, size // 2, size - 22, size - 1]


def test_truncated_checkpoints_and_exports_are_refused(run_dir, export, tmp_path):
    checkpoint = (run_dir / "checkpoints" / "last.pt").read_bytes()
    tensors, metadata = export
    exported = _save_safetensors(tensors, metadata, tmp_path / "whole.safetensors").read_bytes()
    path = tmp_path / "cut"
    for original in (checkpoint, exported):
        for cut in _cuts(len(original)):
            path.write_bytes(original[:cut])
            with pytest.raises(CheckpointError) as refused:
                load_encoder(path)
            assert str(path) in str(refused.value) and "\n" not in str(refused.value)
            with pytest.raises(CheckpointError):
                read_trained(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 4096,
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        b"\x80\x02" + bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        b"PK\x03\x04" + bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)),
        (20).to_bytes(8, "little") + b'{"a": {"dtype": "F32"' + b" " * 40,  # bad header JSON
        (10**6).to_bytes(8, "little") + b"{}",  # header longer than the file
        # a tensor whose data would lie past the end of the file
        (66).to_bytes(8, "little")
        + b'{"x":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}',
        "just text\n".encode(),
    ],
)
def test_garbage_files_are_refused(content, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused:
        load_encoder(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


class _Creates:
    """A pickle that would create a file when loaded with full unpickling."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Plain:
    """An object of a class that is not allowlisted: harmless here, but no tensor."""


@pytest.mark.parametrize("where", ["top", "architecture", "encoder"])
def test_a_pickle_holding_objects_is_refused_as_unsafe_and_runs_nothing(state, tmp_path, where):
    marker = tmp_path / "created-by-the-pickle"
    evil = _Creates(marker)
    damaged = {
        "top": _damaged_state(state, payload=evil),
        "architecture": _damaged_state(state, architecture={**state["architecture"], "x": evil}),
        "encoder": _damaged_state(state, encoder={**state["encoder"], "conv1.weight": evil}),
    }[where]
    path = tmp_path / "unsafe.pt"
    torch.save(damaged, path)
    for read in (load_encoder, read_trained):
        with pytest.raises(CheckpointError, match="could run code") as refused:
            read(path)
        assert "posix.system" in str(refused.value) or "os.system" in str(refused.value)
        assert "weights_only=False" not in str(refused.value)  # no advice to load it unsafely
    assert not marker.exists()

    torch.save(_damaged_state(state, payload=_Plain()), path)
    with pytest.raises(CheckpointError, match="could run code.*_Plain"):
        load_encoder(path)


# --------------------------------------------------------------------------------------------
# The commands: exit 2, one line, no traceback
# --------------------------------------------------------------------------------------------


def _write_damaged(kind: str, state: dict, export: tuple[dict, dict], folder: Path,
                   marker: Path) -> Path:
    """A damaged checkpoint or export of the given kind."""
    tensors, metadata = export
    if kind == "export_huge_width":
        arch = {**json.loads(metadata["architecture"]), "width": 1e6}
        return _save_safetensors(
            tensors, {**metadata, "architecture": json.dumps(arch)}, folder / "huge.safetensors"
        )
    path = folder / f"{kind}.pt"
    if kind in ("truncated", "garbage"):
        atomic_save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data[::-1])
        return path
    damaged = {
        "no_architecture": lambda: _damaged_state(state, architecture=...),
        "mismatched_width": lambda: _damaged_state(
            state, architecture={**state["architecture"], "width": 0.25}),
        "huge_width": lambda: _damaged_state(
            state, architecture={**state["architecture"], "width": 1e6}),
        "no_config": lambda: _damaged_state(state, config=...),
        "bad_config": lambda: _damaged_state(
            state, config={**state["config"], "optim": {**state["config"]["optim"], "lr": "x"}}),
        "unsafe": lambda: _damaged_state(state, payload=_Creates(marker)),
    }[kind]()
    torch.save(damaged, path)
    return path


@pytest.mark.parametrize(
    "command, kind, says",
    [
        ("evaluate", "no_architecture", "no 'architecture' entry"),
        ("evaluate", "mismatched_width", "has shape"),
        ("evaluate", "no_config", "records no training run"),  # name data.dataset instead
        ("evaluate", "bad_config", "optim.lr"),
        ("evaluate", "truncated", "cannot read checkpoint"),
        ("evaluate", "unsafe", "could run code"),
        ("export", "huge_width", "'width' is 1000000.0"),
        ("export", "export_huge_width", "'width' is 1000000.0"),
        ("export", "garbage", "neither a PyTorch nor a safetensors file"),
        ("export", "unsafe", "could run code"),
        ("embed", "mismatched_width", "has shape"),
        ("embed", "export_huge_width", "'width' is 1000000.0"),
    ],
)
def test_commands_on_damaged_checkpoints_exit_2_with_one_line(
    state, export, tmp_path, command, kind, says
):
    marker = tmp_path / "created-by-the-pickle"
    path = _write_damaged(kind, state, export, tmp_path, marker)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(images / "a.png")
    args = {
        "evaluate": ["evaluate", path, "--device", "cpu", "--protocol", "knn",
                     "--out-dir", tmp_path / "eval"],
        "export": ["export", path, "--format", "safetensors", "--out", tmp_path / "out.st"],
        "embed": ["embed", path, images, "--out", tmp_path / "h.npy", "--device", "cpu"],
    }[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = assert_user_error(simclrkit(*args), says)
    assert str(path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not marker.exists()
