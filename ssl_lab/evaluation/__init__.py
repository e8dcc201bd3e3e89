"""Evaluation of frozen or fine-tuned encoders: pure functions on tensors / arrays, no Lightning.

Modules: `knn` (weighted k-NN), `metrics` (classification / regression, torchmetrics), `probe` (scikit-learn
logistic regression), `embed` (PCA / t-SNE / UMAP, k-means ARI/NMI), `plots` (matplotlib, Agg), `report`
(report.md), `compare` (one table over many runs). Names are imported lazily so that `import ssl_lab.evaluation`
does not pull in scikit-learn or matplotlib until they are used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "knn_predict": "knn", "knn_accuracy": "knn",
    "classification_metrics": "metrics", "regression_metrics": "metrics", "to_probs": "metrics",
    "logistic_probe": "probe",
    "embed_2d": "embed", "kmeans_scores": "embed", "plot_embedding": "embed",
    "plot_curves": "plots", "plot_confusion": "plots", "plot_roc": "plots", "plot_pred_vs_true": "plots",
    "write_report": "report",
    "build_table": "compare", "write_comparison": "compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
