"""A short pretraining with two DDP processes on the CPU (gloo), through the CLI."""
from __future__ import annotations

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
    args = [*TINY, *tiny_data("lens_sim", cache_dir), *DDP_CPU, "method=barlow", "dataset.batch_size=4",
            "trainer.limit_train_batches=null", f"run_dir={run_dir}"]
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2  # 18 images // (2 ranks x 4), the short batch dropped on each rank
    assert summary["final_loss"] is not None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["accelerator"]["strategy"] == "ddp" and saved["accelerator"]["devices"] == 2
    assert load_backbone_file(run_dir)["meta"]["method"] == "barlow"
    # One set of outputs, written by rank zero only.
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
