"""Which device a command runs on: a name from the user (``auto``, ``cpu``, ``cuda:1``,
``mps``) to a ``torch.device``, checked against what the machine has. Used by training,
evaluation and embedding alike.

Apple silicon's GPU (``mps``) is chosen by ``auto`` where PyTorch offers it and CUDA is absent.
It trains in fp32 (``train.precision=auto``), or bf16 where the macOS version supports it; an
operation PyTorch has not implemented for it is reported by :func:`missing_operation` as one
line with the two ways out (the CPU fallback or ``train.device=cpu``).
"""

from __future__ import annotations

import torch

from simclrkit.config import ConfigError


def mps_available() -> bool:
    """Whether PyTorch can use Apple silicon's GPU here (an MPS build on macOS 12.3+)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: str, key: str = "train.device") -> torch.device:
    """Maps 'auto' to CUDA when present, else Apple's MPS when present, else the CPU; checks
    an explicit CUDA or MPS request.

    Raises:
        ConfigError: CUDA or MPS asked for but absent; ``key`` names the setting in the message.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{name}' asked for, but no CUDA device is visible; use cpu")
    if name == "mps" and not mps_available():
        raise ConfigError(
            f"{key}: 'mps' asked for, but PyTorch offers no MPS device here (it needs Apple "
            "silicon, macOS 12.3 or later and a PyTorch built with MPS); use cpu"
        )
    return torch.device(name)


def mps_supports_bf16() -> bool:
    """Whether the MPS device computes in bf16 (macOS 14 and later)."""
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def missing_operation(error: BaseException) -> str | None:
    """One line for an operation PyTorch has not implemented on MPS, or None for any other
    error. PyTorch raises NotImplementedError naming the operator and the MPS device."""
    text = str(error)
    if not isinstance(error, NotImplementedError) or "MPS" not in text:
        return None
    first = text.strip().splitlines()[0] if text.strip() else "an operator"
    return (
        f"PyTorch has no MPS version of an operation this run needs ({first}); run it on "
        "the CPU instead with PYTORCH_ENABLE_MPS_FALLBACK=1 in the environment (slower for "
        "that operation only), or train on the CPU with train.device=cpu"
    )
