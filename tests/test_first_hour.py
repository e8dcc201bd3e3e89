"""What a new user meets first: defaults sized for the device, the stem chosen by its cost, runs named for what they
are, one length key, the first line and the time estimate, no doubled log lines, one call to load a model, the disk
a downstream run leaves, and W&B going online when a login exists."""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import TINY, compose_cfg, run_cli, tiny_data
from ssl_lab import load_backbone, load_model
from ssl_lab.backbones import SMALL_STEM_BUDGET_GFLOPS, choose_small_stem, forward_gflops
from ssl_lab.data.summary_table import data_table
from ssl_lab.hydra_callbacks import sweep_size
from ssl_lab.loggers import wandb_credentials, wandb_logger
from ssl_lab.resolvers import by_device, pretrained_method
from ssl_lab.tasks.length import apply_typed_length

# no projector options downstream; the length is typed as trainer.max_epochs (TINY's), which the task takes
DOWNSTREAM_TINY = [o for o in TINY if not o.startswith("method.")]


# ---- the stem, by its cost on the device ----

def test_small_stem_costs_sixteen_times_the_standard_one():
    small, standard = forward_gflops("resnet18", 1, True, 64), forward_gflops("resnet18", 1, False, 64)
    assert 14 < small / standard < 18  # 4x the pixels per side through every block
    assert forward_gflops("resnet18", 8, False, 64) > standard  # the stem's input channels count


@pytest.mark.parametrize("size,on_gpu,expected", [(64, False, False), (64, True, True), (16, False, True),
                                                  (96, True, False), (32, False, False)])
def test_auto_stem_follows_the_compute_budget_of_the_device(size, on_gpu, expected):
    small, why = choose_small_stem("resnet18", 1, size, on_gpu=on_gpu)
    assert small is expected
    if size <= 64:
        cost = forward_gflops("resnet18", 1, True, size)
        assert (cost <= SMALL_STEM_BUDGET_GFLOPS["gpu" if on_gpu else "cpu"]) is expected
        assert f"{cost:.2f} GFLOPs" in why


# ---- defaults by device, names, one length key ----

def test_defaults_are_sized_for_the_device():
    cpu = compose_cfg(["accelerator=cpu"])
    gpu = compose_cfg(["accelerator=gpu"])
    assert (cpu.trainer.max_epochs, cpu.dataset.batch_size) == (15, 64)
    assert (gpu.trainer.max_epochs, gpu.dataset.batch_size) == (100, 256)
    assert compose_cfg(["accelerator=gpu", "dataset=jets_sim"]).dataset.batch_size == 256
    assert by_device("auto", "g", "c") == ("g" if torch.cuda.is_available() else "c")
    assert compose_cfg(["accelerator=cpu", "trainer.max_epochs=3"]).trainer.max_epochs == 3  # still overridable


def test_run_names_say_which_method_trained_the_backbone(tmp_path):
    run = tmp_path / "pre"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "barlow"}}))
    assert pretrained_method(str(run), "simclr", "finetune") == "barlow"
    assert pretrained_method(None, "simclr", "supervised") == "scratch"
    assert pretrained_method("random", "simclr", "linear") == "scratch"
    assert pretrained_method(None, "byol", "pretrain") == "byol"
    assert pretrained_method(str(tmp_path / "missing"), "simclr", "linear") == "pretrained"
    cfg = compose_cfg(["task=joint", f"pretrained={run}", "backbone=resnet15", "dataset=jets_sim"])
    assert cfg.run_name.endswith("_joint_barlow_resnet15_jets_sim")
    assert compose_cfg(["task=supervised", "backbone=vgg11"]).run_name.endswith("_supervised_scratch_vgg11_lens_sim")


def test_trainer_max_epochs_sets_a_downstream_tasks_length(caplog):
    cfg = compose_cfg(["task=finetune", "trainer.max_epochs=3"])
    cfg, overrides = apply_typed_length(cfg, ["task=finetune", "trainer.max_epochs=3"])
    assert cfg.task.max_epochs == 3 and "task.max_epochs=3" in overrides
    cfg = compose_cfg(["task=linear", "trainer.max_epochs=3", "task.max_epochs=7"])
    with caplog.at_level(logging.WARNING):
        cfg, _ = apply_typed_length(cfg, ["trainer.max_epochs=3", "task.max_epochs=7"])
    assert cfg.task.max_epochs == 7
    assert "task.max_epochs=7 wins over trainer.max_epochs=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        apply_typed_length(compose_cfg(["task=linear"]), ["trainer.max_steps=5"])
    assert "trainer.max_steps=5 does not apply to task=linear" in caplog.text
    untouched = compose_cfg(["task=finetune", "trainer.max_epochs=3"])
    assert apply_typed_length(untouched, None)[0].task.max_epochs == 20  # Python callers set task.* themselves


def test_sweep_size_counts_the_jobs():
    def cfg(task, params=None, n_trials=None):
        return OmegaConf.create({"hydra": {"sweeper": {"params": params, **({"n_trials": n_trials} if n_trials
                                                                          else {})},
                                           "overrides": {"task": task}}})
    assert sweep_size(cfg(["method=simclr,barlow", "seed=0,1,2", "dataset=lens_sim"])) == 6
    assert sweep_size(cfg(["seed=0"], params={"method": "simclr,barlow,byol"})) == 3
    assert sweep_size(cfg(["seed=0"])) == 1
    assert sweep_size(cfg([], n_trials=20)) == 20
    assert sweep_size(cfg(["optim.lr=interval(0.1,1)"])) is None


def test_data_summary_is_a_short_table():
    table = data_table({"name": "lens_sim", "in_chans": 1, "image_shape": [64, 64], "n_train": 96, "n_val": 18,
                        "n_test": 24, "num_classes": 3, "class_names": ["none", "cdm", "axion"],
                        "target_names": ["m"], "labelled": True, "split_seed": 0, "path": "/d/lens.h5",
                        "mean": [0.1], "std": [0.2], "nan_pixels_replaced": 5})
    rows = {k.strip(): v for k, v in (line.split(" | ", 1) for line in table.splitlines())}
    assert rows["split"].strip() == "train 96, val 18, test 24 (split_seed 0)"
    assert rows["labels"].strip() == "3 classes: none, cdm, axion" and rows["targets"].strip() == "m"
    assert rows["source"].strip() == "/d/lens.h5" and "nan_pixels_replaced 5" in rows["non-finite"]


# ---- W&B ----

@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_wandb_goes_online_with_a_netrc_login(no_wandb_env, tmp_path, caplog):
    assert wandb_credentials() is None
    assert wandb_logger(tmp_path / "a")._offline
    no_wandb_env.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert wandb_credentials() == f"{no_wandb_env} (api.wandb.ai)"
    with caplog.at_level(logging.INFO):
        logger = wandb_logger(tmp_path / "b")
    assert not logger._offline
    assert "0123456789abcdef" not in caplog.text and "online, login from" in caplog.text


def test_wandb_netrc_for_another_host_or_offline_mode_stays_offline(no_wandb_env, tmp_path, monkeypatch):
    no_wandb_env.write_text("machine api.wandb.ai login user password k\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_credentials() is None  # a private server needs its own entry
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logger(tmp_path / "c")._offline


# ---- through the CLI ----

@pytest.mark.slow
def test_a_run_starts_with_its_plan_and_estimate_and_prints_each_line_once(tmp_path, cache_dir):
    run_dir = tmp_path / "pre"
    out = run_cli([*TINY, *tiny_data("lens_sim", cache_dir), "trainer.limit_train_batches=4",
                   "dataset.batch_size=4", f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first = [line for line in out.stdout.splitlines() if "steps planned" in line]
    assert len(first) == 1
    assert "pretrain | simclr | resnet15 | lens_sim | cpu 32-true | 4 steps planned (1 epochs x 4 batches)" in first[0]
    assert re.search(r"estimated time: \d+ s for 4 steps", out.stdout)
    records = [line for line in out.stdout.splitlines() if line.startswith("[20")]
    repeated = [line for line, n in Counter(line.split("] - ", 1)[-1] for line in records).items() if n > 1]
    assert not repeated and not any(line.startswith("INFO: ") for line in out.stdout.splitlines())
    log_text = (run_dir / "run.log").read_text()
    assert "backbone.small_stem=auto -> false" in log_text and "budget on the CPU" in log_text
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["backbone"]["small_stem"] is False  # what auto chose: a resume rebuilds the same stem anywhere

    net = load_backbone(run_dir)
    assert not net.training and net.header["method"] == "simclr" and net.small_stem is False
    x = torch.rand(3, 1, 32, 32)
    embed = load_backbone(run_dir / "backbone.pt", preprocess=True)
    mean, std = (torch.tensor(net.header["norm"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(embed(x), net((x - mean) / std))
    assert embed(x).shape == (3, net.num_features)


@pytest.mark.slow
def test_downstream_run_is_named_for_its_backbone_and_keeps_what_a_user_needs(tmp_path, cache_dir):
    data = tiny_data("lens_sim", cache_dir)
    out = run_cli(["task=finetune", "pretrained=random", *DOWNSTREAM_TINY, *data, "trainer.max_epochs=2"],
                  cwd=tmp_path)  # the last trainer.max_epochs wins, as in Hydra
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("_finetune_scratch_resnet15_lens_sim")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["task"]["max_epochs"] == 2  # trainer's key
    assert "max_epochs=2" in out.stdout and "(2 epochs x" in out.stdout
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert "state_dict" in best and "optimizer_states" not in best  # the best epoch's weights, a third the size
    assert "removed" in (run_dir / "run.log").read_text()
    model = load_model(run_dir)
    assert not model.training and model(torch.rand(2, 1, 32, 32))["probs"].shape == (2, 3)

    kept = tmp_path / "kept"
    out = run_cli(["task=finetune", "pretrained=random", *DOWNSTREAM_TINY, *data, "keep_last=true",
                   f"run_dir={kept}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (kept / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_every_job_of_a_multirun_knows_it_is_job_k_of_n(tmp_path, cache_dir):
    out = run_cli(["-m", *TINY, *tiny_data("lens_sim", cache_dir), "seed=0,1", f"hydra.sweep.dir={tmp_path}/s"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    firsts = [line for line in out.stdout.splitlines() if "steps planned" in line]
    assert [line.split("] - ")[1].split(" | ")[0] for line in firsts] == ["job 1/2", "job 2/2"]


def test_load_backbone_names_a_file_that_is_not_a_backbone(tmp_path):
    bad = tmp_path / "backbone.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot be read as a backbone file"):
        load_backbone(tmp_path)
    with pytest.raises(Exception, match="no such model file"):
        load_model(Path(tmp_path) / "nowhere")
