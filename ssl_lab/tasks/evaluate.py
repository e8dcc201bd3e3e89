"""Feature analysis: what a backbone's features say about the labels, with no training of the backbone."""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ssl_lab.artifacts import write_json
from ssl_lab.config import validate
from ssl_lab.errors import ConfigError
from ssl_lab.evaluation.embed import embed_2d, kmeans_scores, plot_embedding
from ssl_lab.evaluation.knn import knn_accuracy
from ssl_lab.evaluation.probe import logistic_probe
from ssl_lab.evaluation.report import write_report
from ssl_lab.loggers import publish
from ssl_lab.tasks.backbone_source import load_backbone
from ssl_lab.tasks.common import (build_loggers, claim_run_dir, labelled_datamodule, one_console, resolve_run_dir,
                                  save_config)

log = logging.getLogger(__name__)


@torch.no_grad()
def features(backbone: torch.nn.Module, augment: Any, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(backbone(augment.eval_view(batch["x"])).float())
        labels.append(batch["y"])
    return torch.cat(feats), torch.cat(labels)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    one_console()
    task = cfg.task
    run_dir = resolve_run_dir(cfg)
    claim_run_dir(run_dir, None)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = labelled_datamodule(cfg)
    if not datamodule.num_classes:
        raise ConfigError(f"task=evaluate needs class labels; dataset {cfg.dataset.name} has none "
                          "(set dataset.label_key).")
    source = load_backbone(cfg, datamodule, require_pretrained=False)
    augment = instantiate(cfg.augment, size=source.view_size, n_views=1, _convert_="all")
    validate(cfg, datamodule, augment, ssl=False)
    augment.set_stats(source.mean, source.std)
    save_config(cfg, run_dir, "32-true")

    train_x, train_y = features(source.backbone, augment, datamodule.train_dataloader())
    test_x, test_y = features(source.backbone, augment, datamodule.test_dataloader())
    n_classes = int(datamodule.num_classes)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=min(int(task.knn_k), len(train_x)),
                       temperature=float(task.knn_temperature), num_classes=n_classes)
    probe = logistic_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy())

    rng = np.random.default_rng(cfg.seed)
    keep = rng.permutation(len(test_x))[: int(task.max_points)]
    sub_x, sub_y = test_x[keep].numpy(), test_y[keep].numpy()
    kmeans = kmeans_scores(sub_x, sub_y, n_clusters=n_classes, seed=cfg.seed)
    plots = []
    for method in task.embed:
        xy = embed_2d(sub_x, method=method, seed=cfg.seed)
        plots.append(plot_embedding(xy, sub_y, datamodule.class_names, f"{method.upper()} of test features",
                                    run_dir / f"embedding_{method}.png"))

    metrics = {"task": "evaluate", "method": source.meta.get("method", "scratch"), "backbone": cfg.backbone.name,
               "dataset": cfg.dataset.name, "pretrained": source.pretrained, "knn_accuracy": knn,
               "knn_k": int(task.knn_k), "probe": probe, "kmeans": kmeans, "n_train": len(train_x),
               "n_test": len(test_x), "wall_time_s": round(time.time() - started, 2), "run_dir": str(run_dir)}
    write_json(run_dir / "metrics.json", metrics)
    publish(build_loggers(cfg, run_dir), plots, metrics)
    write_report(run_dir, f"evaluate: {cfg.backbone.name} on {cfg.dataset.name}",
                 {"backbone": cfg.backbone.name, "pretrained": source.pretrained or "random init",
                  "dataset": cfg.dataset.name, "knn_k": int(task.knn_k), "knn_temperature": task.knn_temperature},
                 metrics, plots)
    log.info("evaluate done: %s", run_dir)
    return metrics
