"""simclrkit: SimCLR (Chen et al., 2020; SimCLRv2, 2020) for PyTorch."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_classifier", "load_encoder"]


def __getattr__(name: str):
    # Lazy: `import simclrkit` stays instant (no torch import) until the loader is used.
    if name in ("load_encoder", "load_classifier"):
        from simclrkit import export

        return getattr(export, name)
    raise AttributeError(f"module 'simclrkit' has no attribute {name!r}")
