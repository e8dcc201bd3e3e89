"""Feature analysis: what a backbone's features say about the labels, with no training of the backbone.

kNN as the literature reports it (weighted, cosine, T = 0.07, k = 20 and 200; Wu et al. 2018), scikit-learn's
logistic regression on standardised features (the reference a linear probe is checked against), k-means agreement
with the labels, and 2-D maps. The bank and the probe use the train split, every score the test split.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ssl_lab.artifacts import write_json
from ssl_lab.evaluation.embed import embed_2d, kmeans_scores, plot_embedding
from ssl_lab.evaluation.knn import knn_ks, knn_report
from ssl_lab.evaluation.probe import logistic_probe
from ssl_lab.evaluation.report import write_report
from ssl_lab.loggers import publish
from ssl_lab.tasks.common import build_loggers, resolve_precision
from ssl_lab.tasks.features import autocast_dtype, probe_device, split_features
from ssl_lab.tasks.labelled_run import base_summary, save_run_config, start_labelled_run

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    task = cfg.task
    ks = knn_ks(task.knn_k)
    run = start_labelled_run(cfg, require_pretrained=False, resumable=False)
    dm, source, run_dir = run.datamodule, run.source, run.run_dir
    precision = resolve_precision(cfg.accelerator.precision)
    save_run_config(run, precision)
    device = probe_device(cfg)
    feats = split_features(run, device, autocast_dtype(precision))
    train, test = feats["train_eval"], feats["test"]
    n_classes = int(dm.num_classes)
    knn = knn_report(train.x, train.y, test.x, test.y, ks, float(task.knn_temperature), n_classes)
    train_x, train_y, test_x, test_y = (t.cpu().numpy() for t in (train.x, train.y, test.x, test.y))
    probe = logistic_probe(train_x, train_y, test_x, test_y)

    rng = np.random.default_rng(cfg.seed)
    keep = rng.permutation(len(test_x))[: int(task.max_points)]
    sub_x, sub_y = test_x[keep], test_y[keep]
    kmeans = kmeans_scores(sub_x, sub_y, n_clusters=n_classes, seed=cfg.seed)
    plots = []
    for method in task.embed:
        xy = embed_2d(sub_x, method=method, seed=cfg.seed)
        plots.append(plot_embedding(xy, sub_y, dm.class_names, f"{run_dir.name}: {method.upper()} of test features",
                                    run_dir / f"embedding_{method}.png"))

    metrics = {**base_summary(run), "task": "evaluate", "knn": knn, "probe": probe, "kmeans": kmeans,
               "n_train": len(train_x), "n_test": len(test_x), "device": str(device)}
    metrics["wall_time_s"] = round(time.time() - run.started, 2)
    write_json(run_dir / "metrics.json", metrics)
    publish(build_loggers(cfg, run_dir), plots, metrics)
    write_report(run_dir, f"evaluate: {cfg.backbone.name} on {cfg.dataset.name}",
                 {"backbone": cfg.backbone.name, "pretrained": source.pretrained or "random init",
                  "dataset": cfg.dataset.name, "knn_k": ks, "knn_temperature": task.knn_temperature}, metrics, plots)
    log.info("evaluate done: %s", run_dir)
    return metrics
