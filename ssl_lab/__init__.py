"""ssl_lab: self-supervised learning experiments for scientific images with any number of channels."""

__version__ = "0.1.0"
