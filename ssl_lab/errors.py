"""Errors that stop a run before training with one readable message (run.py prints it without a traceback)."""


class SSLLabError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class DataError(SSLLabError):
    """A data file, key, shape, channel count or pixel value is not what the config says."""


class ConfigError(SSLLabError):
    """An option is unknown, out of range, or disagrees with another option or with the data."""
