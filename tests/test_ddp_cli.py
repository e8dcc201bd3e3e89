"""A short pretraining with two DDP processes on the CPU (gloo), through the CLI."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import TINY, run_cli, tiny_data
from ssl_lab.artifacts import load_backbone_file

DDP_CPU = ["accelerator=ddp", "accelerator.accelerator=cpu", "accelerator.devices=2",
           "accelerator.precision=32-true", "accelerator.sync_batchnorm=false"]


@pytest.mark.slow
def test_two_process_ddp_pretraining_through_the_cli(tmp_path, cache_dir):
    # 18 training images, 4 per rank and step: 2 steps of a global batch of 8 in the one epoch.
    run_dir = tmp_path / "run"
    # With the linear rule and a base batch of 4, the global batch of 8 doubles the learning rate.
    args = [*TINY, *tiny_data("lens_sim", cache_dir), *DDP_CPU, "method=barlow", "dataset.batch_size=4",
            "trainer.limit_train_batches=null", "optim.lr=0.001", "optim.schedule=constant",
            "optim.lr_scaling=linear", "optim.base_batch_size=4",
            "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor", f"run_dir={run_dir}"]
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2  # 18 images // (2 ranks x 4), the short batch dropped on each rank
    assert summary["final_loss"] is not None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["accelerator"]["strategy"] == "ddp" and saved["accelerator"]["devices"] == 2
    scale = {"world_size": 2, "global_batch_size": 8, "lr_scaling": "linear", "base_batch_size": 4,
             "base_lr": 0.001, "lr": 0.002}
    assert saved["scale"] == scale and summary["scale"] == scale
    rows = list(csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open()))
    used = {float(v) for r in rows for k, v in r.items() if k.startswith("lr-Adam") and v}  # one per group
    assert used == {0.002}  # the optimizer really ran with the scaled rate
    assert load_backbone_file(run_dir)["meta"]["method"] == "barlow"
    # One set of outputs, written by rank zero only.
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]


def test_torchrun_without_a_shared_run_dir_is_refused(tmp_path):
    # torchrun sets these in every rank; each would otherwise resolve ${now} into its own run directory.
    out = run_cli(["accelerator=cpu"], cwd=tmp_path, env={"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"})
    assert out.returncode == 2 and "run_dir=" in out.stderr and "torchrun" in out.stderr
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # nothing written, not even a log
