"""One table over many runs: `python -m ssl_lab.compare <dir> [--out DIR]` writes comparison.csv, comparison_mean.csv
and comparison.md.

Every directory under <dir> holding metrics.json and/or summary.json is a run (so each stage of a pipeline run
— pretrain/, linear/, finetune/, joint/, evaluate/ — gets its own row). method/backbone/dataset/task come from
metrics.json, else summary.json, else the run's config.yaml; the seed from config.yaml. images_per_s is the
pretraining throughput: a downstream stage without its own takes it from its sibling pretrain/summary.json.
A pretraining run has none of the downstream metrics, so its row shows what its summary.json measured: final_loss
and wall_time_s (columns that appear once some pretraining run has them; a table of downstream runs is unchanged).
Runs that differ only in their seed form one configuration (`ssl_lab.evaluation.seed_groups`), reported as
mean ± std in comparison_mean.csv and, when some configuration has two seeds or more, in comparison.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import yaml

from ssl_lab.artifacts import atomic_write
from ssl_lab.errors import DataError, SSLLabError
from ssl_lab.evaluation.report import table
from ssl_lab.evaluation.seed_groups import IDENTITY_COLUMNS, aggregate, config_ids, mean_cell

RUN_FILES = ("metrics.json", "summary.json")
ID_COLUMNS = ("run", "task", "method", "backbone", "dataset")
RUN_COLUMNS = ("label_fraction", "seed", "config")  # describe a run; every column after them is a metric
SKIP_DIRS = {"logs", "checkpoints", "plots", "wandb", "tb", "lightning_logs"}
MEAN_CSV = "comparison_mean.csv"
KNN_DEFAULT_K = 20  # what task=evaluate used before metrics.json named k
_KNN_KEY = re.compile(r"^k(\d+)$")
# summary.json keys of a pretraining run shown as metrics; a downstream run's own wall time stays in its report
PRETRAIN_METRICS = ("final_loss", "wall_time_s")


class Comparison(NamedTuple):
    columns: list[str]  # per run
    rows: list[dict[str, Any]]
    mean_columns: list[str]  # per configuration
    mean_rows: list[dict[str, Any]]
    metrics: list[str]  # the metric columns, aggregated as <metric>_mean / _std / _n


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


def _knn(run: Path, merged: dict[str, Any]) -> dict[int, Any]:
    """{k: accuracy} from metrics["knn"]["k<N>"]; an older run's knn_accuracy counts as k = knn_k (default 20)."""
    found = {}
    knn = merged.get("knn")
    for key, value in (knn.items() if isinstance(knn, dict) else ()):
        match = _KNN_KEY.match(str(key))
        if match:
            found[int(match.group(1))] = value
    if merged.get("knn_accuracy") is not None:
        k = merged.get("knn_k", KNN_DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DataError(f"{run}: knn_k={k!r} is not a positive integer; fix it (the k of knn_accuracy) or "
                            "remove the run from the folder.")
        found.setdefault(k, merged["knn_accuracy"])
    return found


def _pretrained_config(value: Any) -> dict[str, Any] | None:
    """The config.yaml of the run a downstream run took its backbone from (a run dir or its backbone.pt)."""
    if not isinstance(value, str) or value in ("", "random"):
        return None
    path = Path(value)
    return _load((path if path.is_dir() else path.parent) / "config.yaml", yaml.safe_load) or None


def _row(root: Path, run: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(row, config.yaml, the pretraining run's config.yaml) of one run."""
    metrics = _load(run / "metrics.json", json.load)
    summary = _load(run / "summary.json", json.load)
    config = _load(run / "config.yaml", yaml.safe_load)
    merged = {**summary, **metrics}
    row: dict[str, Any] = {"run": run.relative_to(root).as_posix()}
    for key in ID_COLUMNS[1:]:
        row[key] = merged.get(key) if merged.get(key) is not None else _get(config, key, "name")
    row["label_fraction"] = merged.get("label_fraction")
    row["seed"] = config.get("seed", merged.get("seed"))
    test = merged.get("test") if isinstance(merged.get("test"), dict) else {}
    for key in ("accuracy", "f1_macro", "auc"):
        row[key] = test.get(key)
    for target, stats in (test.get("regression") or {}).items():
        row[f"mse_{target}"] = _get(stats, "mse")
    for k, acc in _knn(run, merged).items():
        row[f"knn{k}_acc"] = acc
    row["probe_acc"] = _get(merged, "probe", "accuracy")
    if row["task"] == "pretrain":
        row.update({key: merged.get(key) for key in PRETRAIN_METRICS})
    speed = merged.get("images_per_s")
    if speed is None and merged.get("pretrained"):  # the pretraining run whose backbone.pt this run loaded
        speed = _load(Path(merged["pretrained"]).parent / "summary.json", json.load).get("images_per_s")
    row["images_per_s"] = speed
    return row, config, _pretrained_config(config.get("pretrained", merged.get("pretrained")))


def build_comparison(root) -> Comparison:
    """The per-run table and the per-configuration (mean ± std over seeds) table of every run under root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass a multirun directory or a run directory.")
    runs = find_runs(root)
    if not runs:
        raise DataError(f"{root}: no run directories found (none holds metrics.json or summary.json).")
    rows, configs, pretrained = zip(*(_row(root, run) for run in runs))
    ids = config_ids(rows, configs, pretrained)
    for row, key in zip(rows, ids):
        row["config"] = key[:8]
    targets = sorted({k for row in rows for k in row if k.startswith("mse_")})
    knn = sorted({k for row in rows for k in row if re.fullmatch(r"knn\d+_acc", k)}, key=lambda c: int(c[3:-4]))
    pretrain = [m for m in PRETRAIN_METRICS if any(row.get(m) is not None for row in rows)]
    metrics = ["accuracy", "f1_macro", "auc", *targets, *knn, "probe_acc", *pretrain, "images_per_s"]
    columns = [*ID_COLUMNS, *RUN_COLUMNS, *metrics]
    rows = [{c: row.get(c) for c in columns} for row in rows]
    mean_columns, mean_rows = aggregate(rows, ids, metrics)
    return Comparison(columns, rows, mean_columns, mean_rows, metrics)


def build_table(root) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): run, task, method, backbone, dataset, label_fraction, seed, config, accuracy, f1_macro, auc,
    mse_<target>..., knn<k>_acc... (by k), probe_acc, final_loss and wall_time_s (when some pretraining run has
    them), images_per_s; a value a run does not have is None."""
    comparison = build_comparison(root)
    return comparison.columns, comparison.rows


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join(table(columns, [[row[c] for c in columns] for row in rows])).rstrip() + "\n"


def mean_markdown(comparison: Comparison) -> str:
    """The per-configuration table, one `mean ± std (n=N)` cell per metric."""
    columns = ["config", "path", *IDENTITY_COLUMNS, "seeds", *comparison.metrics]
    cells = [[*(row[c] for c in columns[:-len(comparison.metrics)]),
              *(mean_cell(row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"]) for m in comparison.metrics)]
             for row in comparison.mean_rows]
    intro = ("Runs whose config.yaml differs only in the seed, as mean ± sample std (ddof=1) over the n runs "
             "that have the metric.")
    return "\n".join(["## Mean ± std over seeds", "", intro, "", *table(columns, cells)]).rstrip() + "\n"


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    def _csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: "" if row[c] is None else row[c] for c in columns} for row in rows)

    return atomic_write(path, _csv)


def write_comparison(root, out=None) -> tuple[Path, Path, str]:
    """Write <out or root>/comparison.csv (per run, full precision), comparison_mean.csv (per configuration,
    always) and comparison.md (the per-run table, then the mean ± std table when some configuration has n >= 2);
    return the paths of comparison.csv and comparison.md and the markdown."""
    comparison = build_comparison(root)
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(comparison.columns, comparison.rows)
    if any(row["n_seeds"] >= 2 for row in comparison.mean_rows):
        markdown += "\n" + mean_markdown(comparison)
    csv_path = _write_csv(out / "comparison.csv", comparison.columns, comparison.rows)
    _write_csv(out / MEAN_CSV, comparison.mean_columns, comparison.mean_rows)
    md_path = atomic_write(out / "comparison.md", lambda tmp: Path(tmp).write_text(markdown))
    return csv_path, md_path, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_lab.compare",
                                     description="Tabulate the metrics of every run under a directory, "
                                                 "with mean ± std over the seeds of each configuration.")
    parser.add_argument("dir", help="a multirun directory, a runs/ directory or one run directory")
    parser.add_argument("--out", default=None, help=f"where to write comparison.csv/.md and {MEAN_CSV} (default: DIR)")
    args = parser.parse_args(argv)
    try:
        csv_path, md_path, markdown = write_comparison(args.dir, args.out)
    except SSLLabError as err:
        print(f"ssl_lab.compare: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\nwritten: {csv_path}, {csv_path.with_name(MEAN_CSV)} and {md_path}", file=sys.stderr)
    return 0
