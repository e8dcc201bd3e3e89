"""What every labelled (downstream) run shares: its checks, data, backbone and views before training, and its
outputs after: the test metrics, model.pt, plots, report and the logger record. The tasks differ only in how they
train (ssl_lab.tasks.linear on cached features, ssl_lab.tasks.finetune with Lightning), so the split, the leak
check, the metrics and the files a reader looks at are the same for all of them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.config import validate
from ssl_lab.data.splits import check_no_leak, write_splits
from ssl_lab.errors import ConfigError
from ssl_lab.loggers import publish
from ssl_lab.model_file import save_model_file
from ssl_lab.segments import read_segments
from ssl_lab.tasks.backbone_source import BackboneSource, load_backbone
from ssl_lab.tasks.common import (auto_choices, claim_run_dir, config_hash, labelled_datamodule, one_console,
                                  resolve_run_dir, save_config)
from ssl_lab.tasks.outputs import test_metrics, write_outputs

log = logging.getLogger(__name__)


@dataclass
class LabelledRun:
    cfg: DictConfig
    run_dir: Path
    ckpt_path: str | None
    datamodule: Any
    source: BackboneSource
    augment: Augment
    started: float = field(default_factory=time.time)

    @property
    def task(self) -> DictConfig:
        return self.cfg.task


def start_labelled_run(cfg: DictConfig, require_pretrained: bool, resumable: bool = True) -> LabelledRun:
    """Claim the run directory, set up the labelled splits, refuse a test split the backbone was pretrained on,
    load the backbone and build the (one-view) augmentation. Nothing is written yet (see `save_run_config`)."""
    started = time.time()
    one_console()
    task = cfg.task
    run_dir = resolve_run_dir(cfg)
    if not resumable and cfg.get("resume") is not None:
        raise ConfigError(f"task={task.name} trains on cached features in seconds to minutes and keeps no training "
                          "checkpoint, so there is nothing to resume; drop resume= and start a new run_dir.")
    ckpt_path = claim_run_dir(run_dir, cfg.get("resume"), config_hash(cfg))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = labelled_datamodule(cfg)
    objective = task.get("objective", "classification")
    if objective in ("joint", "regression") and not datamodule.target_names:
        raise ConfigError(f"task={task.name} with objective={objective} needs regression targets, but dataset "
                          f"{cfg.dataset.name} has none; set dataset.target_keys=[...] or use "
                          "objective=classification.")
    if objective in ("classification", "joint") and not datamodule.num_classes:
        raise ConfigError(f"task={task.name} with objective={objective} needs class labels; dataset "
                          f"{cfg.dataset.name} has none (set dataset.label_key).")
    source = load_backbone(cfg, datamodule, require_pretrained=require_pretrained)
    check_no_leak(source.pretrained, datamodule)
    augment = instantiate(cfg.augment, size=source.view_size, n_views=1, _convert_="all")
    validate(cfg, datamodule, augment, ssl=False)
    augment.set_stats(source.mean, source.std)
    return LabelledRun(cfg, run_dir, ckpt_path, datamodule, source, augment, started)


def save_run_config(run: LabelledRun, precision: str) -> dict[str, Any]:
    """The first files of the run, once every check has passed: config.yaml and splits.json."""
    saved = save_config(run.cfg, run.run_dir, precision, resolved=auto_choices(run.cfg, run.source.backbone))
    write_splits(run.run_dir, run.datamodule)
    return saved


def base_summary(run: LabelledRun) -> dict[str, Any]:
    cfg, data = run.cfg, run.datamodule.summary()
    return {"task": run.task.name, "objective": run.task.get("objective", "classification"),
            "method": run.source.meta.get("method", "scratch"), "backbone": cfg.backbone.name,
            "dataset": cfg.dataset.name, "pretrained": run.source.pretrained,
            "label_fraction": data.get("label_fraction"), "data_n_train": data.get("n_train"),
            "data_n_val": data.get("n_val"), "data_n_test": data.get("n_test"), "run_dir": str(run.run_dir),
            **({"segments": segs} if (segs := read_segments(run.run_dir)) else {})}


def export_model(run: LabelledRun, head: nn.Module, head_spec: dict[str, Any], extra: dict[str, Any]) -> Path:
    """<run_dir>/model.pt: the backbone as trained (or frozen) with the head, loadable by `load_model_file`."""
    dm, src = run.datamodule, run.source
    meta = {**src.meta, **src.backbone.meta(), "view_size": int(src.view_size),
            "norm": {"mean": [float(v) for v in src.mean], "std": [float(v) for v in src.std]}}
    info = {"task": run.task.name, "objective": run.task.get("objective", "classification"),
            "class_names": list(dm.class_names or []), "target_names": list(dm.target_names),
            "target_mean": None if dm.target_mean is None else [float(v) for v in dm.target_mean],
            "target_std": None if dm.target_std is None else [float(v) for v in dm.target_std],
            "dataset": run.cfg.dataset.name, "pretrained": src.pretrained, "config_hash": config_hash(run.cfg),
            **extra}
    return save_model_file(run.run_dir / "model.pt", src.backbone, meta, head, head_spec, info)


def finish_labelled_run(run: LabelledRun, summary: dict[str, Any], preds: dict, config_summary: dict[str, Any],
                        loggers: Sequence[Any], extra_plots: Sequence[Path] = ()) -> dict[str, Any]:
    """Test metrics, metrics.json, plots, report.md and the logger record; returns the summary."""
    dm = run.datamodule
    summary["test"] = test_metrics(preds, dm.class_names, dm.target_names)
    summary["wall_time_s"] = round(time.time() - run.started, 2)
    title = f"{run.task.name}: {run.cfg.backbone.name} on {run.cfg.dataset.name}"
    plots = write_outputs(run.run_dir, title, config_summary, summary, preds, dm.class_names, dm.target_names,
                          extra_plots)
    publish(loggers, plots, summary)
    log.info("%s done: %s", run.task.name, run.run_dir)
    return summary
