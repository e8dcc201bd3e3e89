"""Lightning callbacks that watch a run: steady-state throughput and backbone export."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from ssl_lab.artifacts import save_backbone


class SpeedMeter(pl.Callback):
    """Images per second from the end of the first batch to the end of the last, loading included.

    The first batch pays for start-up (workers, compilation), so it is left out. Lightning's ThroughputMonitor logs
    windowed rates; the run summary needs one steady-state number.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
            return
        self.images += int(batch["x"].shape[0]) * trainer.world_size
        self.seconds = now - self._t0
        pl_module.log("train/images_per_s", self.images_per_s, on_step=True, on_epoch=False, rank_zero_only=True)


class BackboneExport(pl.Callback):
    """Writes `backbone.pt` (encoder weights + metadata) when training ends, so downstream tasks need no method code."""

    def __init__(self, path: str | Path, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.meta = dict(meta)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = pl_module.backbone
        meta = {**backbone.meta(), **self.meta, "global_step": int(trainer.global_step),
                "epochs": int(trainer.current_epoch)}
        save_backbone(self.path, backbone, meta)
