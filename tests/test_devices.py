"""Device selection, Apple's MPS included. This machine has no MPS device, so what the MPS
path decides is checked with PyTorch's availability answers replaced; the messages are checked
on the error PyTorch raises for a missing MPS operator."""

from __future__ import annotations

import pytest
import torch

from simclrkit import devices
from simclrkit.config import ConfigError
from simclrkit.step import resolve_precision


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.select_device("auto") == torch.device("mps")
    assert devices.select_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.select_device("auto") == torch.device("cuda")


def test_mps_asked_for_where_there_is_none_is_one_line():
    if devices.mps_available():
        pytest.skip("this machine has an MPS device")
    with pytest.raises(ConfigError, match="train.device: 'mps' asked for, but PyTorch offers no "
                                          "MPS device here .*; use cpu"):  # fmt: skip
        devices.select_device("mps")
    with pytest.raises(ConfigError, match="--device: 'mps'"):
        devices.select_device("mps", key="--device")


def test_mps_trains_in_fp32_unless_bf16_is_asked_for():
    mps = torch.device("mps")
    assert resolve_precision("auto", mps) == "fp32"
    assert resolve_precision("bf16", mps) == "bf16"


def test_a_missing_mps_operator_names_both_ways_out():
    error = NotImplementedError(
        "The operator 'aten::_linalg_svd.U' is not currently implemented for the MPS device. "
        "If you want this op to be added in priority during the prototype phase of this "
        "feature, please comment on https://github.com/pytorch/pytorch/issues/77764.\n"
        "As a temporary fix, you can set the environment variable "
        "`PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op."
    )
    message = devices.missing_operation(error)
    assert "aten::_linalg_svd.U" in message and "\n" not in message
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in message and "train.device=cpu" in message
    assert devices.missing_operation(NotImplementedError("something else")) is None
    assert devices.missing_operation(RuntimeError("MPS")) is None
