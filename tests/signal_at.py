"""A Lightning callback that stands in for a cluster scheduler in tests: it sends a signal at a chosen step."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """Send ``signal`` to this process (``group=True``: to its whole process group, DataLoader workers included)
    when step ``step`` ends; with ``once`` (a file path), only in the first run that gets there."""

    def __init__(self, step: int, signal: str = "SIGTERM", group: bool = False, once: str | None = None) -> None:
        self.step, self.signal, self.group, self.once = int(step), signal, group, once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.once is not None:
            if Path(self.once).exists():
                return
            Path(self.once).touch()
        signum = getattr(signal, self.signal)
        if self.group:
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(os.getpid(), signum)
