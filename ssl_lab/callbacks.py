"""Lightning callbacks that watch a run: steady-state throughput, a progress bar that costs no sync, backbone export."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities import rank_zero_only

from ssl_lab.artifacts import save_backbone
from ssl_lab.hydra_callbacks import JOBS_ENV

log = logging.getLogger("ssl_lab")


def job_label() -> str:
    """`job 3/8` inside a Hydra multirun (1-based; `/N` when the sweep's size is known), else ''."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    hydra = HydraConfig.get()
    if str(hydra.mode) != "RunMode.MULTIRUN":
        return ""
    total = os.environ.get(JOBS_ENV)
    return f"job {int(hydra.job.num) + 1}" + (f"/{total}" if total else "")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def planned_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps this fit will take from where it starts (a resumed run: what is left)."""
    total = int(trainer.estimated_stepping_batches)
    return max(total - int(trainer.global_step), 0)


class RunPlan(pl.Callback):
    """The line a run starts with (what runs where, and how many steps), then, once a few steps are timed, the
    estimated time of the whole run: a user knows in seconds whether to wait for it or to change it.

    The clock is read after a CUDA sync twice: at the first batch end and at the logging step that gives the
    estimate, where values are read anyway (no sync in between: tests/test_gpu.py)."""

    TIMED_FROM, TIMED_TO = 1, 4  # the first step pays for start-up; steps 2-4 (or to the next logging step) the rate

    def __init__(self, what: str) -> None:
        self.what = what
        self._t0: float | None = None
        self._planned = 0
        self._seen = 0
        self.estimate_s: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._planned = planned_steps(trainer)
        per_epoch = trainer.num_training_batches
        epochs = trainer.max_epochs if trainer.max_steps in (-1, None) else None
        shape = f" ({epochs} epochs x {per_epoch} batches)" if epochs and per_epoch != float("inf") else ""
        device = trainer.strategy.root_device
        devices = f" x{trainer.world_size}" if trainer.world_size > 1 else ""
        job = job_label()
        later = (f" | time estimate at the first logging step from step {self.TIMED_TO}"
                 if self._planned > self.TIMED_TO else "")
        log.info("%s%s | %s%s %s | %d steps planned%s%s", f"{job} | " if job else "", self.what, device.type,
                 devices, trainer.precision, self._planned, shape, later)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._seen == self.TIMED_FROM:
            self._t0 = SpeedMeter._now(trainer)  # the first batch end, where SpeedMeter syncs anyway
        elif (self._seen >= self.TIMED_TO and self._t0 is not None and self.estimate_s is None
              and reads_values_now(trainer)):  # a logging step: the clock's CUDA sync costs no extra stall
            steps = self._seen - self.TIMED_FROM
            per_step = (SpeedMeter._now(trainer) - self._t0) / steps
            self.estimate_s = per_step * self._planned
            log.info("estimated time: %s for %d steps (%.2f s/step over steps %d-%d; the bar's ETA follows the "
                     "run)", duration(self.estimate_s), self._planned, per_step, self.TIMED_FROM + 1, self._seen)


def reads_values_now(trainer: pl.Trainer) -> bool:
    """Whether this batch end already reads device values on the host: a logging step (Lightning turns the logged
    values into numbers) or an epoch's last batch. Watchers that need a value read it here, not every step.
    Call it in ``on_train_batch_end``."""
    return bool(trainer._logger_connector.should_update_logs or trainer.is_last_batch)


class SpeedMeter(pl.Callback):
    """Images per second from the end of the first batch to the end of the last, loading included.

    The first batch pays for start-up (workers, compilation), so it is left out. Lightning's ThroughputMonitor logs
    windowed rates; the run summary needs one steady-state number.

    The clock is read, after a CUDA sync, only on steps whose metrics are logged and on the last batch of an epoch:
    a sync every step would stall the host until the GPU finished, so it could not queue the next step's kernels.
    Images are counted every batch from the batch's shape, which needs no sync.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None
        self._counted = 0

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = self._now(trainer)
            return
        self._counted += int(batch["x"].shape[0]) * trainer.world_size
        if not reads_values_now(trainer):
            return
        self.seconds = self._now(trainer) - self._t0
        self.images = self._counted
        pl_module.log("train/images_per_s", self.images_per_s, on_step=True, on_epoch=False, rank_zero_only=True)

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, showing the training loss (and accuracy) it reads only when it redraws.

    Why: a metric logged with ``prog_bar=True`` is turned into a Python number after every batch, whether the bar
    redraws or not: one host sync per step, which on a GPU stops the host from queueing the next step. The modules
    log without ``prog_bar`` and this bar reads the values itself, ``refresh_rate`` steps apart.
    """

    SHOWN = {"train/loss": "loss", "train/acc": "acc", "val/acc": "val_acc"}  # logged name -> label on the bar

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._run_start: tuple[float, int] | None = None  # (clock, global step) at the end of the first batch
        self._run_total = 0

    def run_eta(self, trainer: pl.Trainer) -> str | None:
        """Time left for the whole run (every epoch, not only this one) at the rate since the first batch."""
        if self._run_start is None:
            return None
        clock, step0 = self._run_start
        done = int(trainer.global_step) - step0
        if done < 1:
            return None
        left = max(self._run_total - int(trainer.global_step), 0)
        return duration((time.perf_counter() - clock) / done * left)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._run_start is None:
            self._run_start = (time.perf_counter(), int(trainer.global_step))
            self._run_total = int(trainer.estimated_stepping_batches)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed mid-epoch gets no on_train_epoch_start for that epoch: Lightning's bar would show it as
        "Training n/?" and count the batches trained before the stop as done in this process (an ETA far too
        short). The bar starts that epoch where it was stopped, with its total."""
        super().on_train_start(trainer, pl_module)
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        total = self.total_train_batches
        if 0 < done < total and self.train_progress_bar is not None:
            bar = self.train_progress_bar
            bar.reset(total=convert_inf(total))
            bar.initial = bar.n = done  # tqdm's rate (and so the ETA) counts from `initial`
            bar.set_description(self._label(trainer))
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.train_progress_bar is not None:
            self.train_progress_bar.initial = 0  # before Lightning's reset redraws it: no negative rate
        super().on_train_epoch_start(trainer, *args)
        if self.train_progress_bar is not None:
            self.train_progress_bar.set_description(self._label(trainer))

    @staticmethod
    def _label(trainer: pl.Trainer) -> str:
        job = job_label()
        return f"{job + ' ' if job else ''}Epoch {trainer.current_epoch}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for key, label in self.SHOWN.items():
            value = metrics.get(f"{key}_step", metrics.get(key))
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[label] = f"{float(value):.4g}"
        eta = self.run_eta(trainer)
        if eta is not None:
            items["run_eta"] = eta
        return items


class BackboneExport(pl.Callback):
    """Writes `backbone.pt` (encoder weights + metadata) when training ends, so downstream tasks need no method code."""

    def __init__(self, path: str | Path, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.meta = dict(meta)
        self.written = False

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = pl_module.backbone
        meta = {**backbone.meta(), **self.meta, "global_step": int(trainer.global_step),
                "epochs": int(trainer.current_epoch)}
        save_backbone(self.path, backbone, meta)
        self.written = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed from the checkpoint of its last step (killed while exporting, say) has nothing left to train,
        and Lightning then skips on_train_end: the export is written here."""
        if not self.written:
            self.on_train_end(trainer, pl_module)
