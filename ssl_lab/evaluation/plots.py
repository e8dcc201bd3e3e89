"""Run plots as PNG files: training curves, confusion matrix, ROC curves, predicted-vs-true scatter.

matplotlib is switched to the file-only Agg backend before pyplot is imported: runs on clusters have no display.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ssl_lab.artifacts import atomic_path  # noqa: E402
from ssl_lab.errors import DataError  # noqa: E402


def save_figure(fig, path) -> Path:
    """Write the figure atomically as PNG and close it (open figures otherwise pile up in long runs)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def _float(cell: str | None) -> float | None:
    if cell is None or cell.strip() == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_epoch_curves(metrics_csv_paths: Iterable[str | Path]) -> dict[str, dict[int, float]]:
    """{column: {epoch: value}} from Lightning CSVLogger files, read in version order (version_2 before
    version_10; other names keep the order given): a later file replaces the epochs it logs again (a resumed run),
    values logged per step are averaged per epoch, and a `<name>_step` column is dropped when `<name>_epoch` exists."""
    def version(path: Path) -> int:
        match = re.fullmatch(r"version_(\d+)", Path(path).parent.name)
        return int(match.group(1)) if match else -1

    values: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for path in sorted(metrics_csv_paths, key=version):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"plot_curves: {path} does not exist; pass the run's logs/version_*/metrics.csv files.")
        seen: set[tuple[str, int]] = set()
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                epoch = _float(row.get("epoch"))
                if epoch is None:
                    continue
                for col, cell in row.items():
                    value = _float(cell)
                    if col in ("epoch", "step") or col is None or value is None:
                        continue
                    key = (col, int(epoch))
                    if key not in seen:  # first value of this epoch in this file: it supersedes older versions
                        seen.add(key)
                        values[col][int(epoch)] = []
                    values[col][int(epoch)].append(value)
    curves = {col: {e: float(np.mean(v)) for e, v in sorted(by_epoch.items())} for col, by_epoch in values.items()}
    for col in list(curves):
        if col.endswith("_step") and col[: -len("_step")] + "_epoch" in curves:
            del curves[col]
    return curves


def plot_curves(metrics_csv_paths: Sequence[str | Path], out_path) -> Path:
    """Loss (and accuracy, when logged) per epoch, every split on one axis per quantity."""
    metrics_csv_paths = list(metrics_csv_paths)
    curves = read_epoch_curves(metrics_csv_paths)
    if not any("loss" in c.lower() or "acc" in c.lower() for c in curves):
        raise DataError(f"plot_curves: no loss or accuracy columns with epoch values in {list(map(str, metrics_csv_paths))}.")
    return plot_epoch_curves(curves, out_path)


def plot_epoch_curves(curves: dict[str, dict[int, float]], out_path) -> Path:
    """{name: {epoch: value}} curves (e.g. a linear probe's history, which no CSV logger saw) as plot_curves draws
    them: the loss columns on one axis, the accuracy columns on another."""
    loss = {c: v for c, v in curves.items() if "loss" in c.lower()}
    acc = {c: v for c, v in curves.items() if "acc" in c.lower()}
    if not loss and not acc:
        raise DataError(f"plot_epoch_curves: no loss or accuracy curves among {sorted(curves)}.")
    panels = [(name, group) for name, group in (("loss", loss), ("accuracy", acc)) if group]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, group) in zip(axes[0], panels):
        for col, by_epoch in sorted(group.items()):
            ax.plot(list(by_epoch), list(by_epoch.values()), marker="o", ms=3, label=col)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_confusion(matrix, class_names: Sequence[str], path) -> Path:
    """Counts in each cell, coloured by the row-normalised rate (recall per true class)."""
    m = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if m.shape != (k, k):
        raise DataError(f"plot_confusion: matrix shape {m.shape} does not match {k} class names.")
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k + 2, 1.0 + 0.6 * k + 1.5))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(k), list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return save_figure(fig, path)


def plot_roc(probs, labels, class_names: Sequence[str], path) -> Path:
    """ROC curve of the positive class (2 classes) or one-vs-rest per class; classes absent from labels skipped."""
    from ssl_lab.evaluation.metrics import to_probs

    import torch

    p = to_probs(torch.as_tensor(_np(probs))).numpy()
    y = _np(labels).astype(int).reshape(-1)
    if p.ndim != 2 or p.shape[1] != len(class_names) or len(y) != len(p):
        raise DataError(f"plot_roc: probabilities {p.shape} must be [N, {len(class_names)}] with {len(y)} labels.")
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in classes:
        positives = y == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, c])
        ax.plot(fpr, tpr, label=str(class_names[c]))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_pred_vs_true(pred, true, target_names: Sequence[str], path) -> Path:
    """One scatter panel per regression target with the y = x line."""
    p, t = _np(pred), _np(true)
    if p.ndim == 1:
        p, t = p[:, None], t.reshape(-1, 1)
    if p.shape != t.shape or p.shape[1] != len(target_names):
        raise DataError(f"plot_pred_vs_true: predictions {p.shape} and targets {t.shape} must be "
                        f"[N, {len(target_names)}].")
    n = len(target_names)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], target_names)):
        ax.scatter(t[:, j], p[:, j], s=8, alpha=0.6)
        lo, hi = float(min(t[:, j].min(), p[:, j].min())), float(max(t[:, j].max(), p[:, j].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(str(name))
    return save_figure(fig, path)
