"""task.lr_find=true: Lightning's lr range test picks the head lr of a downstream run (ssl_lab.tasks.lr_range)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import ssl_lab.tasks.finetune as finetune
from conftest import TINY, compose_cfg, run_cli, tiny_data
from ssl_lab.errors import ConfigError
from ssl_lab.tasks import TASKS
from ssl_lab.tasks.lr_range import JSON, check_lr_find, range_test

STEPS = 16  # the fewest that leave Lightning's suggestion a few points (it skips the first 10 and the last one)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_range_test_sets_the_suggested_lrs_and_leaves_the_weights_as_they_were(tmp_path, cache_dir, monkeypatch):
    seen: dict = {"range_steps": [], "val_or_test_reads": 0}
    original_model, original_fit, original_range_test = finetune.Downstream, finetune.fit, finetune.range_test

    def build(**kw):  # the run's model, its initial weights, and the lrs of every param group at every step
        model = original_model(**kw)
        seen["model"], seen["initial"] = model, _state(model)
        train_step = model.training_step

        def step(batch, batch_idx):
            if any(type(cb).__name__ == "_LRCallback" for cb in model.trainer.callbacks):  # the range test
                groups = model.trainer.optimizers[0].param_groups
                backbone = {id(p) for p in model.backbone.parameters()}
                seen["range_steps"].append(([g["lr"] for g in groups if id(g["params"][0]) not in backbone],
                                            [g["lr"] for g in groups if id(g["params"][0]) in backbone]))
                seen["moved"] = any(not torch.equal(v, seen["initial"][k]) for k, v in model.state_dict().items())
            return train_step(batch, batch_idx)
        model.training_step = step
        return model

    def spy_range_test(trainer, model, datamodule, *args):  # the range test reads neither val nor test batches
        def refused(*_a, **_k):
            seen["val_or_test_reads"] += 1
            raise AssertionError("the range test read a val or test batch")
        datamodule.val_dataloader = datamodule.test_dataloader = refused
        try:
            return original_range_test(trainer, model, datamodule, *args)
        finally:
            del datamodule.val_dataloader, datamodule.test_dataloader  # the class's own again

    def spy_fit(trainer, model, *args):
        seen["at_fit"] = _state(model)
        original_fit(trainer, model, *args)
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        backbone = {id(p) for p in model.backbone.parameters()}
        seen["trained"] = [(id(g["params"][0]) in backbone, base)
                           for g, base in zip(trainer.optimizers[0].param_groups, scheduler.base_lrs)]

    monkeypatch.setattr(finetune, "Downstream", build)
    monkeypatch.setattr(finetune, "fit", spy_fit)
    monkeypatch.setattr(finetune, "range_test", spy_range_test)
    run_dir = tmp_path / "ft"
    summary = TASKS["finetune"](compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), "task=finetune",
                                             "pretrained=random", "task.max_epochs=1", "task.lr_find=true",
                                             f"task.lr_find_steps={STEPS}", f"run_dir={run_dir}"]))
    found = json.loads((run_dir / JSON).read_text())
    suggestion = found["suggestion"]
    assert math.isfinite(suggestion) and found["lrs"][0] <= suggestion <= found["lrs"][-1]
    assert len(found["lrs"]) == len(found["losses"]) == found["steps"] > 10 and found["data"] == "train split"
    assert found["configured"] == {"head_lr": 1e-3, "backbone_lr": 1e-4}
    assert summary["lr_find"]["applied"] == found["applied"]
    assert found["applied"]["head_lr"] == suggestion
    assert found["applied"]["backbone_lr"] == pytest.approx(suggestion * 0.1, rel=1e-12)  # the ratio of the config
    # the run trained with those lrs: the schedule's base lr of every param group
    assert {base for is_backbone, base in seen["trained"] if not is_backbone} == {suggestion}
    assert {base for is_backbone, base in seen["trained"] if is_backbone} == {found["applied"]["backbone_lr"]}
    # during the test the head lr rose and the backbone's stayed at 0.1 x the head's
    heads = [h[0] for h, _ in seen["range_steps"]]
    assert len(heads) == found["steps"] and heads == sorted(heads) and heads[-1] > 100 * heads[0]
    for head, backbone in seen["range_steps"]:
        assert len(set(head)) == 1 and backbone and all(b == pytest.approx(head[0] * 0.1) for b in backbone)
    # the test moved the weights; training started from the initial ones (BatchNorm statistics included)
    assert seen["moved"] and seen["val_or_test_reads"] == 0
    assert seen["at_fit"].keys() == seen["initial"].keys()
    for key, value in seen["initial"].items():
        assert torch.equal(seen["at_fit"][key], value), key
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["lr_find"]["suggestion"] == suggestion
    assert (run_dir / "lr_find.png").stat().st_size > 0 and "lr_find.png" in (run_dir / "report.md").read_text()
    assert not list(run_dir.glob(".lr_find_*.ckpt"))  # Lightning's copy of the initial state is gone


def test_linear_refuses_lr_find_in_one_line(tmp_path, cache_dir):
    run_dir = tmp_path / "lin"
    out = run_cli([*TINY, *tiny_data("lens_sim", cache_dir), "task=linear", "pretrained=random",
                   "task.lr_find=true", f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ssl_lab: error: task.lr_find=true: task=linear"), out.stderr
    assert "task.lrs" in lines[0] and "task=finetune" in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("task, instead", [("evaluate", "task=finetune"), ("pretrain", "optim.lr"),
                                           ("pipeline", "task.finetune.lr_find=true")])
def test_tasks_without_a_range_test_refuse_it(task, instead):
    with pytest.raises(ConfigError, match=f"task={task} has no learning-rate range test") as err:
        check_lr_find(compose_cfg([f"task={task}", "task.lr_find=true"]).task)
    assert instead in str(err.value)
    check_lr_find(compose_cfg([f"task={task}"]).task)  # the default (false, or no key) is fine


def test_range_test_settings_are_checked():
    task = compose_cfg(["task=joint", "task.lr_find=true"]).task
    check_lr_find(task)
    for override, named in [("task.lr_find_steps=5", "task.lr_find_steps=5"),
                            ("task.lr_find_range=[1.0,0.1]", "task.lr_find_range"),
                            ("task.lr_find=maybe", "task.lr_find='maybe'")]:
        with pytest.raises(ConfigError, match="must be") as err:
            check_lr_find(compose_cfg(["task=joint", "task.lr_find=true", override]).task)
        assert named in str(err.value)


def test_a_resumed_run_keeps_the_lrs_its_range_test_applied(tmp_path):
    task = compose_cfg(["task=finetune", "task.lr_find=true"]).task
    model = SimpleNamespace(head_lr=1e-3, backbone_lr=1e-4, freeze_backbone=False)
    with pytest.raises(ConfigError, match="lr_find.json is missing"):
        range_test(None, model, None, tmp_path, task, ckpt_path="last.ckpt")
    saved = {"suggestion": 0.02, "ratio": 0.1, "steps": 40, "plot": "lr_find.png",
             "configured": {"head_lr": 1e-3, "backbone_lr": 1e-4},
             "applied": {"head_lr": 0.02, "backbone_lr": 0.002}}
    (tmp_path / JSON).write_text(json.dumps({**saved, "lrs": [], "losses": []}))
    assert range_test(None, model, None, tmp_path, task, ckpt_path="last.ckpt") == saved  # no Trainer needed
    assert (model.head_lr, model.backbone_lr) == (0.02, 0.002)
    assert range_test(None, model, None, tmp_path, compose_cfg(["task=finetune"]).task) is None
