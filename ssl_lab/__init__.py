"""ssl_lab: self-supervised learning experiments for scientific images with any number of channels.

`ssl_lab.load_backbone(run_dir)` and `ssl_lab.load_model(run_dir)` turn a run's files into a ready model."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_backbone", "load_model"]


def __getattr__(name: str):
    """The loaders import torch: loaded on first use, so `import ssl_lab` (and `python -m ssl_lab.inspect`) stays
    light."""
    if name in ("load_backbone", "load_model"):
        from ssl_lab import load

        return getattr(load, name)
    raise AttributeError(f"module 'ssl_lab' has no attribute {name!r}")
