"""The comparison table of pretraining runs shows what their summary.json measured: final loss, wall time, images/s."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY, run_cli, tiny_data
from ssl_lab.evaluation.compare import build_comparison, build_table, write_comparison

DOWNSTREAM = ["accuracy", "f1_macro", "auc", "probe_acc", "images_per_s"]


def _summary(method: str, final_loss: float | None, wall: float, speed: float | None, run_dir: Path) -> dict:
    """summary.json with the keys ssl_lab.tasks.pretrain writes (the data block trimmed)."""
    return {"task": "pretrain", "method": method, "backbone": "resnet15", "dataset": "lens_sim",
            "final_loss": final_loss, "epochs": 1, "global_step": 2, "images_per_s": speed, "wall_time_s": wall,
            "resumed_from": None, "precision": "32-true", "run_dir": str(run_dir),
            "backbone_path": str(run_dir / "backbone.pt"), "data": {"n_images": 24, "in_chans": 1},
            "bad_samples": {"examples": {}, "max": 100, "policy": "error", "skipped": {}},
            "guard": {"amp_skipped_steps": 0, "skipped_at": [], "skipped_steps": 0, "warnings": []},
            "speed": {"channels_last": False, "compile": False, "optimizer": "for-loop"}}


def _run(root: Path, name: str, method: str, seed: int, final_loss, wall, speed) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary(method, final_loss, wall, speed, run), indent=2))
    config = {"task": {"name": "pretrain"}, "method": {"name": method, "temperature": 0.1},
              "backbone": {"name": "resnet15"}, "dataset": {"name": "lens_sim", "seed": seed}, "seed": seed,
              "run_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture()
def pretrain_sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    _run(root, "0_pretrain_simclr", "simclr", 0, 3.7371, 3.06, 11.989)
    _run(root, "1_pretrain_simclr", "simclr", 1, 3.5, 2.5, 13.0)
    _run(root, "2_pretrain_barlow", "barlow", 0, 16.25, 4.1, None)  # too short for a steady-state speed
    return root


def test_pretraining_rows_show_final_loss_wall_time_and_speed(pretrain_sweep):
    columns, rows = build_table(pretrain_sweep)
    assert columns[-3:] == ["final_loss", "wall_time_s", "images_per_s"]
    by_run = {r["run"]: r for r in rows}
    assert {k: by_run["0_pretrain_simclr"][k] for k in columns[-3:]} == {
        "final_loss": 3.7371, "wall_time_s": 3.06, "images_per_s": 11.989}
    assert by_run["2_pretrain_barlow"]["final_loss"] == 16.25 and by_run["2_pretrain_barlow"]["images_per_s"] is None


def test_pretraining_markdown_and_csv_are_filled(pretrain_sweep, tmp_path):
    csv_path, _, markdown = write_comparison(pretrain_sweep, tmp_path / "out")
    with open(csv_path, newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert (rows["1_pretrain_simclr"]["final_loss"], rows["1_pretrain_simclr"]["wall_time_s"],
            rows["1_pretrain_simclr"]["images_per_s"]) == ("3.5", "2.5", "13.0")
    line = next(x for x in markdown.splitlines() if x.startswith("| 0_pretrain_simclr |"))
    assert line.endswith("| 3.7371 | 3.0600 | 11.9890 |")
    # the two simclr seeds are one configuration: final loss and wall time get mean ± std like any metric
    means = build_comparison(pretrain_sweep).mean_rows
    simclr = next(r for r in means if r["method"] == "simclr")
    assert simclr["n_seeds"] == 2 and simclr["final_loss_mean"] == pytest.approx((3.7371 + 3.5) / 2)
    assert simclr["wall_time_s_mean"] == pytest.approx((3.06 + 2.5) / 2)
    assert "## Mean ± std over seeds" in markdown and "final_loss" in markdown.split("## Mean")[1]


def test_downstream_rows_keep_their_columns(tmp_path):
    root = tmp_path / "multirun"
    run = root / "0_linear"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"task": "linear", "method": "simclr", "backbone": "resnet15",
                                                  "dataset": "lens_sim", "wall_time_s": 9.5,
                                                  "test": {"accuracy": 0.9, "f1_macro": 0.8, "auc": 0.95}}))
    columns, rows = build_table(root)
    assert columns[8:] == DOWNSTREAM  # a downstream run's wall time is not a pretraining column
    _run(root, "1_pretrain_simclr", "simclr", 0, 2.0, 1.5, 50.0)
    columns, rows = build_table(root)
    assert columns[8:] == [*DOWNSTREAM[:-1], "final_loss", "wall_time_s", "images_per_s"]
    linear = next(r for r in rows if r["run"] == "0_linear")
    assert linear["accuracy"] == 0.9 and linear["final_loss"] is None and linear["wall_time_s"] is None


@pytest.mark.slow
def test_a_real_pretraining_multirun_fills_comparison_md(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "method=simclr,barlow", *TINY, *tiny_data("lens_sim", cache_dir),
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(sweep / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))  # written when the multirun ends
    assert len(rows) == 2
    for row in rows:
        summary = json.loads((sweep / row["run"] / "summary.json").read_text())
        for key in ("final_loss", "wall_time_s", "images_per_s"):
            assert summary[key] is not None and float(row[key]) == pytest.approx(summary[key], rel=1e-12)
        line = next(x for x in (sweep / "comparison.md").read_text().splitlines() if x.startswith(f"| {row['run']} |"))
        assert line.endswith(f"| {summary['final_loss']:.4f} | {summary['wall_time_s']:.4f} | "
                             f"{summary['images_per_s']:.4f} |")
        assert (sweep / row["run"] / "curves.png").stat().st_size > 0
