"""report.md content and the cross-run comparison table (library and `python -m ssl_lab.compare`)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_lab.errors import DataError
from ssl_lab.evaluation.compare import build_table, main, write_comparison
from ssl_lab.evaluation.metrics import classification_metrics, regression_metrics
from ssl_lab.evaluation.plots import plot_confusion
from ssl_lab.evaluation.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def test_report_has_config_metric_tables_and_relative_images(tmp_path):
    run = tmp_path / "run"
    test = classification_metrics(3.0 * torch.eye(3)[[0, 1, 1, 1, 2, 0]], torch.tensor([0, 0, 1, 1, 2, 2]),
                                  ["lens", "sub", "none"])
    test["regression"] = regression_metrics(torch.tensor([1.0, 3.0, 3.0]), torch.tensor([1.0, 2.0, 4.0]), ["mass"])
    metrics = {"task": "linear", "method": "simclr", "test": test, "knn_accuracy": 0.75,
               "probe": {"accuracy": 0.5, "f1_macro": 0.25}, "kmeans": {"ari": 1.0, "nmi": 1.0}}
    png = plot_confusion(test["confusion_matrix"], test["class_names"], run / "plots" / "confusion.png")
    path = write_report(run, "Linear probe", {"method": "simclr", "backbone": "resnet15", "lr": 0.001}, metrics, [png])
    assert path == run / "report.md"
    text = path.read_text()
    assert text.startswith("# Linear probe\n")
    assert "| setting | value |" in text and "| backbone | resnet15 |" in text and "| lr | 0.0010 |" in text
    assert "| test.accuracy | 0.6667 |" in text
    assert "| knn_accuracy | 0.7500 |" in text and "| kmeans.ari | 1.0000 |" in text
    assert "| class | precision | recall | f1 | support | auc |" in text
    assert "| sub | 0.6667 | 1.0000 | 0.8000 | 2 | 0.8750 |" in text  # hand values of the metrics test
    assert "| **lens** | 1 | 1 | 0 |" in text  # confusion matrix row of the true class 'lens'
    assert "| target | mse | mae | r2 |" in text and "| mass | 0.6667 | 0.6667 | 0.5714 |" in text
    assert "![confusion](plots/confusion.png)" in text  # relative: the run folder can be moved
    assert str(tmp_path) not in text


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _config(path: Path, method: str, backbone: str, dataset: str, task: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"task:\n  name: {task}\nmethod:\n  name: {method}\n  temperature: 0.1\n"
                    f"backbone:\n  name: {backbone}\ndataset:\n  name: {dataset}\n")


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    # job 0: a pipeline run with pretrain / linear / finetune stages
    pipe = root / "0"
    _dump(pipe / "pretrain" / "summary.json", {"task": "pretrain", "method": "simclr", "backbone": "resnet15",
                                               "dataset": "lens_sim", "images_per_s": 812.5, "final_loss": 3.1})
    (pipe / "pretrain" / "logs").mkdir(parents=True)
    _dump(pipe / "linear" / "metrics.json", {
        "task": "linear", "method": "simclr", "backbone": "resnet15", "dataset": "lens_sim", "label_fraction": 0.1,
        "pretrained": str(pipe / "pretrain" / "backbone.pt"), "test": {"accuracy": 0.9, "f1_macro": 0.85, "auc": 0.97, "per_class": {}, "confusion_matrix": []},
        "knn_accuracy": 0.8})
    _dump(pipe / "finetune" / "metrics.json", {
        "task": "finetune", "method": "simclr", "backbone": "resnet15", "dataset": "lens_sim",
        "pretrained": str(pipe / "pretrain" / "backbone.pt"), "test": {"accuracy": 0.95, "f1_macro": 0.9, "auc": 0.99,
                 "regression": {"mass": {"mse": 0.25, "mae": 0.4, "r2": 0.9},
                                "ellipticity": {"mse": 0.01, "mae": 0.05, "r2": 0.7}}}})
    # job 10: a plain downstream run whose metrics.json lacks method/backbone/dataset: they come from config.yaml
    plain = root / "10"
    _dump(plain / "metrics.json", {"task": "linear", "test": {"accuracy": 0.5, "f1_macro": 0.4, "auc": None}})
    _config(plain / "config.yaml", "barlow", "vit_tiny", "jets_sim", "linear")
    # job 2: a pretraining run alone
    _dump(root / "2" / "summary.json", {"task": "pretrain", "method": "barlow", "backbone": "resnet18",
                                        "dataset": "jets_sim", "images_per_s": 100.0})
    _config(root / "2" / "config.yaml", "barlow", "resnet18", "jets_sim", "pretrain")
    return root


COLUMNS = ["run", "task", "method", "backbone", "dataset", "label_fraction", "seed", "config", "accuracy", "f1_macro",
           "auc", "mse_ellipticity", "mse_mass", "knn20_acc", "probe_acc", "final_loss", "images_per_s"]


def test_compare_rows_and_columns(sweep):
    columns, rows = build_table(sweep)
    assert columns == COLUMNS
    by_run = {r["run"]: r for r in rows}
    assert [r["run"] for r in rows] == ["0/finetune", "0/linear", "0/pretrain", "2", "10"]  # natural order
    assert by_run["0/linear"] == {"run": "0/linear", "task": "linear", "method": "simclr", "backbone": "resnet15",
                                  "dataset": "lens_sim", "label_fraction": 0.1, "seed": None,
                                  "config": by_run["0/linear"]["config"], "accuracy": 0.9, "f1_macro": 0.85,
                                  "auc": 0.97, "mse_ellipticity": None, "mse_mass": None, "knn20_acc": 0.8,
                                  "probe_acc": None, "final_loss": None,
                                  "images_per_s": 812.5}  # throughput of the run that made its backbone.pt
    assert len({r["config"] for r in rows}) == 5  # no two runs differ only in their seed
    assert (by_run["0/finetune"]["mse_mass"], by_run["0/finetune"]["mse_ellipticity"]) == (0.25, 0.01)
    assert by_run["0/pretrain"]["accuracy"] is None and by_run["0/pretrain"]["images_per_s"] == 812.5
    assert (by_run["10"]["method"], by_run["10"]["backbone"], by_run["10"]["dataset"]) == ("barlow", "vit_tiny", "jets_sim")
    assert by_run["10"]["auc"] is None and by_run["10"]["images_per_s"] is None
    assert by_run["2"]["task"] == "pretrain" and by_run["2"]["images_per_s"] == 100.0


def test_compare_writes_csv_and_markdown(sweep, tmp_path):
    csv_path, md_path, markdown = write_comparison(sweep, tmp_path / "out")
    assert csv_path == tmp_path / "out" / "comparison.csv" and md_path.read_text() == markdown
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == COLUMNS
    linear = next(r for r in rows if r["run"] == "0/linear")
    assert linear["accuracy"] == "0.9" and linear["mse_mass"] == "" and linear["images_per_s"] == "812.5"
    lines = markdown.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    finetune = next(r for r in rows if r["run"] == "0/finetune")
    assert (f"| 0/finetune | finetune | simclr | resnet15 | lens_sim |  |  | {finetune['config']} | 0.9500 | 0.9000 | "
            "0.9900 | 0.0100 | 0.2500 |  |  |  | 812.5000 |") in lines
    assert len(lines) == 2 + 5  # no configuration with two seeds: no mean ± std table


def test_compare_cli(sweep):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ssl_lab.compare", str(sweep)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert (sweep / "comparison.csv").is_file() and (sweep / "comparison.md").read_text() == proc.stdout
    empty = sweep.parent / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ssl_lab.compare", str(empty)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no run directories found" in proc.stderr


def test_compare_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        build_table(tmp_path / "nope")
    assert main([str(tmp_path)]) == 2
