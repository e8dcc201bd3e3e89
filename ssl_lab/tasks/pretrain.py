"""Self-supervised pretraining: the method learns from unlabelled images and exports its backbone."""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_lab import __version__
from ssl_lab.artifacts import write_json
from ssl_lab.callbacks import BackboneExport, SpeedMeter
from ssl_lab.checkpoint_io import prepare_resume
from ssl_lab.config import validate, view_size
from ssl_lab.data.splits import write_splits
from ssl_lab.data.summary_table import data_table
from ssl_lab.evaluation.plots import plot_curves
from ssl_lab.evaluation.report import write_report
from ssl_lab.guards import build_guard
from ssl_lab.inspect import startup_check
from ssl_lab.optim import scale_lr
from ssl_lab.preemption import PreemptionCheckpoint, clear_marker
from ssl_lab.segments import read_segments
from ssl_lab.speed import apply_speed_options, optimizer_impl
from ssl_lab.tasks.common import (
    LAST_CKPT,
    auto_choices,
    build_cfg_backbone,
    build_loggers,
    claim_run_dir,
    config_hash,
    last_checkpoint,
    one_console,
    resolve_precision,
    resolve_run_dir,
    save_config,
    targets,
    trainer_kwargs,
)
from ssl_lab.tasks.fitting import CheckpointOnDataFailure, bad_sample_counts, fit

log = logging.getLogger(__name__)


def build_pretraining(cfg: DictConfig) -> tuple[Any, pl.LightningModule, int, dict[str, Any]]:
    """Seeded DataModule (set up) and method, checked and with the speed options applied: what a pretraining run
    trains, shared with benchmarks/throughput.py so the benchmark measures the real thing.

    Returns (datamodule, model, view size, record of the speed options used)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("data:\n%s", data_table(datamodule.summary()))  # the whole summary goes to summary.json
    startup_check(datamodule)  # a bounded look at the data; logs NaN/Inf, constant channels, class balance
    size = view_size(cfg, datamodule.image_shape)
    augment = instantiate(cfg.augment, size=size, _convert_="all")
    validate(cfg, datamodule, augment)
    augment.set_stats(datamodule.mean, datamodule.std)
    backbone = build_cfg_backbone(cfg, size)
    model = instantiate(cfg.method, backbone=backbone, augment=augment,
                        optim=OmegaConf.to_container(cfg.optim, resolve=True))
    return datamodule, model, size, apply_speed_options(model, cfg.accelerator)  # channels_last, torch.compile


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Exports `backbone.pt` and `summary.json` into the run directory and returns the summary."""
    started = time.time()
    one_console()
    run_dir = resolve_run_dir(cfg)
    ckpt_path = claim_run_dir(run_dir, cfg.get("resume"), config_hash(cfg))
    datamodule, model, size, fast = build_pretraining(cfg)
    if ckpt_path:  # checked before anything is written
        prepare_resume(ckpt_path, model, datamodule)

    precision = resolve_precision(cfg.accelerator.precision)
    meta = {"method": cfg.method.name, "dataset": cfg.dataset.name, "norm": datamodule.norm_stats(),
            "config_hash": config_hash(cfg), "ssl_lab_version": __version__, "view_size": size}
    speed = SpeedMeter()
    guard = build_guard(cfg.get("guard"))  # NaN/Inf stop or skip, collapse warnings
    saver = CheckpointOnDataFailure(run_dir / LAST_CKPT)
    callbacks = [
        last_checkpoint(run_dir),
        saver,
        PreemptionCheckpoint(run_dir / "checkpoints", meta["config_hash"]),
        speed,
        guard,
        BackboneExport(run_dir / "backbone.pt", meta),
        *(instantiate(node) for node in targets(cfg.get("callbacks"))),
    ]
    loggers = build_loggers(cfg, run_dir)
    # No validation loop: the val split serves the downstream tasks.
    kwargs = trainer_kwargs(cfg, precision, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False, **kwargs)
    # The global batch is known once the Trainer knows the world size; the lr rule and its result are saved.
    global_batch = int(cfg.dataset.batch_size) * trainer.world_size * trainer.accumulate_grad_batches
    model.optim_cfg, scale = scale_lr(model.optim_cfg, global_batch)
    scale["world_size"] = trainer.world_size
    if scale["lr_scaling"] != "none":
        log.info("optim.lr_scaling=%s: lr %g -> %g for a global batch of %d (base %d)", scale["lr_scaling"],
                 scale["base_lr"], scale["lr"], global_batch, scale["base_batch_size"])
    saved = save_config(cfg, run_dir, precision, scale=scale,
                        resolved=auto_choices(cfg, model.backbone))
    write_splits(run_dir, datamodule)  # which images pretraining fits on: downstream runs check their test split
    for logger in loggers:
        logger.log_hyperparams(saved)
    fit(trainer, model, datamodule, ckpt_path, saver)  # a bad sample or dead worker: checkpoint, then one line
    if trainer.is_global_zero:
        clear_marker(run_dir / "checkpoints")  # finished: a later start of this run is not a continuation

    metrics = trainer.callback_metrics
    final_loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
    summary = {
        "task": "pretrain", "method": cfg.method.name, "backbone": cfg.backbone.name, "dataset": cfg.dataset.name,
        "final_loss": None if final_loss is None else float(final_loss),
        "epochs": int(trainer.current_epoch), "global_step": int(trainer.global_step),
        "images_per_s": speed.images_per_s, "wall_time_s": round(time.time() - started, 2),
        "resumed_from": ckpt_path, "precision": precision, "run_dir": str(run_dir),
        "backbone_path": str(run_dir / "backbone.pt"), "scale": scale, "data": datamodule.summary(),
        "bad_samples": bad_sample_counts(datamodule),
    }
    segments = read_segments(run_dir)
    if segments:  # continued with resume=extend or force: what each part ran with and reported
        summary["segments"] = segments
    summary["guard"] = guard.summary()  # skipped NaN/Inf steps and collapse / chance-loss warnings
    summary["speed"] = {**fast, "optimizer": optimizer_impl(trainer.optimizers[0] if trainer.optimizers else None),
                        "cudnn_benchmark": bool(kwargs.get("benchmark"))}
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        logs = sorted(run_dir.glob("logs/version_*/metrics.csv"))
        plots = [plot_curves(logs, run_dir / "curves.png", run_dir.name)] if logs else []
        report = {k: v for k, v in summary.items() if k != "data"}
        write_report(run_dir, f"pretrain: {cfg.method.name}, {cfg.backbone.name} on {cfg.dataset.name}",
                     {"method": cfg.method.name, "backbone": cfg.backbone.name, "dataset": cfg.dataset.name,
                      "augment": cfg.augment.name, "optimizer": cfg.optim.name, "lr": scale["lr"],
                      "batch_size": cfg.dataset.batch_size, "epochs": cfg.trainer.max_epochs, "precision": precision},
                     report, plots)
        log.info("pretraining done: %s", run_dir)
    return summary
