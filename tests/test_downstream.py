"""Downstream tasks on tiny data: heads, learning rates per group, metrics and reports, errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, run_cli, tiny_data
from ssl_lab.augment import Augment
from ssl_lab.backbones import build_backbone
from ssl_lab.cli import run_or_exit
from ssl_lab.downstream import Downstream
from ssl_lab.errors import ConfigError
from ssl_lab.model_file import load_model_file
from ssl_lab.tasks import TASKS
from ssl_lab.tasks.common import labelled_datamodule

SHORT = ["task.max_epochs=1", "+trainer.limit_val_batches=1"]


def _module(**kw) -> Downstream:
    backbone = build_backbone("resnet15", in_chans=2, image_size=16)
    args = dict(backbone=backbone, augment=Augment("minimal", {"hflip": {}}, n_views=1), objective="joint",
                num_classes=3, target_names=["m", "pT"], optim={"name": "adam", "weight_decay": 0.0},
                backbone_lr=1e-5, head_lr=1e-4)
    return Downstream(**{**args, **kw})


def test_differential_learning_rates_reach_the_optimizer():
    model = _module()
    model._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = model.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model.backbone.parameters()} == {1e-5}
    assert {lr_of[id(p)] for p in model.head.parameters()} == {1e-4}
    assert len(lr_of) == len(list(model.parameters()))


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics():
    model = _module(objective="classification", freeze_backbone=True, backbone_lr=0.0, head_lr=0.1)
    model._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = model.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head[0].weight.clone()
    model.train()
    assert not model.backbone.training  # BatchNorm must not update its running statistics
    logits, reg = model(torch.randn(4, 2, 16, 16))
    assert reg is None and logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.head[0].weight, head_before)


def test_regression_predictions_come_back_in_original_units():
    mean, std = torch.tensor([100.0, 500.0]), torch.tensor([10.0, 50.0])
    model = _module(target_mean=mean, target_std=std).eval()
    batch = {"view": torch.randn(3, 2, 16, 16), "y": torch.tensor([0, 1, 2]), "targets": torch.zeros(3, 2)}
    _, reg = model(batch["view"])
    torch.testing.assert_close(model.predict(batch)["pred"], reg * std + mean)


def test_conv_mlp_head_is_the_vgg_baseline_head():
    backbone = build_backbone("vgg11", in_chans=8, image_size=96)
    model = _module(backbone=backbone, head="conv_mlp", objective="joint", dropout=0.5)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 3 * 3, 4096), (4096, 4096), (4096, 5)]
    assert [m.p for m in model.head if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    logits, reg = model.eval()(torch.randn(2, 8, 96, 96))
    assert logits.shape == (2, 3) and reg.shape == (2, 2)
    with pytest.raises(ConfigError, match="task.dropout=0.5 applies to head=conv_mlp only"):
        _module(head="linear", dropout=0.5)


@pytest.fixture(scope="module")
def lens_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    TASKS["pretrain"](compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), f"run_dir={run_dir}"]))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear", "finetune"])
def test_linear_and_finetune_write_metrics_plots_and_report(tmp_path, cache_dir, lens_run, task):
    run_dir = tmp_path / task
    fast = ["accelerator.channels_last=true"] if task == "finetune" else []  # the speed options apply downstream
    epochs = ["task.max_epochs=2"] if task == "finetune" else ["task.lrs=[0.1,1.0]", "task.weight_decays=[0]"]
    summary = TASKS[task](compose_cfg([*TINY, *SHORT, *tiny_data("lens_sim", cache_dir), f"task={task}",
                                       f"pretrained={lens_run}", f"run_dir={run_dir}", *fast, *epochs]))
    assert summary["speed"]["channels_last"] is bool(fast) and summary["speed"]["compiled"] == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pretrained"].endswith("backbone.pt") and metrics["method"] == "simclr"
    test = metrics["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and len(test["confusion_matrix"]) == 3
    assert sum(map(sum, test["confusion_matrix"])) == summary["data_n_test"]
    for name in ("report.md", "confusion_matrix.png", "roc.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert "confusion_matrix.png" in (run_dir / "report.md").read_text()
    logged = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "result/test.accuracy" in logged[0]  # the test metrics reach the logger too
    # model.pt, loaded on its own, gives back exactly the test predictions the run reported
    model = load_model_file(run_dir)
    data = labelled_datamodule(compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir)]))
    batch = [data.test_set[i] for i in range(len(data.test_set))]
    with torch.no_grad():
        pred = model(torch.stack([b["x"] for b in batch]))["probs"].argmax(1)
    y = torch.stack([b["y"] for b in batch])
    confusion = [[int(((y == i) & (pred == j)).sum()) for j in range(3)] for i in range(3)]
    assert confusion == test["confusion_matrix"] and model.class_names == data.class_names
    if task == "finetune":  # the weights scored are the best val epoch's (checkpoints/best.ckpt), not the last's
        best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
        assert summary["selected"]["epoch"] == best["epoch"] and summary["selected"]["rule"] == "best val/acc (max)"
        for key, value in model.backbone.state_dict().items():
            torch.testing.assert_close(value, best["state_dict"][f"backbone.{key}"], rtol=0, atol=0)
    else:
        assert set(metrics["probe"]) >= {"lr", "weight_decay", "val_accuracy"} and metrics["knn"]["k20"] >= 0


def test_restoring_the_best_checkpoint_loads_its_weights(tmp_path):
    from ssl_lab.checkpoint_io import HEADER
    from ssl_lab.tasks.finetune import _restore_best

    model = _module(objective="classification")
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2", "epoch": 3,
                HEADER: model.checkpoint_header()}, path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    best = SimpleNamespace(best_model_path=str(path), monitor="val/acc", mode="max", best_model_score=torch.tensor(0.5))
    selected = _restore_best(model, best)
    assert selected["epoch"] == 3 and selected["value"] == 0.5
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert _restore_best(model, None) == {"rule": "last epoch", "reason": "no val split"}


@pytest.mark.slow
def test_joint_reports_regression_per_target(tmp_path, cache_dir):
    run_dir = tmp_path / "joint"
    TASKS["joint"](compose_cfg([*TINY, *SHORT, *tiny_data("jets_sim", cache_dir), "task=joint",
                                "pretrained=random", f"run_dir={run_dir}"]))
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert set(test["regression"]) == {"m", "pT"}
    assert all(set(v) >= {"mse", "mae", "r2"} for v in test["regression"].values())
    assert "accuracy" in test and (run_dir / "pred_vs_true.png").is_file()


@pytest.mark.slow
def test_supervised_vgg_baseline_with_large_head(tmp_path, cache_dir):
    run_dir = tmp_path / "vgg"
    summary = TASKS["supervised"](compose_cfg([*TINY, *SHORT, *tiny_data("jets_sim", cache_dir), "task=supervised",
                                               "backbone=vgg11", "task.head=conv_mlp", "task.dropout=0.5",
                                               "task.objective=joint",
                                               f"run_dir={run_dir}"]))
    assert summary["pretrained"] is None and set(summary["test"]["regression"]) == {"m", "pT"}


@pytest.mark.slow
def test_evaluate_reports_knn_probe_and_clusters(tmp_path, cache_dir, lens_run):
    run_dir = tmp_path / "eval"
    TASKS["evaluate"](compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), "task=evaluate", "task.knn_k=[3,200]",
                                   f"pretrained={lens_run}", f"run_dir={run_dir}"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    knn = metrics["knn"]
    assert 0.0 <= knn["k3"] <= 1.0 and knn["temperature"] == 0.07
    assert knn["clipped"] == {"k200": knn["n_train"]}  # fewer training images than k: the k used is recorded
    assert {"ari", "nmi"} <= set(metrics["kmeans"]) and "accuracy" in metrics["probe"]
    assert (run_dir / "embedding_pca.png").is_file() and (run_dir / "embedding_tsne.png").is_file()


def _fails(overrides, run_dir, capsys) -> str:
    with pytest.raises(SystemExit):
        run_or_exit(compose_cfg([*TINY, *SHORT, *overrides, f"run_dir={run_dir}"]))
    return capsys.readouterr().err


def test_downstream_errors_name_the_fix(tmp_path, cache_dir, lens_run, capsys):
    lens = tiny_data("lens_sim", cache_dir)
    err = _fails([*lens, "task=linear"], tmp_path / "a", capsys)
    assert "pretrained=<" in err and "pretrained=random" in err
    err = _fails([*lens, "task=linear", f"pretrained={lens_run}", "backbone=resnet18"], tmp_path / "b", capsys)
    assert "resnet15" in err and "backbone=resnet15" in err
    err = _fails([*tiny_data("jets_sim", cache_dir), "task=linear", f"pretrained={lens_run}"], tmp_path / "c", capsys)
    assert "1-channel" in err and "8" in err
    err = _fails([*lens, "task=joint", "pretrained=random"], tmp_path / "d", capsys)
    assert "regression targets" in err and "dataset.target_keys" in err
    err = _fails([*lens, "task=finetune", f"pretrained={lens_run}", "task.early_stopping=0"], tmp_path / "e", capsys)
    assert "task.early_stopping=0" in err and not (tmp_path / "e" / "config.yaml").exists()
    err = _fails([*lens, "task=linear", f"pretrained={lens_run}", "task.lrs=[0.1,fast]"], tmp_path / "f", capsys)
    assert "task.lrs=" in err and "holds 'fast', which must be a number > 0" in err  # ssl_lab.schema
    for task in ("linear", "finetune"):  # another split_seed puts pretraining images into the test split
        err = _fails([*lens, f"task={task}", f"pretrained={lens_run}", "dataset.split_seed=1"], tmp_path / task, capsys)
        assert "test images" in err and "dataset.split_seed=0" in err, err
        assert not (tmp_path / task / "config.yaml").exists()


@pytest.mark.slow
def test_pipeline_through_the_cli_and_its_comparison_table(tmp_path, cache_dir):
    run_dir = tmp_path / "pipe"
    stages = [f"task.{s}.max_epochs=1" for s in ("linear", "finetune", "joint")]
    out = run_cli(["task=pipeline", *TINY, *tiny_data("jets_sim", cache_dir), *stages, "+trainer.limit_val_batches=1",
                   "task.evaluate.knn_k=3", f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("pretrain", "linear", "finetune", "joint", "evaluate"):
        assert (run_dir / stage / ("summary.json" if stage == "pretrain" else "metrics.json")).is_file(), stage
        assert f"]({stage}/report.md)" in (run_dir / "report.md").read_text()
        assert (run_dir / stage / "report.md").is_file(), stage
    assert (run_dir / "pretrain" / "curves.png").is_file()
    table = subprocess.run([sys.executable, "-m", "ssl_lab.compare", str(run_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader((run_dir / "comparison.csv").open()))
    tasks = sorted(r["task"] for r in rows)
    assert tasks == ["evaluate", "finetune", "joint", "linear", "pretrain"]
    joint = next(r for r in rows if r["task"] == "joint")
    assert joint["mse_m"] and joint["mse_pT"] and joint["accuracy"] and joint["images_per_s"]
    assert json.loads((run_dir / "pipeline.json").read_text())["stages"] == [
        "pretrain", "linear", "finetune", "joint", "evaluate"]


@pytest.mark.slow
def test_jets_preset_compares_methods_and_the_vgg_baseline_in_one_command(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "experiment=jets_compare", *TINY, *tiny_data("jets_sim", cache_dir), "augment.size=32",
                   "task.joint.max_epochs=1", "task.supervised.max_epochs=1", "+trainer.limit_val_batches=1",
                   "task.evaluate.knn_k=3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    joint = {r["method"]: r for r in rows if r["task"] == "joint"}
    assert set(joint) == {"simclr", "barlow"} and all(r["mse_m"] and r["accuracy"] for r in joint.values())
    scratch = [r for r in rows if r["task"] == "supervised"]
    assert {(r["method"], r["backbone"]) for r in scratch} == {("scratch", "vgg11")} and scratch[0]["mse_pT"]
    assert "| joint | barlow |" in (sweep / "comparison.md").read_text()
