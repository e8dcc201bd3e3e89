"""Stop on a scheduler's signal with a checkpoint, and continue from it when the run is started again.

SLURM sends SIGTERM (or the signal named by ``--signal``, SIGUSR1 by convention; submitit asks for SIGUSR2) some
time before it kills a job. A signal can arrive in the middle of a step, when the weights are half updated, so the
handler only takes note; the checkpoint is written at the end of that step, in the same place every rank agrees on.
The run then stops with ``RunInterrupted`` (no backbone export, no summary: the run is not finished), and a marker
beside the checkpoint lets the same run started again, by ``resume=auto`` or by a requeued job with its original
arguments, continue from it.

Lightning has its own SIGTERM handling (stop at the end of the epoch, no checkpoint) and SLURM auto-requeue (a
separate ``hpc_ckpt``); ours replaces both for the signals above while training runs. A handler that was there
before (submitit's requeue) is called after the checkpoint is written.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ssl_lab.artifacts import write_json
from ssl_lab.callbacks import reads_values_now
from ssl_lab.errors import RunInterrupted

log = logging.getLogger(__name__)

MARKER = "interrupted.json"
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def preemption_signals() -> list[signal.Signals]:
    """The signals handled here: the usual ones, and submitit's own if it names another (SUBMITIT_PREEMPT_SIGNAL)."""
    names = list(SIGNALS)
    extra = os.environ.get("SUBMITIT_PREEMPT_SIGNAL")
    if extra:
        names.append(extra if extra.startswith("SIG") else f"SIG{extra}")
    return [getattr(signal, n) for n in dict.fromkeys(names) if hasattr(signal, n)]


def read_marker(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clear_marker(checkpoint_dir: Path) -> None:
    (Path(checkpoint_dir) / MARKER).unlink(missing_ok=True)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM / SIGUSR1 / SIGUSR2: checkpoint at the end of the current step, then stop with RunInterrupted."""

    def __init__(self, checkpoint_dir: str | Path, config_hash: str | None = None) -> None:
        self.dir = Path(checkpoint_dir)
        self.config_hash = config_hash
        self.signals = preemption_signals()
        # Taken now, before the Trainer installs its own: these are the handlers of whoever launched us (submitit).
        self._outer: dict[int, Any] = {int(s): signal.getsignal(s) for s in self.signals}
        self._installed: dict[int, Any] = {}
        self.received: int | None = None

    def _note(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the end of this step (under DDP: of the next logging "
                        "step), then stopping", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info("not in the main thread: preemption signals are left to their current handlers")
            return
        for s in self.signals:
            self._installed[int(s)] = signal.getsignal(s)
            signal.signal(s, self._note)

    def _restore(self) -> None:
        for signum, handler in self._installed.items():
            signal.signal(signum, handler)
        self._installed.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            # Every rank stops at the same step, whichever got the signal. The vote is a collective whose result the
            # host must read (a sync with the GPU), so ranks vote on logging steps and at epoch ends only, the steps
            # where Lightning reads its logged values anyway: the stop comes at most log_every_n_steps later.
            if not reads_values_now(trainer):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else int(signal.SIGTERM)
        name = signal.Signals(signum).name
        path = self.dir / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank zero writes, atomically
        if trainer.is_global_zero:
            write_json(self.dir / MARKER, {"signal": name, "global_step": int(trainer.global_step),
                                           "epoch": int(trainer.current_epoch), "time": time.time(),
                                           "config_hash": self.config_hash, "checkpoint": str(path)})
        self._restore()
        outer = self._outer.get(signum)
        if callable(outer):  # e.g. submitit: requeue this job (it exits the process itself)
            log.info("handing %s on to the handler that was installed before training", name)
            outer(signum, None)
        raise RunInterrupted(
            f"stopped by {name} at step {trainer.global_step} (epoch {trainer.current_epoch}); checkpoint saved to "
            f"{path}. Start the same run again with resume=auto (and the same run_dir) to continue.",
            signum=signum)

    # Put back what was there before training, before the Trainer restores what was there before it (its own
    # teardown runs after these hooks; Callback.teardown would run after it and bring back a stale handler).
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
