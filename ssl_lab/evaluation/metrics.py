"""Test-set metrics as plain python (floats, lists), ready for metrics.json; computed with torchmetrics.

Classification: accuracy (micro), precision / recall / F1 macro and per class, ROC-AUC (binary on the
positive-class probability, multiclass one-vs-rest), confusion matrix (rows = true class, columns = predicted).
Regression: MSE, MAE, R2 per target, in whatever units the caller passes (de-standardise first for original units).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.functional.regression import mean_absolute_error, mean_squared_error, r2_score

from ssl_lab.errors import DataError


def _num(value: Tensor | float) -> float | None:
    """A json-safe float: NaN / inf (an undefined metric) become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def to_probs(logits_or_probs: Tensor) -> Tensor:
    """Rows that are already probabilities (in [0, 1], summing to 1) pass through; anything else is softmaxed."""
    x = logits_or_probs.detach().float().cpu()
    is_probs = bool(((x >= 0) & (x <= 1)).all()) and torch.allclose(x.sum(dim=1), torch.ones(len(x)), atol=1e-4)
    return x if is_probs else x.softmax(dim=1)


def classification_metrics(logits_or_probs: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of a K-class classifier on N samples. Macro averages skip classes that are neither present nor
    predicted (torchmetrics' rule); the AUC averages the one-vs-rest AUCs of the classes present in `labels`
    (a class with no positives has none) and is None when fewer than two classes are present."""
    if logits_or_probs.ndim != 2:
        raise DataError(f"classification_metrics: expected scores of shape [N, K], got {tuple(logits_or_probs.shape)}.")
    n, k = logits_or_probs.shape
    names = [str(c) for c in class_names]
    if k != len(names):
        raise DataError(f"classification_metrics: scores have {k} columns but {len(names)} class names are given "
                        f"({names}); the head's output size must equal the number of classes.")
    if k < 2:
        raise DataError("classification_metrics: need at least 2 classes.")
    labels = labels.detach().long().cpu().reshape(-1)
    if len(labels) != n or n == 0:
        raise DataError(f"classification_metrics: {len(labels)} labels for {n} score rows (need the same, > 0).")
    if (labels < 0).any() or (labels >= k).any():
        raise DataError(f"classification_metrics: labels must lie in [0, {k - 1}]; got {labels.min()}..{labels.max()}.")
    if not torch.isfinite(logits_or_probs).all():
        raise DataError("classification_metrics: scores contain NaN or inf (did training diverge?).")
    probs = to_probs(logits_or_probs)
    preds = probs.argmax(dim=1)

    per_prec = multiclass_precision(preds, labels, num_classes=k, average=None)
    per_rec = multiclass_recall(preds, labels, num_classes=k, average=None)
    per_f1 = multiclass_f1_score(preds, labels, num_classes=k, average=None)
    support = torch.bincount(labels, minlength=k)
    present = support > 0
    # AUC needs positives and negatives: classes absent from `labels` have none (and torchmetrics would warn).
    per_auc = torch.full((k,), float("nan"))
    if k == 2 and present.all():
        per_auc[:] = binary_auroc(probs[:, 1], labels)  # the same ranking read from either side
    elif present.all():
        per_auc = multiclass_auroc(probs, labels, num_classes=k, average=None)
    elif int(present.sum()) >= 2:
        for c in torch.nonzero(present).flatten().tolist():  # one-vs-rest, class by class
            per_auc[c] = binary_auroc(probs[:, c], (labels == c).long())
    auc = _num(per_auc[1] if k == 2 else per_auc[present].mean()) if int(present.sum()) >= 2 else None

    per_class = {
        name: {"precision": _num(per_prec[i]), "recall": _num(per_rec[i]), "f1": _num(per_f1[i]),
               "support": int(support[i]), "auc": _num(per_auc[i])}
        for i, name in enumerate(names)
    }
    return {
        "n": int(n),
        "accuracy": _num(multiclass_accuracy(preds, labels, num_classes=k, average="micro")),
        "precision_macro": _num(multiclass_precision(preds, labels, num_classes=k, average="macro")),
        "recall_macro": _num(multiclass_recall(preds, labels, num_classes=k, average="macro")),
        "f1_macro": _num(multiclass_f1_score(preds, labels, num_classes=k, average="macro")),
        "auc": auc,
        "class_names": names,
        "per_class": per_class,
        "confusion_matrix": multiclass_confusion_matrix(preds, labels, num_classes=k).tolist(),
    }


def regression_metrics(pred: Tensor, true: Tensor, target_names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """{target: {mse, mae, r2}} for [N, T] predictions (a 1-D tensor is one target). R2 is None when it is
    undefined (fewer than 2 samples or a constant true target)."""
    pred = pred.detach().float().cpu()
    true = true.detach().float().cpu()
    if pred.ndim == 1:
        pred = pred[:, None]
    if true.ndim == 1:
        true = true[:, None]
    names = [str(t) for t in target_names]
    if pred.shape != true.shape or pred.ndim != 2:
        raise DataError(f"regression_metrics: predictions {tuple(pred.shape)} and targets {tuple(true.shape)} "
                        "must have the same [N, T] shape.")
    if pred.shape[1] != len(names):
        raise DataError(f"regression_metrics: {pred.shape[1]} target columns but {len(names)} target names ({names}).")
    if len(pred) == 0:
        raise DataError("regression_metrics: no samples.")
    if not (torch.isfinite(pred).all() and torch.isfinite(true).all()):
        raise DataError("regression_metrics: predictions or targets contain NaN or inf.")
    out = {}
    for j, name in enumerate(names):
        p, t = pred[:, j], true[:, j]
        r2 = _num(r2_score(p, t)) if len(t) >= 2 and float(t.var()) > 0 else None
        out[name] = {"mse": _num(mean_squared_error(p, t)), "mae": _num(mean_absolute_error(p, t)), "r2": r2}
    return out
