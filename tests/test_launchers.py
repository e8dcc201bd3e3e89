"""Sweeps through hydra-submitit-launcher: the SLURM preset's job shape, and a real sweep via submitit's local executor."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, TINY, run_cli, tiny_data


def test_slurm_preset_follows_the_accelerator():
    overrides = ["hydra/launcher=slurm", "accelerator=ddp", "accelerator.devices=4", "accelerator.num_nodes=2"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF), job_name="test"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    # One task per GPU, as Lightning's SLURM environment expects; requeue after a timeout or preemption.
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0


@pytest.mark.slow
def test_a_sweep_runs_as_submitit_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "hydra/launcher=submitit_local", "method=simclr,barlow", *TINY,
                   *tiny_data("lens_sim", cache_dir), f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in sweep.glob("*_pretrain_*"))
    assert [r.split("_")[2] for r in runs] == ["simclr", "barlow"]
    for run in runs:
        assert json.loads((sweep / run / "summary.json").read_text())["global_step"] == 2
    assert (sweep / ".submitit").is_dir() and (sweep / "comparison.csv").is_file()
