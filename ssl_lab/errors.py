"""Errors that stop a run before training with one readable message (run.py prints it without a traceback)."""


class SSLLabError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class DataError(SSLLabError):
    """A data file, key, shape, channel count or pixel value is not what the config says."""


class ConfigError(SSLLabError):
    """An option is unknown, out of range, or disagrees with another option or with the data."""


class RunInterrupted(SSLLabError):
    """A signal (SIGTERM, SIGUSR1, ...) stopped training after a checkpoint was saved; the run can continue."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum  # what a shell reports for a process ended by that signal


class TrainingDiverged(SSLLabError):
    """The loss, gradients or weights became NaN/Inf; the run stopped before anything was written from them."""


class DiskFull(SSLLabError):
    """A write ran out of disk space (ENOSPC) or quota; the file it would have replaced is intact."""
