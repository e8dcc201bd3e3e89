"""Plumbing every SSL method shares: views made on the device, parameter groups, schedule, logging.

A method subclass only builds its heads and implements `loss(views) -> (loss, terms)`. Methods that need other
views (one view, multi-crop) override `make_views`; methods that need more randomness in a step (MAE's masks, a
pretext task's labels) draw it from `self.step_rng`, so a resumed run repeats it exactly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from ssl_lab.augment import Augment, step_generator
from ssl_lab.checkpoint_io import CheckpointHeader
from ssl_lab.errors import ConfigError
from ssl_lab.optim import SCALING_KEYS, build_optimizer, build_scheduler, param_groups


class SSLMethod(CheckpointHeader, pl.LightningModule, ABC):
    """Base LightningModule for self-supervised pretraining on unlabelled batches {"x": [B, C, H, W]}."""

    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any], seed: int = 0):
        super().__init__()
        self.method_name = name
        self.backbone = backbone
        self.augment = augment
        self.optim_cfg = dict(optim)
        self.seed = int(seed)
        self.step_rng: torch.Generator | None = None
        if type(self).make_views is SSLMethod.make_views and augment.n_views != 2:
            raise ConfigError(f"method={name} compares two views of each image but augment.n_views="
                              f"{augment.n_views}; set augment.n_views=2.")

    def refuse_augment_ops(self, ops: set[str] | frozenset[str], why: str) -> None:
        """ConfigError if the preset applies any of ``ops``: e.g. random 90-degree turns would make rotation
        prediction unlearnable. Refused, not dropped: the saved config must say what the views really were."""
        clash = [op for op in self.augment.active if op in ops]
        if clash:
            drops = " ".join(f"~augment.ops.{op}" for op in clash)
            raise ConfigError(f"method={self.method_name} cannot use augment={self.augment.name} with "
                              f"{', '.join(clash)}: {why}. Use augment=minimal, or drop them with {drops}.")

    def make_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The inputs of one step, made on the device: by default the preset's views."""
        return self.augment(x, generator=generator)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._trainer is not None and self.trainer.training:
            x = batch["x"]
            self.step_rng = step_generator(self.seed, self.global_step, self.global_rank, x.device)
            batch["views"] = self.make_views(x, self.step_rng)
        return batch

    @abstractmethod
    def loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's objective on the views, and its named terms for logging."""

    def chance_loss(self, batch_size: int) -> float | None:
        """The loss of an uninformative model (all views equally similar, uniform class scores) for ``batch_size``
        samples per view as the loss sees them (the global batch where it gathers across ranks), or None where no
        such constant exists. ssl_lab.guards warns when the loss stays there: the method is not learning."""
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, terms = self.loss(batch["views"])
        # Kept (detached, on the device) for ssl_lab.guards, which checks them before the optimizer step.
        self.last_terms = {"loss": loss.detach(), **{k: torch.as_tensor(v).detach() for k, v in terms.items()}}
        n = batch["x"].shape[0]
        # sync_dist: under DDP a per-sample loss (BYOL, MAE, ...) differs by rank; the log shows the global mean.
        # no prog_bar=True: Lightning would read it every step (a host sync); StepProgressBar shows it
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        for key, value in terms.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def configure_optimizers(self):
        cfg = dict(self.optim_cfg)
        # The pretrain task applies optim.lr_scaling with scale_lr (it knows the world size) and drops its keys.
        if cfg.get("lr_scaling", "none") not in (None, "none"):
            raise ConfigError("optim.lr_scaling needs the global batch size: pass the optimizer config through "
                              "ssl_lab.optim.scale_lr (the pretrain task does) before fitting.")
        for key in SCALING_KEYS:
            cfg.pop(key, None)
        schedule = cfg.pop("schedule", "cosine")
        warmup_epochs = float(cfg.pop("warmup_epochs", 0.0))
        min_lr_ratio = float(cfg.pop("min_lr_ratio", 0.0))
        name = cfg.pop("name")
        lr = float(cfg.pop("lr"))
        weight_decay = float(cfg.pop("weight_decay", 0.0))
        groups = param_groups(self, weight_decay=weight_decay)
        optimizer = build_optimizer(groups, name=name, lr=lr, weight_decay=weight_decay, **cfg)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = int(round(warmup_epochs * total / epochs))
        if warmup >= total and warmup > 0:
            raise ConfigError(
                f"optim.warmup_epochs={warmup_epochs} covers the whole run ({total} steps in {epochs} epochs); "
                "lower optim.warmup_epochs or raise trainer.max_epochs."
            )
        scheduler = build_scheduler(optimizer, schedule, total_steps=total, warmup_steps=warmup,
                                    min_lr_ratio=min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
