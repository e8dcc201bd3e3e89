"""What a downstream or evaluation run leaves for people: metrics.json, plots, report.md."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from ssl_lab.artifacts import write_json
from ssl_lab.evaluation.metrics import classification_metrics, regression_metrics
from ssl_lab.evaluation.plots import plot_confusion, plot_curves, plot_pred_vs_true, plot_roc
from ssl_lab.evaluation.report import write_report


@torch.no_grad()
def collect(model: Any, loader: DataLoader, device: torch.device) -> dict[str, torch.Tensor]:
    """Run `model.predict` over a loader (views made exactly as in validation) and stack the results."""
    model.eval().to(device)
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        batch = model.on_after_batch_transfer({k: v.to(device) for k, v in batch.items()}, 0)
        for key, value in model.predict(batch).items():
            parts[key].append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def test_metrics(preds: dict[str, torch.Tensor], class_names: list[str] | None,
                 target_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "probs" in preds:
        out.update(classification_metrics(preds["probs"], preds["y"], class_names))
    if "pred" in preds:
        out["regression"] = regression_metrics(preds["pred"], preds["targets"], target_names)
    return out


def write_outputs(run_dir: Path, title: str, config_summary: dict[str, Any], metrics: dict[str, Any],
                  preds: dict[str, torch.Tensor], class_names: list[str] | None, target_names: list[str],
                  extra_plots: Sequence[Path] = ()) -> list[Path]:
    """metrics.json, the plots that apply to this run (``extra_plots`` are already drawn, e.g. curves of a run
    without a CSV logger), and a report.md that shows them; returns the plots."""
    write_json(run_dir / "metrics.json", metrics)
    plots: list[Path] = list(extra_plots)
    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    if logs and not any(Path(p).name == "curves.png" for p in plots):
        plots.append(plot_curves(logs, run_dir / "curves.png", run_dir.name))
    test = metrics.get("test", {})
    if "confusion_matrix" in test:
        plots.append(plot_confusion(test["confusion_matrix"], class_names, run_dir / "confusion_matrix.png",
                                    run_dir.name))
        plots.append(plot_roc(preds["probs"], preds["y"], class_names, run_dir / "roc.png", run_dir.name))
    if "pred" in preds:
        plots.append(plot_pred_vs_true(preds["pred"], preds["targets"], target_names, run_dir / "pred_vs_true.png",
                                       run_dir.name))
    plots = [p for p in plots if p is not None]
    write_report(run_dir, title, config_summary, metrics, plots)
    return plots
