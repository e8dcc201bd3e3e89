"""Downstream training of heads on a backbone: linear probe, fine-tune, joint, and supervised-from-scratch.

The four tasks differ only in their config (conf/task/*.yaml): whether the backbone is frozen or pretrained,
which objective (classification, joint classification + regression, regression), the head, and the two learning
rates. One function runs them all.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_lab.checkpoint_io import prepare_resume
from ssl_lab.config import validate
from ssl_lab.downstream import Downstream
from ssl_lab.errors import ConfigError
from ssl_lab.loggers import publish
from ssl_lab.preemption import PreemptionCheckpoint, clear_marker
from ssl_lab.speed import apply_speed_options, optimizer_impl
from ssl_lab.tasks.backbone_source import load_backbone
from ssl_lab.tasks.common import (build_loggers, claim_run_dir, config_hash, labelled_datamodule, last_checkpoint,
                                  one_console, resolve_precision, resolve_run_dir, save_config, targets,
                                  trainer_kwargs)
from ssl_lab.tasks.outputs import collect, test_metrics, write_outputs

log = logging.getLogger(__name__)


def train_heads(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    one_console()
    task = cfg.task
    run_dir = resolve_run_dir(cfg)
    ckpt_path = claim_run_dir(run_dir, cfg.get("resume"), config_hash(cfg))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = labelled_datamodule(cfg)
    if task.objective in ("joint", "regression") and not datamodule.target_names:
        raise ConfigError(f"task={task.name} with objective={task.objective} needs regression targets, but dataset "
                          f"{cfg.dataset.name} has none; set dataset.target_keys=[...] or use "
                          "objective=classification.")
    if cfg.get("pretrained") not in (None, "random") and task.name == "supervised":
        raise ConfigError("task=supervised trains from random initialisation; drop pretrained=... "
                          "(or use task=finetune to start from it).")
    source = load_backbone(cfg, datamodule, require_pretrained=task.name != "supervised")
    augment = instantiate(cfg.augment, size=source.view_size, n_views=1, _convert_="all")
    validate(cfg, datamodule, augment, ssl=False)
    augment.set_stats(source.mean, source.std)
    model = Downstream(
        backbone=source.backbone, augment=augment, objective=task.objective, num_classes=datamodule.num_classes,
        target_names=datamodule.target_names, optim=OmegaConf.to_container(cfg.optim, resolve=True),
        freeze_backbone=task.freeze_backbone, head=task.head, hidden_dims=list(task.hidden_dims),
        dropout=task.dropout, backbone_lr=task.backbone_lr, head_lr=task.head_lr,
        regression_weight=task.regression_weight, target_mean=datamodule.target_mean,
        target_std=datamodule.target_std, train_augment=task.train_augment, seed=cfg.seed,
    )

    fast = apply_speed_options(model, cfg.accelerator)  # channels_last and torch.compile, as in pretraining
    if task.head == "conv_mlp" and "backbone" in fast["compiled"]:
        log.warning("accelerator.compile: the conv_mlp head reads %s.forward_features, which runs eager; only "
                    "VGG backbones compile on that path", cfg.backbone.name)
    if ckpt_path:  # checked before anything is written
        prepare_resume(ckpt_path, model, datamodule)

    precision = resolve_precision(cfg.accelerator.precision)
    saved = save_config(cfg, run_dir, precision)
    callbacks = [last_checkpoint(run_dir),
                 PreemptionCheckpoint(run_dir / "checkpoints", config_hash(cfg)),
                 *(instantiate(node) for node in targets(cfg.get("callbacks")))]
    loggers = build_loggers(cfg, run_dir)
    for logger in loggers:
        logger.log_hyperparams(saved)
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False,
                         **trainer_kwargs(cfg, precision, callbacks=callbacks, max_epochs=task.max_epochs))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        clear_marker(run_dir / "checkpoints")  # finished: a later start of this run is not a continuation

    summary: dict[str, Any] = {
        "task": task.name, "objective": task.objective, "method": source.meta.get("method", "scratch"),
        "backbone": cfg.backbone.name, "dataset": cfg.dataset.name, "pretrained": source.pretrained,
        "label_fraction": datamodule.summary().get("label_fraction"), "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.time() - started, 2), "run_dir": str(run_dir),
        "data_n_test": datamodule.summary().get("n_test"),
        "speed": {**fast, "optimizer": optimizer_impl(trainer.optimizers[0] if trainer.optimizers else None)},
    }
    if trainer.is_global_zero:
        preds = collect(model, datamodule.test_dataloader(), trainer.strategy.root_device)
        summary["test"] = test_metrics(preds, datamodule.class_names, datamodule.target_names)
        config_summary = {"task": task.name, "objective": task.objective, "backbone": cfg.backbone.name,
                          "pretrained": source.pretrained or "random init", "dataset": cfg.dataset.name,
                          "head": task.head, "backbone_lr": task.backbone_lr, "head_lr": task.head_lr,
                          "freeze_backbone": task.freeze_backbone, "epochs": task.max_epochs,
                          "label_fraction": summary["label_fraction"]}
        plots = write_outputs(run_dir, f"{task.name}: {cfg.backbone.name} on {cfg.dataset.name}", config_summary,
                              summary, preds, datamodule.class_names, datamodule.target_names)
        publish(loggers, plots, summary)
        log.info("%s done: %s", task.name, run_dir)
    return summary
