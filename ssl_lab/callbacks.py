"""Lightning callbacks that watch a run: steady-state throughput, a progress bar that costs no sync, backbone export."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities import rank_zero_only

from ssl_lab.artifacts import save_backbone


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
            bar.set_description(f"Epoch {trainer.current_epoch}")
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.train_progress_bar is not None:
            self.train_progress_bar.initial = 0  # before Lightning's reset redraws it: no negative rate
        super().on_train_epoch_start(trainer, *args)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for key, label in self.SHOWN.items():
            value = metrics.get(f"{key}_step", metrics.get(key))
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[label] = f"{float(value):.4g}"
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
