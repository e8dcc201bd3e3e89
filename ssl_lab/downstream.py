"""Supervised training on top of a backbone: linear probe, fine-tune, joint classification + regression, scratch.

One module serves every downstream task; the task's config decides whether the backbone is frozen, which heads
exist, and the learning rate of each parameter group (e.g. backbone 1e-5, heads 1e-4).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.augment import Augment, step_generator
from ssl_lab.checkpoint_io import CheckpointHeader
from ssl_lab.errors import ConfigError
from ssl_lab.heads import conv_map_mlp, mlp
from ssl_lab.optim import SCALING_KEYS, build_optimizer, build_scheduler, param_groups

HEADS = ("linear", "mlp", "conv_mlp")
OBJECTIVES = ("classification", "joint", "regression")


class Downstream(CheckpointHeader, pl.LightningModule):
    def __init__(self, backbone: nn.Module, augment: Augment, objective: str, num_classes: int | None,
                 target_names: Sequence[str], optim: Mapping[str, Any], freeze_backbone: bool = False,
                 head: str = "linear", hidden_dims: Sequence[int] = (512,), dropout: float = 0.0,
                 backbone_lr: float = 1e-4, head_lr: float = 1e-3, regression_weight: float = 1.0,
                 target_mean: torch.Tensor | None = None, target_std: torch.Tensor | None = None,
                 train_augment: bool = True, seed: int = 0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ConfigError(f"task.objective={objective!r}; choose one of: {', '.join(OBJECTIVES)}.")
        if head not in HEADS:
            raise ConfigError(f"task.head={head!r}; choose one of: {', '.join(HEADS)}.")
        self.objective, self.head_kind = objective, head
        self.backbone, self.augment = backbone, augment
        self.freeze_backbone, self.train_augment, self.seed = freeze_backbone, train_augment, int(seed)
        self.optim_cfg = dict(optim)
        self.backbone_lr, self.head_lr, self.regression_weight = backbone_lr, head_lr, regression_weight
        self.tied_lr_ratio: float | None = None  # set during an lr range test (ssl_lab.tasks.lr_range)
        self.n_classes = int(num_classes or 0) if objective in ("classification", "joint") else 0
        self.target_names = list(target_names) if objective in ("joint", "regression") else []
        self.n_out = n_out = self.n_classes + len(self.target_names)
        if n_out == 0:
            raise ConfigError(f"task.objective={objective} has nothing to predict on this dataset.")
        features = backbone.num_features
        if dropout and head != "conv_mlp":
            raise ConfigError(f"task.dropout={dropout} applies to head=conv_mlp only; set task.dropout=0 for "
                              f"head={head}.")
        if head == "conv_mlp":
            if backbone.name.startswith("vit"):
                raise ConfigError("task.head=conv_mlp needs a convolutional feature map; use head=mlp with a ViT.")
            self.head = conv_map_mlp(features, n_out, dropout=dropout)
        else:
            self.head = mlp(features, list(hidden_dims) if head == "mlp" else [], n_out)
        if self.target_names:
            t = len(self.target_names)
            self.register_buffer("target_mean", torch.zeros(t) if target_mean is None else target_mean.float())
            self.register_buffer("target_std", torch.ones(t) if target_std is None else target_std.float())
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics: a true linear probe
        return self

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Class logits and regression predictions in standardised units."""
        if self.head_kind == "conv_mlp":
            out = self.head(self.backbone.forward_features(x))
        else:
            out = self.head(self.backbone(x))
        logits = out[:, : self.n_classes] if self.n_classes else None
        reg = out[:, self.n_classes:] if self.target_names else None
        return logits, reg

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Lightning's lr range test gives every param group the lr it sweeps; while one runs (tied_lr_ratio set)
        the backbone's groups are put back at tied_lr_ratio x the head's, so the test sweeps the head lr with the
        run's backbone / head ratio."""
        if self.tied_lr_ratio is None:
            return
        backbone = {id(p) for p in self.backbone.parameters()}
        groups = self.trainer.optimizers[0].param_groups
        head_lr = next(g["lr"] for g in groups if id(g["params"][0]) not in backbone)  # the head's groups first
        for group in groups:
            if id(group["params"][0]) in backbone:
                group["lr"] = head_lr * self.tied_lr_ratio

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        x = batch["x"]
        if self._trainer is not None and self.trainer.training and self.train_augment:
            gen = step_generator(self.seed, self.global_step, self.global_rank, x.device)
            batch["view"] = self.augment(x, generator=gen)[0]
        else:
            batch["view"] = self.augment.eval_view(x)
        return batch

    def _loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits, reg = self(batch["view"])
        n = batch["x"].shape[0]
        loss = torch.zeros((), device=batch["x"].device)
        if logits is not None:
            ce = F.cross_entropy(logits.float(), batch["y"])
            acc = (logits.argmax(1) == batch["y"]).float().mean()
            self.log(f"{stage}/ce", ce, batch_size=n)
            self.log(f"{stage}/acc", acc, batch_size=n)
            loss = loss + ce
        if reg is not None:
            z = (batch["targets"] - self.target_mean) / self.target_std
            mse = F.mse_loss(reg.float(), z)
            self.log(f"{stage}/mse_std", mse, batch_size=n)
            loss = loss + self.regression_weight * mse
        self.log(f"{stage}/loss", loss, batch_size=n)
        return loss, logits, reg

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._loss(batch, "val")

    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        """Predictions on one batch in original units (probabilities; targets de-standardised)."""
        logits, reg = self(batch["view"])
        out: dict[str, torch.Tensor] = {}
        if logits is not None:
            out["probs"] = logits.float().softmax(1)
            out["y"] = batch["y"]
        if reg is not None:
            out["pred"] = reg.float() * self.target_std + self.target_mean
            out["targets"] = batch["targets"]
        return out

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.optim_cfg)
        wd = float(cfg.pop("weight_decay", 0.0))
        groups = param_groups(self.head, weight_decay=wd, lr=self.head_lr, name="head")
        if not self.freeze_backbone:
            groups += param_groups(self.backbone, weight_decay=wd, lr=self.backbone_lr, name="backbone")
        for key in ("lr", "schedule", "warmup_epochs", "min_lr_ratio", *SCALING_KEYS):
            cfg.pop(key, None)
        name = cfg.pop("name")
        optimizer = build_optimizer(groups, name=name, lr=self.head_lr, weight_decay=wd, **cfg)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = self.optim_cfg.get("schedule", "cosine")
        scheduler = build_scheduler(optimizer, schedule, total_steps=total, warmup_steps=0,
                                    min_lr_ratio=float(self.optim_cfg.get("min_lr_ratio", 0.0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
