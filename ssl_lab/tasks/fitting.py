"""Trainer.fit with the data failures of a long run turned into a checkpoint and one line.

A sample that cannot be read (dataset.bad_samples=error, or more than max_bad_samples under skip) or a DataLoader
worker that dies (killed for memory, a crash in a reader library) reaches the main process as a traceback from
inside torch's worker machinery. Here the checkpoint of the last step trained is written first (one process:
under DDP the other ranks are not there to take part, and the epoch's checkpoint is the one to continue from),
and the run stops with the reader's own message, what was saved, and how to continue.

Lightning's prefetching fetches the next batch before the current one is trained, so the failing fetch leaves
the loop at the batches already trained: resume=auto continues with the first batch that was not.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ssl_lab.errors import DataError

WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (exited unexpectedly|is killed by signal)")


def one_line(err: BaseException) -> str:
    """The reader's message without torch's wrapper ("Caught DataError in DataLoader worker process 0. Original
    Traceback ...": the last line is the error itself)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = re.sub(r"^[\w.]*(Error|Exception): ", "", text)
    return " ".join(text.split())


def worker_died(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and bool(WORKER_DIED.search(str(err)))


def is_data_failure(err: BaseException) -> bool:
    return isinstance(err, DataError) or worker_died(err) or (isinstance(err, OSError) and
                                                              "DataLoader worker" in str(err))


class CheckpointOnDataFailure(pl.Callback):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.trained = False  # a step was trained in this process: there is something to save
        self.saved_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.trained = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.trained and trainer.world_size == 1 and is_data_failure(exception):
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = int(trainer.global_step)


def bad_sample_counts(datamodule: Any) -> dict[str, Any] | None:
    """What dataset.bad_samples did (ssl_lab.data.bad_samples); None for a data module of the user's own."""
    counts = getattr(datamodule, "bad_sample_counts", None)
    return counts() if callable(counts) else None


def fit(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None,
        saver: CheckpointOnDataFailure) -> None:
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (DataError, OSError, RuntimeError) as err:
        if not is_data_failure(err):
            raise
        if worker_died(err):
            found = WORKER_DIED.search(str(err))
            what = (f"a DataLoader worker process died (pid {found.group(1).strip()}, "
                    f"{'killed by a signal' if 'signal' in found.group(2) else 'exited unexpectedly'}; most often "
                    "the system ran out of memory): lower dataset.num_workers or dataset.batch_size "
                    "(dataset.num_workers=0 reads in the main process, where a reader's own error shows)")
        else:
            what = one_line(err).rstrip(".")
            if getattr(datamodule, "bad_samples", "skip") == "error":
                what += " (dataset.bad_samples=skip would drop such samples and count them)"
        if not saver.trained:
            raise DataError(what) from None
        run_dir = saver.path.parent.parent
        if saver.saved_step is not None:
            then = (f"The checkpoint of step {saver.saved_step} was saved first ({saver.path}): fix the data, then "
                    f"continue with run_dir={run_dir} resume=auto (or resume=force dataset.bad_samples=skip)")
        else:
            then = (f"Under DDP no checkpoint is written mid-epoch: continue from the last epoch's ({saver.path}) "
                    f"with run_dir={run_dir} resume=auto once the data is fixed")
        raise DataError(f"{what}. {then}.") from None
