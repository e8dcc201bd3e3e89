"""A few pretraining steps per method x a 1-channel and an 8-channel dataset, through the real CLI."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, run_cli, tiny_data
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.backbones import build_backbone

pytestmark = pytest.mark.slow

BARLOW = ["method.proj_hidden_dims=[32,32]"]


@pytest.mark.parametrize("method", ["simclr", "barlow"])
@pytest.mark.parametrize("dataset,chans", [("lens_sim", 1), ("jets_sim", 8)])
def test_pretrain_exports_a_loadable_backbone(tmp_path, cache_dir, method, dataset, chans):
    run_dir = tmp_path / "run"
    extra = BARLOW if method == "barlow" else []
    out = run_cli([f"method={method}", *TINY, *extra, *tiny_data(dataset, cache_dir), f"run_dir={run_dir}"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"outputs in {run_dir}" in out.stdout

    payload = load_backbone_file(run_dir)
    meta = payload["meta"]
    assert (meta["name"], meta["in_chans"], meta["method"], meta["dataset"]) == ("resnet15", chans, method, dataset)
    assert len(meta["norm"]["mean"]) == chans and all(s > 0 for s in meta["norm"]["std"])
    backbone = build_backbone("resnet15", in_chans=chans, image_size=meta["view_size"])
    backbone.load_state_dict(payload["state_dict"])
    assert backbone(torch.zeros(2, chans, 32, 32)).shape == (2, backbone.num_features)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["epochs"] == 1
    assert np.isfinite(summary["final_loss"]) and summary["images_per_s"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_step" in header
    if method == "barlow":
        assert "train/off_diag_step" in header


def test_pretrain_on_a_user_h5_file(tmp_path):
    path = tmp_path / "lenses.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["images"] = rng.random((40, 1, 32, 32), dtype=np.float32)
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, "dataset=lens_h5", f"dataset.path={path}", f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_backbone_file(run_dir / "backbone.pt")["meta"]["dataset"] == "lens_h5"


def test_multirun_makes_one_run_per_method(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "method=simclr,barlow", *TINY, *tiny_data("lens_sim", cache_dir),
                   "method.proj_hidden_dims=[32]", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep.glob("*/backbone.pt"))
    assert len(runs) == 2 and runs[0].startswith("0_pretrain_simclr") and runs[1].startswith("1_pretrain_barlow")
    table = (sweep / "comparison.csv").read_text().splitlines()  # written when the multirun ends
    assert len(table) == 3 and "images_per_s" in table[0]


def test_a_second_run_never_overwrites_the_first(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, *tiny_data("lens_sim", cache_dir), f"run_dir={run_dir}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    before = (run_dir / "backbone.pt").read_bytes()
    again = run_cli([*args, "seed=1"], cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "resume=auto" in again.stderr
    assert (run_dir / "backbone.pt").read_bytes() == before
