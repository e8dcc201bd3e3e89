"""Optuna sweeps: `python run.py -m hparams_search=<preset>` (conf/hparams_search/, ssl_lab.sweeps)."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY, run_cli, tiny_data
from ssl_lab.sweeps import optimized_value


def _hydra_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF), job_name="test"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.slow
def test_optuna_sweep_of_finetune_lrs_through_the_cli(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "hparams_search=finetune_lr", "pretrained=random", "hydra.sweeper.n_trials=2", *TINY,
                   *tiny_data("lens_sim", cache_dir), "task.max_epochs=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = sorted((p for p in sweep.iterdir() if (p / "metrics.json").is_file()),
                    key=lambda p: int(p.name.split("_", 1)[0]))
    assert [p.name for p in trials] == ["0_finetune_scratch_resnet15_lens_sim", "1_finetune_scratch_resnet15_lens_sim"]
    searched = ("task.head_lr", "task.backbone_lr", "optim.weight_decay")
    params, values = [], []
    for trial in trials:
        config = yaml.safe_load((trial / "config.yaml").read_text())
        assert config["task"]["name"] == "finetune" and config["optimized_metric"] == "selected.value"
        params.append({key: config[key.split(".")[0]][key.split(".")[1]] for key in searched})
        metrics = json.loads((trial / "metrics.json").read_text())
        assert metrics["selected"]["rule"] == "best val/acc (max)"  # what the preset's direction (maximize) fits
        values.append(metrics["selected"]["value"])
    assert params[0]["task.head_lr"] != params[1]["task.head_lr"]  # sampled, not the config's 1e-3
    assert params[0]["task.backbone_lr"] != params[1]["task.backbone_lr"]
    assert all(1e-5 <= p["task.head_lr"] <= 1e-1 and 1e-7 <= p["task.backbone_lr"] <= 1e-3 for p in params)
    best = values.index(max(values))  # Optuna keeps the first of equal values
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == values[best] and result["best_params"] == params[best]
    comparison = (sweep / "comparison.md").read_text()  # ssl_lab.hydra_callbacks.CompareOnMultirunEnd
    assert all(trial.name in comparison for trial in trials)
    assert "Directions: ['maximize']" in out.stdout + out.stderr


def test_the_preset_direction_follows_what_the_run_selects_by():
    assert _hydra_cfg(["hparams_search=finetune_lr"]).hydra.sweeper.direction == "maximize"  # val/acc
    joint = _hydra_cfg(["hparams_search=finetune_lr", "task=joint", "dataset=jets_sim"])
    assert joint.task.name == "joint" and joint.hydra.sweeper.direction == "minimize"  # val/loss
    cfg = _hydra_cfg(["hparams_search=finetune_lr"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.sampler.seed == 0
    assert set(cfg.hydra.sweeper.params) == {"task.head_lr", "task.backbone_lr", "optim.weight_decay"}


def test_optimized_metric_is_a_dotted_key_of_the_summary(capsys):
    summary = {"task": "finetune", "run_dir": "r", "selected": {"value": 0.75, "rule": "best val/acc (max)"},
               "test": {"accuracy": 0.5, "confusion_matrix": [[1]]}, "epochs": 3}
    assert optimized_value(summary, "selected.value") == 0.75
    assert optimized_value(summary, "epochs") == 3.0 and optimized_value(summary, None) is None
    with pytest.raises(SystemExit) as exit_info:
        optimized_value(summary, "test.acc")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ssl_lab: error: optimized_metric=test.acc is missing")
    assert "selected.value, test.accuracy, epochs" in err
