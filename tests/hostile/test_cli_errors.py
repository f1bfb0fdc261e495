"""One error path: what a user gets wrong reaches the command line as exit 2 and one line.

The cases here are about the path itself (argument order, operating-system errors, strict
JSON, a resumed run that would change the model); the inputs that cause them are in the other
files of this folder.
"""

from __future__ import annotations

import errno
import json
import math

import pytest

from simclrkit import jsonout
from simclrkit.errors import describe

from conftest import TINY
from hostile import assert_user_error, simclrkit, snapshot


def test_overrides_are_accepted_after_the_options(tmp_path):
    # An override after --quiet reaches the config: its bad value is what is refused.
    result = simclrkit("pretrain", "--run-dir", tmp_path / "run", "--quiet", "train.batch_size=1")
    assert_user_error(result, "train.batch_size")
    # After evaluate's options, an override is parsed too: the missing checkpoint is what stops.
    result = simclrkit("evaluate", tmp_path / "missing.pt", "--protocol", "knn", "eval.knn_k=5")
    assert_user_error(result, "missing.pt")
    assert "unrecognized" not in result.stderr


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EISDIR, "is a folder"),
        (errno.EIO, "I/O error"),
    ],
)
def test_operating_system_errors_read_as_one_line_with_the_fix(code, words):
    line = describe(OSError(code, "system text", "/data/run/checkpoints/last.pt"))
    assert line.startswith("/data/run/checkpoints/last.pt: system text (")
    assert words in line and "\n" not in line


def test_every_json_written_is_strict():
    text = jsonout.dumps({"loss": math.nan, "rows": [math.inf, 1.5], "n": 3})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "loss": None, "rows": [None, 1.5], "n": 3,
    }


@pytest.mark.slow
def test_resume_with_force_cannot_change_the_models_shape(tmp_path):
    run_dir = tmp_path / "run"
    assert simclrkit("pretrain", "--run-dir", run_dir, "--quiet", *TINY).returncode == 0
    before = snapshot(run_dir)
    result = simclrkit("pretrain", "--run-dir", run_dir, "--resume", "--force", "--quiet",
                       *TINY, "model.width=0.25", "train.max_steps=12")
    assert_user_error(result, "width: 0.125 -> 0.25", "start a new --run-dir")
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
