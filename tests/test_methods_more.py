"""BYOL, SimSiam, VICReg and MoCo v3: CLI pretraining on 1 and 8 channels, the EMA rule, and a collapse check."""
from __future__ import annotations

import json
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_cli, tiny_data
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import Augment
from ssl_lab.methods.byol import BYOL
from ssl_lab.methods.mocov3 import MoCoV3
from ssl_lab.methods.momentum import cosine_tau
from ssl_lab.methods.simsiam import SimSiam
from ssl_lab.methods.vicreg import VICReg

NEW = ("byol", "simsiam", "vicreg", "mocov3")
OPTIM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"}


@pytest.mark.slow
@pytest.mark.parametrize("dataset,chans", [("lens_sim", 1), ("jets_sim", 8)])
def test_new_methods_pretrain_through_the_cli(tmp_path, cache_dir, dataset, chans):
    # One multirun per dataset: the three methods share a process start. Predictors keep their default widths
    # (cheap next to a 16-wide projection).
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", f"method={','.join(NEW)}", *TINY, *tiny_data(dataset, cache_dir),
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, method in enumerate(NEW):
        run_dir = next(sweep.glob(f"{i}_pretrain_{method}_*"))
        meta = load_backbone_file(run_dir / "backbone.pt")["meta"]
        assert (meta["in_chans"], meta["method"], meta["dataset"]) == (chans, method, dataset)
        header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert "train/loss_step" in header
        if method == "vicreg":
            assert all(f"train/{t}_step" in header for t in ("invariance", "variance", "covariance"))
        if method in ("byol", "mocov3"):
            assert "train/tau" in header
    if dataset != "lens_sim":
        return
    # Each exported backbone is read by a downstream task: one multirun of linear probes over the four runs.
    runs = ",".join(str(next(sweep.glob(f"{i}_pretrain_{m}_*"))) for i, m in enumerate(NEW))
    probes = tmp_path / "probes"
    out = run_cli(["-m", "task=linear", "task.max_epochs=1", "+trainer.limit_val_batches=1", f"pretrained={runs}",
                   *TINY, *tiny_data(dataset, cache_dir), f"hydra.sweep.dir={probes}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    done = [json.loads(p.read_text()) for p in sorted(probes.glob("*/metrics.json"))]
    assert sorted(m["method"] for m in done) == sorted(NEW)


class TinyEncoder(torch.nn.Sequential):
    """Two conv layers: the methods only need `num_features`, and a ResNet-15 step costs seconds on 2 CPU cores."""

    def __init__(self, num_features: int = 32):
        super().__init__(torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                         torch.nn.Conv2d(16, num_features, 3, stride=2, padding=1, bias=False),
                         torch.nn.BatchNorm2d(num_features), torch.nn.ReLU(),
                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.num_features = num_features


def tiny_method(cls, **kw):
    backbone = TinyEncoder()
    augment = Augment("minimal", {"resized_crop": {"scale": [0.5, 1.0]}, "hflip": {"p": 0.5}}, size=16)
    return cls(cls.__name__.lower(), backbone, augment, OPTIM, proj_hidden_dims=[64], proj_output_dim=32, **kw)


def images(n: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 16, 16, generator=g)
    return [{"x": xi} for xi in x]


def fit(model, steps: int, batch_size: int = 32, callbacks=()) -> None:
    loader = torch.utils.data.DataLoader(images(), batch_size=batch_size, shuffle=True, drop_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, loader)
    return trainer


@pytest.mark.parametrize("cls,prefix", [(BYOL, "target_"), (MoCoV3, "momentum_")], ids=["byol", "mocov3"])
def test_target_follows_the_ema_rule_and_is_not_optimised(cls, prefix):
    pl.seed_everything(0)
    model = tiny_method(cls, pred_hidden_dims=[64], base_tau=0.9)
    pairs = model.momentum_pairs()
    assert [online for online, _ in pairs] == [model.backbone, model.projector]
    target_old = [p.detach().clone() for _, target in pairs for p in target.parameters()]
    online_old = [p.detach().clone() for online, _ in pairs for p in online.parameters()]
    assert all(torch.equal(t, o) for t, o in zip(target_old, online_old))  # each target starts as a copy
    trainer = fit(model, steps=1)

    tau = cosine_tau(0, 1, 0.9)
    assert tau == pytest.approx(0.9) and model.tau == pytest.approx(0.9)  # the first update uses base_tau
    online_new = [p.detach() for online, _ in pairs for p in online.parameters()]
    target_new = [p.detach() for _, target in pairs for p in target.parameters()]
    assert not torch.equal(online_new[0], online_old[0])  # the step moved the online network
    for new, old, online in zip(target_new, target_old, online_new):
        torch.testing.assert_close(new, tau * old + (1 - tau) * online)

    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    targets = [p for _, target in pairs for p in target.parameters()]
    assert targets and not any(p.requires_grad or id(p) in optimised for p in targets)
    assert id(model.backbone[0].weight) in optimised and id(model.predictor[0].weight) in optimised
    # The targets are in the checkpointed state_dict, so a resumed run continues from them.
    assert any(k.startswith(f"{prefix}backbone.") for k in model.state_dict())


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_tau(500, 100, 0.99) == pytest.approx(1.0)  # held after the end


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("cls,kw", [(BYOL, {"pred_hidden_dims": [64]}), (SimSiam, {"pred_hidden_dims": [16]}),
                                    (VICReg, {}), (MoCoV3, {"pred_hidden_dims": [64]})],
                         ids=["byol", "simsiam", "vicreg", "mocov3"])
def test_loss_falls_without_collapse(cls, kw):
    pl.seed_everything(0)
    model = tiny_method(cls, **kw)
    recorder = LossRecorder()
    fit(model, steps=30, callbacks=[recorder])
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first, recorder.losses

    model.eval()
    with torch.no_grad():
        x = torch.stack([d["x"] for d in images()])
        z = F.normalize(model.projector(model.backbone(x)), dim=1)
    # Collapsed embeddings have per-dimension std ~0; spread-out unit vectors in D dims have about 1/sqrt(D).
    std = z.std(0).mean().item()
    assert std > 0.2 / z.shape[1] ** 0.5, std
