"""Downstream training with Lightning: fine-tune, joint classification + regression, supervised from scratch (and
a frozen-backbone MLP probe with task=finetune task.freeze_backbone=true task.head=mlp).

The tasks differ only in their config (conf/task/*.yaml): whether the backbone is frozen or pretrained, which
objective (classification, joint classification + regression, regression), the head, and the two learning rates.
One function runs them all. The weights scored on the test split are those of the best epoch on the val split
(`checkpoints/best.ckpt`; `task.early_stopping=<patience>` stops when val stops improving), never the last epoch's
by default, and the test split is scored once, after training.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ssl_lab.checkpoint_io import prepare_resume, read_checkpoint
from ssl_lab.downstream import Downstream
from ssl_lab.errors import ConfigError
from ssl_lab.preemption import PreemptionCheckpoint, clear_marker
from ssl_lab.speed import apply_speed_options, optimizer_impl
from ssl_lab.tasks.common import (LAST_CKPT, build_loggers, config_hash, last_checkpoint, resolve_precision,
                                  targets, trainer_kwargs)
from ssl_lab.tasks.fitting import CheckpointOnDataFailure, bad_sample_counts, fit
from ssl_lab.tasks.labelled_run import (base_summary, export_model, finish_labelled_run, save_run_config,
                                        start_labelled_run)
from ssl_lab.tasks.lr_range import range_test
from ssl_lab.tasks.outputs import collect

log = logging.getLogger(__name__)


def selection_metric(objective: str) -> tuple[str, str]:
    """What "best on val" means: accuracy for a classifier, the total loss once regression is part of it."""
    return ("val/acc", "max") if objective == "classification" else ("val/loss", "min")


def selection_callbacks(cfg: DictConfig, run_dir: Path, has_val: bool
                        ) -> tuple[ModelCheckpoint | None, list[pl.Callback]]:
    """best.ckpt at the best val epoch, and early stopping when task.early_stopping gives a patience."""
    patience = cfg.task.get("early_stopping")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ConfigError(f"task.early_stopping={patience!r} must be null (train every epoch) or a patience in "
                          "epochs >= 1.")
    if not has_val:
        if patience is not None:
            raise ConfigError(f"task.early_stopping={patience} watches the val split, which is empty; set "
                              "dataset.val_fraction > 0 or task.early_stopping=null.")
        log.warning("the val split is empty: the test split is scored with the last epoch's weights (set "
                    "dataset.val_fraction > 0 to score the best epoch's)")
        return None, []
    monitor, mode = selection_metric(cfg.task.objective)
    # weights only: the best epoch is read back for the test split, never trained on from (last.ckpt resumes), so
    # its optimizer moments would only triple the file (0.5 GB for a VGG-11 with the conv_mlp head)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, save_last=False, enable_version_counter=False,
                           auto_insert_metric_name=False, save_weights_only=True)
    stop = [EarlyStopping(monitor=monitor, mode=mode, patience=patience)] if patience is not None else []
    return best, stop


def train_heads(cfg: DictConfig) -> dict[str, Any]:
    task = cfg.task
    if cfg.get("pretrained") not in (None, "random") and task.name == "supervised":
        raise ConfigError("task=supervised trains from random initialisation; drop pretrained=... "
                          "(or use task=finetune to start from it).")
    run = start_labelled_run(cfg, require_pretrained=task.name != "supervised")
    datamodule, source, run_dir, ckpt_path = run.datamodule, run.source, run.run_dir, run.ckpt_path
    model = Downstream(
        backbone=source.backbone, augment=run.augment, objective=task.objective,
        num_classes=datamodule.num_classes, target_names=datamodule.target_names,
        optim=OmegaConf.to_container(cfg.optim, resolve=True), freeze_backbone=task.freeze_backbone,
        head=task.head, hidden_dims=list(task.hidden_dims), dropout=task.dropout, backbone_lr=task.backbone_lr,
        head_lr=task.head_lr, regression_weight=task.regression_weight, target_mean=datamodule.target_mean,
        target_std=datamodule.target_std, train_augment=task.train_augment, seed=cfg.seed,
    )

    fast = apply_speed_options(model, cfg.accelerator)  # channels_last and torch.compile, as in pretraining
    if task.head == "conv_mlp" and "backbone" in fast["compiled"]:
        log.warning("accelerator.compile: the conv_mlp head reads %s.forward_features, which runs eager; only "
                    "VGG backbones compile on that path", cfg.backbone.name)
    if ckpt_path:  # checked before anything is written
        prepare_resume(ckpt_path, model, datamodule)

    best, stop = selection_callbacks(cfg, run_dir, has_val=len(datamodule.val_set) > 0)
    precision = resolve_precision(cfg.accelerator.precision)
    loggers = build_loggers(cfg, run_dir)  # before the first write: a refused W&B login leaves nothing behind
    saved = save_run_config(run, precision)
    saver = CheckpointOnDataFailure(run_dir / LAST_CKPT)
    callbacks = [last_checkpoint(run_dir), saver,
                 PreemptionCheckpoint(run_dir / "checkpoints", config_hash(cfg)),
                 *([best] if best is not None else []), *stop,
                 *(instantiate(node) for node in targets(cfg.get("callbacks")))]
    for logger in loggers:
        logger.log_hyperparams(saved)
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False,
                         **trainer_kwargs(cfg, precision, callbacks=callbacks, max_epochs=task.max_epochs))
    lr_find = range_test(trainer, model, datamodule, run_dir, task, ckpt_path)  # task.lr_find: sets the lrs
    fit(trainer, model, datamodule, ckpt_path, saver)  # a bad sample or dead worker: checkpoint, then one line
    if trainer.is_global_zero:
        clear_marker(run_dir / "checkpoints")  # finished: a later start of this run is not a continuation

    summary: dict[str, Any] = {
        **base_summary(run), "epochs": int(trainer.current_epoch),
        "speed": {**fast, "optimizer": optimizer_impl(trainer.optimizers[0] if trainer.optimizers else None)},
        "selected": _restore_best(model, best), "bad_samples": bad_sample_counts(datamodule),
        **({"lr_find": lr_find} if lr_find else {}),  # the range test's suggestion and the lrs it applied
    }
    if not trainer.is_global_zero:
        return summary
    preds = collect(model, datamodule.test_dataloader(), trainer.strategy.root_device)
    head_spec = {"kind": task.head, "in_features": int(source.backbone.num_features), "n_out": model.n_out,
                 "hidden_dims": list(task.hidden_dims) if task.head == "mlp" else [], "dropout": float(task.dropout)}
    export_model(run, model.head, head_spec, {"selected": summary["selected"]})
    config_summary = {"task": task.name, "objective": task.objective, "backbone": cfg.backbone.name,
                      "pretrained": source.pretrained or "random init", "dataset": cfg.dataset.name,
                      "head": task.head, "backbone_lr": model.backbone_lr, "head_lr": model.head_lr,
                      "freeze_backbone": task.freeze_backbone, "epochs": task.max_epochs,
                      "early_stopping": task.get("early_stopping"), "label_fraction": summary["label_fraction"],
                      "selected": summary["selected"]}
    result = finish_labelled_run(run, summary, preds, config_summary, loggers,
                                 extra_plots=[run_dir / lr_find["plot"]] if lr_find else ())
    drop_last_checkpoint(run_dir, keep=bool(cfg.get("keep_last", False)))
    return result


def drop_last_checkpoint(run_dir: Path, keep: bool) -> None:
    """A finished downstream run needs its best checkpoint and model.pt, not the last epoch's full training state
    (weights + optimizer moments: 0.5 GB for a VGG-11): removed at a clean end unless keep_last=true."""
    last = run_dir / LAST_CKPT
    if keep or not last.is_file():
        return
    size = last.stat().st_size
    last.unlink()
    log.info("removed %s (%.0f MB) at the clean end: model.pt and checkpoints/best.ckpt hold the result; "
             "keep_last=true keeps it (resume=extend needs it)", last, size / 2**20)


def _restore_best(model: pl.LightningModule, best: ModelCheckpoint | None) -> dict[str, Any]:
    """Load the best-on-val weights into ``model``; what was selected, for the summary."""
    if best is None or not best.best_model_path:
        return {"rule": "last epoch", "reason": "no val split" if best is None else "no val epoch completed"}
    ckpt = read_checkpoint(best.best_model_path)
    model.load_state_dict(ckpt["state_dict"])
    return {"rule": f"best {best.monitor} ({best.mode})", "epoch": int(ckpt.get("epoch", -1)),
            "value": float(best.best_model_score), "checkpoint": str(best.best_model_path)}
