"""task=linear: the frozen-backbone linear probe on features computed once (ssl_lab.evaluation.linear_probe).

Re-running a frozen backbone on every batch of every epoch, as a Lightning fine-tune with the backbone frozen does,
costs the backbone's forward pass epochs times over for features that never change, and trains one learning rate
where the protocol picks the best of several on val. Here the backbone runs once per split; the grid of heads, the
choice on val and the one test score follow in seconds.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from ssl_lab.errors import ConfigError
from ssl_lab.evaluation.knn import knn_ks, knn_report
from ssl_lab.evaluation.linear_probe import SOLVERS, Objective, fit_probe, predict
from ssl_lab.evaluation.plots import plot_epoch_curves
from ssl_lab.speed import apply_speed_options
from ssl_lab.tasks.common import build_loggers, resolve_precision
from ssl_lab.tasks.features import autocast_dtype, probe_device, split_features
from ssl_lab.tasks.labelled_run import (base_summary, export_model, finish_labelled_run, save_run_config,
                                        start_labelled_run)

log = logging.getLogger(__name__)


def _numbers(value: Any, option: str, low: float, allow_low: bool) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    ok = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (v >= low if allow_low else v > low) for v in values)
    if not ok:
        bound = f">= {low}" if allow_low else f"> {low}"
        raise ConfigError(f"task.{option}={value!r} must be a non-empty list of numbers {bound} "
                          f"(e.g. task.{option}=[0.01,0.1]).")
    return [float(v) for v in values]


def check_options(task: DictConfig) -> tuple[list[float], list[float]]:
    """Refuse bad probe options before any feature is computed; the learning rates and weight decays as lists."""
    if task.solver not in SOLVERS:
        raise ConfigError(f"task.solver={task.solver!r}; choose one of: {', '.join(SOLVERS)} (sgd: a grid of heads "
                          "trained together; lbfgs: exact logistic regression).")
    lrs = _numbers(task.lrs, "lrs", 0.0, allow_low=False)
    weight_decays = _numbers(task.weight_decays, "weight_decays", 0.0, allow_low=True)
    for option in ("max_epochs", "batch_size", "lbfgs_max_iter"):
        value = task.get(option)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"task.{option}={value!r} must be a positive integer.")
    if isinstance(task.aug_passes, bool) or not isinstance(task.aug_passes, int) or task.aug_passes < 0:
        raise ConfigError(f"task.aug_passes={task.aug_passes!r} must be an integer >= 0 (0: un-augmented features "
                          "only).")
    momentum = task.momentum
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"task.momentum={momentum!r} must be a number in [0, 1).")
    knn_ks(task.knn_k)
    return lrs, weight_decays


def linear_probe(cfg: DictConfig) -> dict[str, Any]:
    lrs, weight_decays = check_options(cfg.task)
    run = start_labelled_run(cfg, require_pretrained=True, resumable=False)
    task, dm, source = run.task, run.datamodule, run.source
    holder = torch.nn.Module()
    holder.backbone = source.backbone
    fast = apply_speed_options(holder, cfg.accelerator)  # channels_last / compile speed up the one extraction pass
    precision = resolve_precision(cfg.accelerator.precision)
    device = probe_device(cfg)
    saved = save_run_config(run, precision)
    loggers = build_loggers(cfg, run.run_dir)
    for logger in loggers:
        logger.log_hyperparams(saved)

    started = time.time()
    feats = split_features(run, device, autocast_dtype(precision), task.aug_passes)
    feature_s = time.time() - started
    objective = task.objective
    obj = Objective(int(dm.num_classes or 0) if objective in ("classification", "joint") else 0,
                    dm.target_mean if objective in ("joint", "regression") else None,
                    dm.target_std if objective in ("joint", "regression") else None, float(task.regression_weight))
    started = time.time()
    fit = fit_probe(feats["train"], feats["val"], obj, str(task.solver), lrs, weight_decays,
                    task.max_epochs, task.batch_size, float(task.momentum), int(cfg.seed), int(task.lbfgs_max_iter))
    fit_s = time.time() - started
    log.info("linear probe: chose %s (%d settings, %.1f s for features, %.1f s to fit)", fit.choice, len(fit.grid),
             feature_s, fit_s)
    for epoch, values in _by_epoch(fit.history).items():
        for logger in loggers:
            logger.log_metrics({**values, "epoch": epoch}, step=epoch)

    summary = {**base_summary(run), "probe": fit.choice, "grid": fit.grid, "epochs": task.max_epochs,
               "n_train_features": len(feats["train"]), "feature_seconds": round(feature_s, 2),
               "fit_seconds": round(fit_s, 2), "device": str(device), "precision": precision,
               "speed": {**fast, "optimizer": None}}
    if obj.n_classes:
        summary["knn"] = knn_report(feats["train_eval"].x, feats["train_eval"].y, feats["test"].x, feats["test"].y,
                                    knn_ks(task.knn_k), float(task.knn_temperature), obj.n_classes)
    preds = predict(fit.head, feats["test"], obj)
    export_model(run, fit.head, {"kind": "probe", "in_features": int(source.backbone.num_features),
                                 "n_out": obj.n_out}, {"probe": fit.choice})
    plots = [plot_epoch_curves(fit.history, run.run_dir / "curves.png", run.run_dir.name)] if fit.history else []
    config_summary = {"task": task.name, "objective": objective, "backbone": cfg.backbone.name,
                      "pretrained": source.pretrained, "dataset": cfg.dataset.name, "solver": task.solver,
                      "lrs": lrs if task.solver == "sgd" else None, "weight_decays": weight_decays,
                      "epochs": task.max_epochs,
                      "aug_passes": task.aug_passes, "label_fraction": summary["label_fraction"],
                      "chosen": fit.choice}
    return finish_labelled_run(run, summary, preds, config_summary, loggers, plots)


def _by_epoch(history: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for name, curve in history.items():
        for epoch, value in curve.items():
            rows.setdefault(epoch, {})[name] = value
    return dict(sorted(rows.items()))
