"""Comparison tables over seeds: kNN@k columns, the seed column, which runs form one configuration, mean ± std."""
from __future__ import annotations

import copy
import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose_cfg
from ssl_lab.errors import DataError
from ssl_lab.evaluation.compare import MEAN_CSV, build_comparison, main, write_comparison
from ssl_lab.evaluation.seed_groups import config_ids, mean_cell, strip_job_prefix
from ssl_lab.hydra_callbacks import CompareOnMultirunEnd
from ssl_lab.tasks.common import save_config

SEEDS = (0, 1, 2)
# per configuration (lr) and seed: linear accuracy, evaluate's kNN@20, kNN@200 and probe accuracy
VALUES = {0.001: {0: (0.91, 0.80, 0.75, 0.88), 1: (0.93, 0.82, 0.74, 0.90), 2: (0.90, 0.85, 0.77, 0.86)},
          0.01: {0: (0.70, 0.61, 0.55, 0.66), 1: (0.74, 0.60, 0.58, 0.69), 2: (0.69, 0.66, 0.52, 0.60)}}
SPEED = {0: 800.0, 1: 812.0, 2: 790.0}


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))


def _config(seed: int, run_dir: Path, task: str, lr: float = 0.001, temperature: float = 0.1,
            pretrained: str | None = None, sim_seed: int = 0) -> dict:
    """A resolved config.yaml as save_config writes it: seed copied into method.seed / dataset.seed, run_name in
    the wandb logger, a hand-pinned dataset.sim_seed."""
    run_name = f"2024-05-0{seed + 1}_12-00-0{seed}-00000{seed}_pipeline_simclr_lens_sim"
    return {"seed": seed, "run_name": run_name, "run_dir": str(run_dir), "resume": None, "pretrained": pretrained,
            "task": {"name": task, "max_epochs": 2},
            "method": {"name": "simclr", "temperature": temperature, "seed": seed},
            "backbone": {"name": "resnet18", "in_chans": 1},
            "dataset": {"name": "lens_sim", "sim_seed": sim_seed, "label_fraction": 1.0, "seed": seed,
                        "num_workers": 0},
            "optim": {"name": "adam", "lr": lr, "warmup_epochs": 0},
            "logger": {"wandb": {"project": "ssl_lab", "run_name": run_name}}}


def _ident(task: str) -> dict:
    return {"task": task, "method": "simclr", "backbone": "resnet18", "dataset": "lens_sim"}


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """multirun over lr x seed of task=pipeline (pretrain/ linear/ evaluate/ stages), plus three old-style
    evaluate runs without config.yaml (knn_accuracy with knn_k)."""
    root = tmp_path / "multirun"
    job = 0
    for lr, by_seed in VALUES.items():
        for seed in SEEDS:
            run = root / f"{job}_pipeline_simclr_resnet18_lens_sim"
            job += 1
            acc, k20, k200, probe = by_seed[seed]
            pre = run / "pretrain"
            _dump(pre / "config.yaml", _config(seed, pre, "pretrain", lr))
            _dump(pre / "summary.json", {**_ident("pretrain"), "images_per_s": SPEED[seed]})
            for stage in ("linear", "evaluate"):
                _dump(run / stage / "config.yaml", _config(seed, run / stage, stage, lr, pretrained=str(pre)))
            auc = None if (lr, seed) == (0.01, 2) else acc - 0.05  # one seed without AUC: n=2 for that cell
            _dump(run / "linear" / "metrics.json", {**_ident("linear"), "label_fraction": 1.0,
                                                    "pretrained": str(pre / "backbone.pt"),
                                                    "test": {"accuracy": acc, "f1_macro": acc - 0.1, "auc": auc}})
            _dump(run / "evaluate" / "metrics.json", {
                **_ident("evaluate"), "pretrained": str(pre / "backbone.pt"), "probe": {"accuracy": probe},
                "knn": {"k20": k20, "k200": k200, "temperature": 0.07}})
    old = {"7_evaluate_barlow": (0.6, 20), "8_evaluate_barlow": (0.64, None), "9_evaluate_byol": (0.5, 5)}
    for name, (acc, k) in old.items():
        metrics = {**_ident("evaluate"), "method": name.split("_")[-1], "knn_accuracy": acc,
                   "probe": {"accuracy": acc + 0.1}}
        if k is not None:
            metrics["knn_k"] = k
        _dump(root / name / "metrics.json", metrics)
    return root


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values)


def test_knn_columns_by_k_with_old_runs_as_their_knn_k(sweep):
    c = build_comparison(sweep)
    assert c.columns == ["run", "task", "method", "backbone", "dataset", "label_fraction", "seed", "config",
                         "accuracy", "f1_macro", "auc", "knn5_acc", "knn20_acc", "knn200_acc", "probe_acc",
                         "images_per_s"]  # sorted by k as a number, not as text; no knn_acc any more
    by_run = {r["run"]: r for r in c.rows}
    evaluate = by_run["4_pipeline_simclr_resnet18_lens_sim/evaluate"]
    assert (evaluate["seed"], evaluate["knn20_acc"], evaluate["knn200_acc"]) == (1, 0.60, 0.58)
    assert evaluate["probe_acc"] == 0.69 and evaluate["knn5_acc"] is None and evaluate["images_per_s"] == 812.0
    assert by_run["7_evaluate_barlow"]["knn20_acc"] == 0.6 and by_run["7_evaluate_barlow"]["knn5_acc"] is None
    assert by_run["8_evaluate_barlow"]["knn20_acc"] == 0.64  # no knn_k: the old default, 20
    assert by_run["9_evaluate_byol"]["knn5_acc"] == 0.5 and by_run["9_evaluate_byol"]["knn20_acc"] is None
    assert by_run["9_evaluate_byol"]["seed"] is None and by_run["9_evaluate_byol"]["probe_acc"] == 0.6
    assert by_run["1_pipeline_simclr_resnet18_lens_sim/pretrain"]["seed"] == 1


def test_seeds_of_one_configuration_group_and_nothing_else_does(sweep):
    c = build_comparison(sweep)
    groups: dict[str, list[str]] = {}
    for row in c.rows:
        groups.setdefault(row["config"], []).append(row["run"])
    expected = [[f"{job}_pipeline_simclr_resnet18_lens_sim/{stage}" for job in jobs]
                for jobs in ((0, 1, 2), (3, 4, 5)) for stage in ("evaluate", "linear", "pretrain")]
    expected += [["7_evaluate_barlow", "8_evaluate_barlow"], ["9_evaluate_byol"]]  # no config: identity columns
    assert sorted(groups.values()) == sorted(expected)
    assert [(r["path"], r["n_seeds"], r["seeds"]) for r in c.mean_rows][:3] == [
        ("pipeline_simclr_resnet18_lens_sim/evaluate", 3, "0,1,2"),
        ("pipeline_simclr_resnet18_lens_sim/linear", 3, "0,1,2"),
        ("pipeline_simclr_resnet18_lens_sim/pretrain", 3, "0,1,2")]
    assert len({r["config"] for r in c.mean_rows}) == len(c.mean_rows) == 8


def test_means_and_sample_stds_per_configuration(sweep):
    c = build_comparison(sweep)
    rows = {(r["task"], r["method"], r["config"]): r for r in c.mean_rows}
    by_run = {r["run"]: r["config"] for r in c.rows}
    for job, lr in ((0, 0.001), (3, 0.01)):
        key = by_run[f"{job}_pipeline_simclr_resnet18_lens_sim/linear"]
        linear = rows[("linear", "simclr", key)]
        acc = [VALUES[lr][s][0] for s in SEEDS]
        assert (linear["accuracy_mean"], linear["accuracy_std"], linear["accuracy_n"]) == pytest.approx(
            (*_mean_std(acc), 3), rel=1e-12)
        assert linear["f1_macro_mean"] == pytest.approx(statistics.mean(a - 0.1 for a in acc), rel=1e-12)
        assert linear["images_per_s_mean"] == pytest.approx(statistics.mean(SPEED.values()), rel=1e-12)
        assert linear["images_per_s_std"] == pytest.approx(statistics.stdev(SPEED.values()), rel=1e-12)
        evaluate = rows[("evaluate", "simclr", by_run[f"{job}_pipeline_simclr_resnet18_lens_sim/evaluate"])]
        for column, i in (("knn20_acc", 1), ("knn200_acc", 2), ("probe_acc", 3)):
            values = [VALUES[lr][s][i] for s in SEEDS]
            assert (evaluate[f"{column}_mean"], evaluate[f"{column}_std"]) == pytest.approx(_mean_std(values),
                                                                                           rel=1e-12)
        assert evaluate["accuracy_mean"] is None and evaluate["accuracy_n"] == 0
    auc = [VALUES[0.01][s][0] - 0.05 for s in (0, 1)]  # seed 2 has no AUC
    low = rows[("linear", "simclr", by_run["3_pipeline_simclr_resnet18_lens_sim/linear"])]
    assert (low["auc_mean"], low["auc_std"], low["auc_n"], low["n_seeds"]) == pytest.approx((*_mean_std(auc), 2, 3))
    old = next(r for r in c.mean_rows if r["path"] == "evaluate_barlow")
    assert (old["knn20_acc_mean"], old["knn20_acc_std"], old["n_seeds"], old["seeds"]) == pytest.approx(
        (*_mean_std([0.6, 0.64]), 2, None))
    single = next(r for r in c.mean_rows if r["path"] == "evaluate_byol")
    assert (single["knn5_acc_mean"], single["knn5_acc_std"], single["knn5_acc_n"]) == (0.5, None, 1)


def test_written_files_and_markdown(sweep, tmp_path):
    csv_path, md_path, markdown = write_comparison(sweep, tmp_path / "out")
    assert md_path.read_text() == markdown
    with open(csv_path, newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 21 and runs[0]["seed"] == "0" and runs[-1]["seed"] == ""
    with open(tmp_path / "out" / MEAN_CSV, newline="") as fh:
        means = list(csv.DictReader(fh))
    assert list(means[0])[:9] == ["config", "path", "task", "method", "backbone", "dataset", "label_fraction",
                                  "n_seeds", "seeds"]
    assert {"knn20_acc_mean", "knn20_acc_std", "knn200_acc_mean", "probe_acc_std"} <= set(means[0])
    linear = next(r for r in means if r["path"].endswith("/linear") and r["n_seeds"] == "3")
    acc_mean, acc_std = _mean_std([VALUES[0.001][s][0] for s in SEEDS])
    assert float(linear["accuracy_mean"]) == pytest.approx(acc_mean, rel=1e-12)
    assert float(linear["accuracy_std"]) == pytest.approx(acc_std, rel=1e-12) and linear["auc_n"] == "3"

    per_run, mean_part = markdown.split("## Mean ± std over seeds")
    assert len(per_run.strip().splitlines()) == 2 + 21
    lines = mean_part.strip().splitlines()
    assert lines[2].startswith("| config | path | task | method | backbone | dataset | label_fraction | seeds | "
                               "accuracy |")
    row = next(line for line in lines if f"| {linear['config']} |" in line)
    assert f"| {acc_mean:.3f} ± {acc_std:.3f} (n=3) |" in row and "| 0,1,2 |" in row
    k5 = next(line for line in lines if "| evaluate_byol |" in line)
    assert "| 0.500 (n=1) |" in k5 and "±" not in k5  # one run: no std


def test_cell_format():
    assert mean_cell(0.9123, 0.0041, 3) == "0.912 ± 0.004 (n=3)"
    assert mean_cell(0.5, None, 1) == "0.500 (n=1)"
    assert mean_cell(None, None, 0) is None
    assert mean_cell(0.00012, 0.00003, 2) == "1.20e-04 ± 3.00e-05 (n=2)"  # not 0.000 ± 0.000


def test_job_number_and_timestamp_prefixes_are_not_identity():
    assert strip_job_prefix("12_pipeline_simclr/linear") == "pipeline_simclr/linear"
    assert strip_job_prefix("3/finetune") == "finetune"
    assert strip_job_prefix("2024-05-01_12-00-00-123456_pretrain_simclr_lens_sim") == "pretrain_simclr_lens_sim"
    assert strip_job_prefix("multirun/2024-05-01_12-00-00-1/0_x/linear") == "multirun/x/linear"
    assert strip_job_prefix("linear") == "linear" and strip_job_prefix(".") == ""


def _ids(configs, pretrained=None, runs=None):
    rows = [{"run": run, **_ident("linear"), "label_fraction": 1.0} for run in runs or ["0_x"] * len(configs)]
    return config_ids(rows, configs, pretrained or [None] * len(configs))


def test_seed_copies_group_while_pinned_or_swept_seed_like_values_split(tmp_path):
    base = [_config(s, tmp_path / str(s), "linear") for s in SEEDS]
    assert len(set(_ids(base))) == 1  # method.seed, dataset.seed, run_name / run_dir copies follow the seed
    pinned = copy.deepcopy(base)
    for config in pinned:
        config["dataset"]["seed"] = 0  # the split pinned by hand, only the initialisation varies
    assert len(set(_ids(pinned))) == 1
    crossed = [_config(s, tmp_path / f"{s}_{sim}", "linear", sim_seed=sim) for sim in (0, 1) for s in SEEDS]
    ids = _ids(crossed)  # a sweep over dataset.sim_seed: the run with sim_seed == seed is not a seed copy
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    ids = _ids([*base, _config(1, tmp_path / "lr", "linear", lr=0.01)])
    assert len(set(ids[:3])) == 1 and ids[3] != ids[0]
    stages = _ids(base[:2], runs=["0_x/linear", "1_x/finetune"])
    assert stages[0] != stages[1]  # same config, different stage folders


def test_downstream_runs_group_by_their_pretraining_config_not_its_path(tmp_path):
    pre = {(t, s): _config(s, tmp_path / f"pre_{t}_{s}", "pretrain", temperature=t) for t in (0.1, 0.5) for s in SEEDS}
    down = [_config(s, tmp_path / f"lin_{t}_{s}", "linear", pretrained=str(tmp_path / f"pre_{t}_{s}"))
            for t in (0.1, 0.5) for s in SEEDS]
    ids = _ids(down, pretrained=[pre[(t, s)] for t in (0.1, 0.5) for s in SEEDS])
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    assert len(set(_ids(down[:3]))) == 1  # pretraining configs not found: the seed's path alone does not split
    random = copy.deepcopy(down[0])
    random["pretrained"] = "random"
    assert len(set(_ids([down[0], random], pretrained=[pre[(0.1, 0)], None]))) == 2


def test_bad_knn_k_names_the_run(sweep):
    bad = sweep / "9_evaluate_byol" / "metrics.json"
    bad.write_text(json.dumps({**_ident("evaluate"), "knn_accuracy": 0.5, "knn_k": "twenty"}))
    with pytest.raises(DataError, match=r"9_evaluate_byol: knn_k='twenty' is not a positive integer"):
        build_comparison(sweep)
    assert main([str(sweep)]) == 2


def test_multirun_callback_writes_all_three_files(sweep, capsys):
    CompareOnMultirunEnd().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "comparison.csv").is_file() and (sweep / MEAN_CSV).is_file()
    assert "## Mean ± std over seeds" in (sweep / "comparison.md").read_text()
    assert str(sweep / MEAN_CSV) in capsys.readouterr().out


def test_real_saved_configs_of_a_seed_sweep_group(tmp_path):
    """The shipped conf/ through save_config: every value that follows the seed or names the run is recognised."""
    root = tmp_path / "sweep"
    jobs = [("pretrain", 0, "optim.lr=0.001"), ("pretrain", 1, "optim.lr=0.001"), ("pretrain", 0, "optim.lr=0.01")]
    jobs += [("linear", 0, "optim.lr=0.001"), ("linear", 1, "optim.lr=0.001")]
    for job, (task, seed, lr) in enumerate(jobs):
        run = root / f"{job}_{task}_simclr_resnet18_lens_sim"
        extra = [f"pretrained={root / f'{seed}_pretrain_simclr_resnet18_lens_sim'}"] if task == "linear" else []
        save_config(compose_cfg([f"task={task}", f"seed={seed}", lr, "logger=wandb", *extra]), run, "32-true")
        _dump(run / "metrics.json", _ident(task))
    keys = [r["config"] for r in build_comparison(root).rows]
    assert keys[0] == keys[1] and keys[3] == keys[4]
    assert len(set(keys)) == 3  # the pretraining lr=0.01 run is a configuration of its own
