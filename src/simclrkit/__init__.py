"""simclrkit: SimCLR (Chen et al., 2020; SimCLRv2, 2020) for PyTorch."""

__version__ = "0.1.0"
