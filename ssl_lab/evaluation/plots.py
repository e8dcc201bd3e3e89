"""Run plots as PNG files: training curves, confusion matrix, ROC curves, predicted-vs-true scatter.

Each `plot_*` saves the Figure its `make_*` builds (tests read the figure's text and lines before it is saved) and
puts the run's name in the title, so a PNG copied out of its run folder still says where it came from.
matplotlib is switched to the file-only Agg backend before pyplot is imported: runs on clusters have no display.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import r2_score, roc_auc_score, roc_curve  # noqa: E402

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


class Point(NamedTuple):
    step: int
    epoch: int | None
    value: float


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", Path(path).parent.name)
    return int(match.group(1)) if match else -1


def read_epoch_curves(metrics_csv_paths: Iterable[str | Path]) -> dict[str, dict[int, float]]:
    """{column: {epoch: value}} from Lightning CSVLogger files, read in version order (version_2 before
    version_10; other names keep the order given): a later file replaces the epochs it logs again (a resumed run),
    values logged per step are averaged per epoch, and a `<name>_step` column is dropped when `<name>_epoch` exists."""
    values: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for path in sorted(metrics_csv_paths, key=_version):
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


def read_step_curves(metrics_csv_paths: Iterable[str | Path]) -> dict[str, list[Point]]:
    """{column: [(step, epoch, value), ...] by step} from Lightning CSVLogger files in version order. A resumed run
    logs again from its checkpoint's step, so a later file's first step of a column cuts the older values there."""
    curves: dict[str, list[Point]] = {}
    for path in sorted(map(Path, metrics_csv_paths), key=_version):
        if not path.is_file():
            raise DataError(f"plot_curves: {path} does not exist; pass the run's logs/version_*/metrics.csv files.")
        new: dict[str, list[Point]] = defaultdict(list)
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                step, epoch = _float(row.get("step")), _float(row.get("epoch"))
                if step is None:
                    continue
                for col, cell in row.items():
                    value = _float(cell)
                    if col not in ("epoch", "step") and col is not None and value is not None:
                        new[col].append(Point(int(step), None if epoch is None else int(epoch), value))
        for col, points in new.items():
            first = min(p.step for p in points)
            curves[col] = [p for p in curves.get(col, []) if p.step < first] + points
    return {col: sorted(points, key=lambda p: p.step) for col, points in curves.items()}


def _skipped(col: str) -> bool:
    """Throughput is a number in summary.json, not a curve worth a panel."""
    return "per_s" in col or "throughput" in col


def _quantity(base: str) -> str:
    """The panel of a column: 'train/loss' and 'val/loss' share 'loss'; every 'lr-<optimizer>' column shares 'lr'."""
    name = base.split("/", 1)[1] if "/" in base else base
    return "lr" if re.match(r"lr($|[-_/])", name) else name


SCHEDULES = ("lr", "tau")  # set by a schedule, not measured: drawn unsmoothed, on the last panels


def _panel_order(quantity: str) -> tuple[int, str]:
    rank = 0 if quantity == "loss" else 2 if quantity in SCHEDULES else 1
    return rank, quantity


def smooth(values: Sequence[float], span: int) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): the first points are not pulled to zero."""
    v = np.asarray(values, dtype=np.float64)
    alpha = 2.0 / (span + 1.0)
    out, mean, weight = np.empty_like(v), 0.0, 0.0
    for i, x in enumerate(v):
        mean = (1 - alpha) * mean + alpha * x
        weight = (1 - alpha) * weight + alpha
        out[i] = mean / weight
    return out


def smoothing_span(n: int) -> int:
    """About 1/15 of the run, at most 50 steps; 1 (no smoothing) below 30 points, where every point is readable."""
    return 1 if n < 30 else min(50, n // 15)


def _title(run_name: str | None, what: str) -> str:
    return f"{run_name}: {what}" if run_name else what


def _series(curves: dict[str, list[Point]]) -> dict[str, dict[str, tuple[list[Point], list[Point]]]]:
    """{quantity: {base column: (per-step points, per-epoch points)}}. `<name>_step` / `<name>_epoch` are the two
    halves of one metric (a run stopped mid-epoch has no `_epoch` row yet: its step values are averaged per epoch);
    a plain column is per step when some epoch holds more than one of its values, else per epoch (validation)."""
    out: dict[str, dict[str, tuple[list[Point], list[Point]]]] = defaultdict(dict)
    for col, points in curves.items():
        if _skipped(col) or (col.endswith("_epoch") and col[: -len("_epoch")] + "_step" in curves):
            continue
        if col.endswith("_step"):
            base = col[: -len("_step")]
            epochs = curves.get(base + "_epoch") or _epoch_means(points)
            out[_quantity(base)][base] = (points, epochs)
            continue
        base = col[: -len("_epoch")] if col.endswith("_epoch") else col
        per_epoch = [p.epoch for p in points]
        stepwise = not col.endswith("_epoch") and len(set(per_epoch)) < len(per_epoch)
        out[_quantity(base)][base] = (points, []) if stepwise else ([], points)
    return out


def _epoch_means(points: list[Point]) -> list[Point]:
    """Mean of each epoch's step values, placed at the epoch's last step (where Lightning logs the epoch value)."""
    by_epoch: dict[int, list[Point]] = defaultdict(list)
    for p in points:
        if p.epoch is not None:
            by_epoch[p.epoch].append(p)
    return [Point(max(q.step for q in ps), e, float(np.mean([q.value for q in ps])))
            for e, ps in sorted(by_epoch.items())]


def make_curves(metrics_csv_paths: Sequence[str | Path], run_name: str | None = None):
    """One panel per logged quantity against the step: the raw step values faint, their moving average on top, epoch
    means as markers; the splits (train / val) of a quantity share its panel, the learning rates a last one."""
    metrics_csv_paths = list(metrics_csv_paths)
    panels = _series(read_step_curves(metrics_csv_paths))
    if not any("loss" in q.lower() or "acc" in q.lower() for q in panels):
        raise DataError(f"plot_curves: no loss or accuracy columns in {list(map(str, metrics_csv_paths))}.")
    names = sorted(panels, key=_panel_order)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, quantity in zip(axes.flat, names):
        for i, (base, (steps, epochs)) in enumerate(sorted(panels[quantity].items())):
            colour = f"C{i}"
            if steps:
                x, y = [p.step for p in steps], [p.value for p in steps]
                span = 1 if quantity in SCHEDULES else smoothing_span(len(y))
                if span > 1:
                    ax.plot(x, y, color=colour, alpha=0.25, lw=0.8, gid="raw")
                    ax.plot(x, smooth(y, span), color=colour, lw=1.6, gid="smoothed", label=f"{base} (EMA {span})")
                else:
                    ax.plot(x, y, color=colour, lw=1.2, marker="." if len(y) < 30 else None, ms=4, gid="raw",
                            label=base)
            if epochs:
                label = f"{base} (epoch mean)" if steps else base
                ax.plot([p.step for p in epochs], [p.value for p in epochs], color=colour, ls="none" if steps else "-",
                        marker="o", ms=5, mec="black", mew=0.5, gid="epoch", label=label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(quantity)
        if quantity == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(_title(run_name, "training curves"))
    fig.tight_layout()
    return fig


def plot_curves(metrics_csv_paths: Sequence[str | Path], out_path, run_name: str | None = None) -> Path:
    """curves.png of a run logged by Lightning's CSVLogger (see make_curves)."""
    return save_figure(make_curves(metrics_csv_paths, run_name), out_path)


def make_epoch_curves(curves: dict[str, dict[int, float]], run_name: str | None = None):
    """{name: {epoch: value}} curves (e.g. a linear probe's history, which no CSV logger saw): the loss columns on
    one axis, the accuracy columns on another."""
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
    fig.suptitle(_title(run_name, "training curves"))
    fig.tight_layout()
    return fig


def plot_epoch_curves(curves: dict[str, dict[int, float]], out_path, run_name: str | None = None) -> Path:
    return save_figure(make_epoch_curves(curves, run_name), out_path)


def make_confusion(matrix, class_names: Sequence[str], run_name: str | None = None):
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
    ax.set_title(_title(run_name, "confusion matrix"))
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return fig


def plot_confusion(matrix, class_names: Sequence[str], path, run_name: str | None = None) -> Path:
    return save_figure(make_confusion(matrix, class_names, run_name), path)


def make_roc(probs, labels, class_names: Sequence[str], run_name: str | None = None):
    """ROC curve of the positive class (2 classes) or one-vs-rest per class, each labelled with its AUC, and the
    macro AUC (mean over the drawn classes) in the title; classes absent from labels are skipped."""
    from ssl_lab.evaluation.metrics import to_probs

    import torch

    p = to_probs(torch.as_tensor(_np(probs))).numpy()
    y = _np(labels).astype(int).reshape(-1)
    if p.ndim != 2 or p.shape[1] != len(class_names) or len(y) != len(p):
        raise DataError(f"plot_roc: probabilities {p.shape} must be [N, {len(class_names)}] with {len(y)} labels.")
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    fig, ax = plt.subplots(figsize=(5, 5))
    aucs = []
    for c in classes:
        positives = y == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, c])
        aucs.append(float(roc_auc_score(positives, p[:, c])))
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {aucs[-1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    if aucs:
        ax.legend(fontsize=8, loc="lower right")
    what = "ROC" if not aucs else f"ROC, AUC {aucs[0]:.3f}" if len(classes) == 1 else \
        f"ROC, macro AUC {np.mean(aucs):.3f}"
    ax.set_title(_title(run_name, what))
    return fig


def plot_roc(probs, labels, class_names: Sequence[str], path, run_name: str | None = None) -> Path:
    return save_figure(make_roc(probs, labels, class_names, run_name), path)


def make_pred_vs_true(pred, true, target_names: Sequence[str], run_name: str | None = None):
    """One scatter panel per regression target with the y = x line and R² (scikit-learn's r2_score) in its title."""
    p, t = _np(pred), _np(true)
    if p.ndim == 1:
        p, t = p[:, None], t.reshape(-1, 1)
    if p.shape != t.shape or p.shape[1] != len(target_names):
        raise DataError(f"plot_pred_vs_true: predictions {p.shape} and targets {t.shape} must be "
                        f"[N, {len(target_names)}].")
    n = len(target_names)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.3), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], target_names)):
        ax.scatter(t[:, j], p[:, j], s=8, alpha=0.6)
        lo, hi = float(min(t[:, j].min(), p[:, j].min())), float(max(t[:, j].max(), p[:, j].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        # R² needs two samples and targets that vary; otherwise sklearn returns NaN or a meaningless value
        r2 = f"{r2_score(t[:, j], p[:, j]):.3f}" if len(t) >= 2 and np.ptp(t[:, j]) > 0 else "n/a"
        ax.set_title(f"{name}: R² = {r2}")
    fig.suptitle(_title(run_name, "predicted vs true"))
    fig.tight_layout()
    return fig


def plot_pred_vs_true(pred, true, target_names: Sequence[str], path, run_name: str | None = None) -> Path:
    return save_figure(make_pred_vs_true(pred, true, target_names, run_name), path)
