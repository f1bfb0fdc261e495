"""On a CUDA device (skipped elsewhere): the training step waits for the device once.

Counts the synchronisations PyTorch reports (``torch.cuda.set_sync_debug_mode("warn")``) over
two runs that differ only in length: set-up, the last step's log line and the checkpoint are
the same in both, so the difference divided by the extra steps is what a steady-state step
costs in host syncs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from simclrkit.config import load_config
from simclrkit.train import pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _syncs(run_dir, steps: int, extra: list[str]) -> int:
    config = load_config("mnist5k", [
        "model.width=0.125", "train.batch_size=64", f"train.max_steps={steps}",
        "train.log_every=1000", "train.checkpoint_every=1000", "eval.linear=false",
        "eval.monitor_every=0", "train.device=cuda", *extra,
    ])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pretrain(config, run_dir, quiet=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("extra", [[], ["data.augment_on=host"]], ids=["device", "host"])
def test_a_steady_state_step_syncs_with_the_host_once(tmp_path, extra):
    short = _syncs(tmp_path / "short", 4, extra)
    long = _syncs(tmp_path / "long", 12, extra)
    assert (long - short) / 8 <= 1.0
