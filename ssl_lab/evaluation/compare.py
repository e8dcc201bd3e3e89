"""One table over many runs: `python -m ssl_lab.compare <dir> [--out DIR]` writes comparison.csv and comparison.md.

Every directory under <dir> holding metrics.json and/or summary.json is a run (so each stage of a pipeline run
— pretrain/, linear/, finetune/, joint/, evaluate/ — gets its own row). method/backbone/dataset/task come from
metrics.json, else summary.json, else the run's config.yaml. images_per_s is the pretraining throughput: a
downstream stage without its own takes it from its sibling pretrain/summary.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from ssl_lab.artifacts import atomic_write
from ssl_lab.errors import DataError, SSLLabError
from ssl_lab.evaluation.report import table

RUN_FILES = ("metrics.json", "summary.json")
ID_COLUMNS = ("run", "task", "method", "backbone", "dataset")
SKIP_DIRS = {"logs", "checkpoints", "plots", "wandb", "tb", "lightning_logs"}


def _load(path: Path, reader) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path) as fh:
            data = reader(fh)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"ssl_lab.compare: warning: skipping unreadable {path}: {err}", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def find_runs(root: Path) -> list[Path]:
    """Run directories under root (root itself included), in natural order (multirun 2 before 10)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        if any(f in filenames for f in RUN_FILES):
            found.append(Path(dirpath))
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.relative_to(root).as_posix())]
    return sorted(found, key=natural)


def _row(root: Path, run: Path) -> dict[str, Any]:
    metrics = _load(run / "metrics.json", json.load)
    summary = _load(run / "summary.json", json.load)
    config = _load(run / "config.yaml", yaml.safe_load)
    merged = {**summary, **metrics}
    row: dict[str, Any] = {"run": run.relative_to(root).as_posix()}
    for key in ID_COLUMNS[1:]:
        row[key] = merged.get(key) if merged.get(key) is not None else _get(config, key, "name")
    test = merged.get("test") if isinstance(merged.get("test"), dict) else {}
    for key in ("accuracy", "f1_macro", "auc"):
        row[key] = test.get(key)
    for target, stats in (test.get("regression") or {}).items():
        row[f"mse_{target}"] = _get(stats, "mse")
    row["knn_acc"] = merged.get("knn_accuracy")
    row["label_fraction"] = merged.get("label_fraction")
    speed = merged.get("images_per_s")
    if speed is None and merged.get("pretrained"):  # the pretraining run whose backbone.pt this run loaded
        speed = _load(Path(merged["pretrained"]).parent / "summary.json", json.load).get("images_per_s")
    row["images_per_s"] = speed
    return row


def build_table(root) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): run, task, method, backbone, dataset, label_fraction, accuracy, f1_macro, auc, mse_<target>..., knn_acc,
    images_per_s; a value a run does not have is None."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass a multirun directory or a run directory.")
    runs = find_runs(root)
    if not runs:
        raise DataError(f"{root}: no run directories found (none holds metrics.json or summary.json).")
    rows = [_row(root, run) for run in runs]
    targets = sorted({k for row in rows for k in row if k.startswith("mse_")})
    columns = [*ID_COLUMNS, "label_fraction", "accuracy", "f1_macro", "auc", *targets, "knn_acc", "images_per_s"]
    return columns, [{c: row.get(c) for c in columns} for row in rows]


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join(table(columns, [[row[c] for c in columns] for row in rows])).rstrip() + "\n"


def write_comparison(root, out=None) -> tuple[Path, Path, str]:
    """Write <out or root>/comparison.csv (full precision) and comparison.md; return both paths and the markdown."""
    columns, rows = build_table(root)
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)

    def _csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: "" if row[c] is None else row[c] for c in columns} for row in rows)

    markdown = to_markdown(columns, rows)
    csv_path = atomic_write(out / "comparison.csv", _csv)
    md_path = atomic_write(out / "comparison.md", lambda tmp: Path(tmp).write_text(markdown))
    return csv_path, md_path, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_lab.compare",
                                     description="Tabulate the metrics of every run under a directory.")
    parser.add_argument("dir", help="a multirun directory, a runs/ directory or one run directory")
    parser.add_argument("--out", default=None, help="where to write comparison.csv/.md (default: DIR)")
    args = parser.parse_args(argv)
    try:
        csv_path, md_path, markdown = write_comparison(args.dir, args.out)
    except SSLLabError as err:
        print(f"ssl_lab.compare: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\nwritten: {csv_path} and {md_path}", file=sys.stderr)
    return 0
