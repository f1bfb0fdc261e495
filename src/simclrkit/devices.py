"""Which device a command runs on: a name from the user (``auto``, ``cpu``, ``cuda:1``) to a
``torch.device``, checked against what the machine has. Used by training, evaluation and
embedding alike."""

from __future__ import annotations

import torch

from simclrkit.config import ConfigError


def select_device(name: str, key: str = "train.device") -> torch.device:
    """Maps 'auto' to CUDA when present, else the CPU; checks an explicit CUDA request.

    Raises:
        ConfigError: CUDA asked for but absent; ``key`` names the setting in the message.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{name}' asked for, but no CUDA device is visible; use cpu")
    return torch.device(name)
