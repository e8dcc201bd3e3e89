"""A run's report.md: config, metric tables and the run's plots, readable on GitHub or in any editor."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ssl_lab.artifacts import atomic_write

TABLE_KEYS = ("per_class", "confusion_matrix", "regression")


def fmt(value: Any) -> str:
    """One table cell: floats to 4 decimals, None empty, pipes escaped so they cannot break the table."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        value = ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _sections(metrics: Mapping[str, Any], prefix: str, scalars: list, blocks: list) -> None:
    """Split nested metrics into dotted scalar rows and the per-class / confusion / regression tables."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "per_class" and isinstance(value, Mapping):
            cols = ["precision", "recall", "f1", "support", "auc"]
            rows = [[cls, *(stats.get(c) for c in cols)] for cls, stats in value.items()]
            blocks.append((f"Per class ({prefix.rstrip('.') or 'all'})", table(["class", *cols], rows)))
        elif key == "confusion_matrix" and isinstance(value, list):
            names = list(metrics.get("class_names") or metrics.get("per_class", {}) or range(len(value)))
            rows = [[f"**{names[i]}**", *row] for i, row in enumerate(value)]
            blocks.append((f"Confusion matrix ({prefix.rstrip('.') or 'all'}; rows true, columns predicted)",
                           table(["true \\ predicted", *names], rows)))
        elif key == "regression" and isinstance(value, Mapping):
            rows = [[t, s.get("mse"), s.get("mae"), s.get("r2")] for t, s in value.items()]
            blocks.append((f"Regression ({prefix.rstrip('.') or 'all'})", table(["target", "mse", "mae", "r2"], rows)))
        elif key == "class_names":
            continue
        elif isinstance(value, Mapping):
            _sections(value, f"{name}.", scalars, blocks)
        elif value is None or isinstance(value, (int, float, str, bool)):
            scalars.append([name, value])


def scalar_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    """[dotted name, value] for every single-number metric (the report's metric table; also W&B's)."""
    scalars: list = []
    _sections(metrics, "", scalars, [])
    return scalars


def write_report(run_dir, title: str, config_summary: Mapping[str, Any], metrics: Mapping[str, Any],
                 plots: Sequence[str | Path]) -> Path:
    """Write run_dir/report.md; plots are linked relative to run_dir so the folder can be moved or zipped."""
    run_dir = Path(run_dir)
    lines = [f"# {title}", "", "## Configuration", ""]
    lines += table(["setting", "value"], [[k, v] for k, v in config_summary.items()])
    scalars: list = []
    blocks: list = []
    _sections(metrics, "", scalars, blocks)
    lines += ["## Metrics", ""]
    lines += table(["metric", "value"], scalars) if scalars else ["(none)", ""]
    for heading, block in blocks:
        lines += [f"### {heading}", "", *block]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            plot = Path(plot)
            if not plot.is_absolute() and not plot.exists():
                plot = run_dir / plot  # a bare relative name means "inside the run directory"
            rel = Path(os.path.relpath(plot.resolve(), run_dir.resolve())).as_posix()
            lines += [f"![{plot.stem}]({rel})", ""]
    text = "\n".join(lines).rstrip() + "\n"

    def _write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return atomic_write(run_dir / "report.md", _write)
