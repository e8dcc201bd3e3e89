"""DINO: the loss against hand-computed values, centring, multi-crop views and refusals, the EMA teacher, a tiny
learnable run without collapse, CLI pretraining with multi-crop on 1 and 8 channels, and an exact resume."""
from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY, compose_cfg, run_cli, tiny_data
from test_methods_more import OPTIM, LossRecorder, TinyEncoder, fit

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import Augment
from ssl_lab.backbones import build_backbone
from ssl_lab.errors import ConfigError
from ssl_lab.losses import dino_loss
from ssl_lab.methods.dino import DINO, teacher_temp_at
from ssl_lab.methods.momentum import cosine_tau
from ssl_lab.tasks import pretrain

MINIMAL = {"resized_crop": {"scale": [0.5, 1.0]}, "hflip": {"p": 0.5}}


def tiny_dino(ops=MINIMAL, backbone=None, size=16, **kw):
    kw = {"out_dim": 64, "proj_hidden_dims": [64], "proj_output_dim": 32, **kw}
    return DINO("dino", backbone or TinyEncoder(), Augment("test", ops, size=size), OPTIM, **kw)


# ---------------------------------------------------------------------------------------------------------- loss
def test_dino_loss_matches_a_hand_computed_value_and_skips_same_view_pairs():
    # Two global views + one local view, one sample, two prototypes. In "probability space" (after centring and
    # temperature) teacher 0 is [3/4, 1/4], teacher 1 [1/2, 1/2]; students 0, 1, 2 are [1/2, 1/2], [3/4, 1/4],
    # [1/4, 3/4]. Raw logits undo a centre and the temperatures, so all three are exercised.
    ln3 = math.log(3.0)
    center = torch.tensor([1.0, -2.0])
    t_temp, s_temp = 0.25, 0.5
    teacher = [torch.tensor([[ln3, 0.0]]) * t_temp + center, torch.tensor([[0.0, 0.0]]) * t_temp + center]
    student = [torch.tensor([[0.0, 0.0]]) * s_temp, torch.tensor([[ln3, 0.0]]) * s_temp,
               torch.tensor([[0.0, ln3]]) * s_temp]
    teacher = [t.requires_grad_() for t in teacher]
    student = [s.requires_grad_() for s in student]

    def ce(p, q):
        return -sum(pi * math.log(qi) for pi, qi in zip(p, q))

    t_p = [(0.75, 0.25), (0.5, 0.5)]
    s_p = [(0.5, 0.5), (0.75, 0.25), (0.25, 0.75)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher i, student j), i != j
    expected = sum(ce(t_p[i], s_p[j]) for i, j in pairs) / len(pairs)

    loss = dino_loss(student, teacher, center, student_temp=s_temp, teacher_temp=t_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with_same_view = (expected * 4 + ce(t_p[0], s_p[0]) + ce(t_p[1], s_p[1])) / 6
    assert loss.item() != pytest.approx(with_same_view, rel=1e-3)  # the (i, i) pairs really are left out

    loss.backward()
    assert all(t.grad is None for t in teacher)  # the teacher is a target only
    # Student 0's only partner is teacher 1 and student 1's is teacher 0, each already its target: no gradient.
    # Student 2 (local) pairs with both teachers and disagrees with them.
    assert [s.grad.abs().sum().item() > 1e-6 for s in student] == [False, False, True]


def test_dino_loss_is_averaged_over_the_batch_and_rejects_bad_input():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(5, 7, generator=g) for _ in range(3)]
    t = [torch.randn(5, 7, generator=g) for _ in range(2)]
    c = torch.zeros(7)
    per_sample = [dino_loss([x[i:i + 1] for x in s], [x[i:i + 1] for x in t], c) for i in range(5)]
    torch.testing.assert_close(dino_loss(s, t, c), torch.stack(per_sample).mean())
    with pytest.raises(ValueError, match="same shape"):
        dino_loss([s[0], s[1][:, :3]], t, c)
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match="temperatures"):
        dino_loss(s, t, c, teacher_temp=0.0)


# ------------------------------------------------------------------------------------------------------ centring
def test_centre_moves_by_the_ema_rule_after_the_loss_and_is_checkpointed():
    torch.manual_seed(0)
    model = tiny_dino(center_momentum=0.8).train()
    old = torch.randn(1, 64)
    model.center.copy_(old)
    views = model.make_views(torch.rand(8, 1, 16, 16), torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = model.teacher_head(model.teacher_backbone(torch.cat(views[:2])))  # BN in train mode: same output
        student = model.head(model.backbone(torch.cat(views)))
        before = dino_loss(list(student.chunk(2)), list(teacher.chunk(2)), old, 0.1, 0.04)

    loss, terms = model.loss(views)
    torch.testing.assert_close(loss, before)  # the loss used the centre from before the update
    torch.testing.assert_close(model.center, 0.8 * old + 0.2 * teacher.mean(0, keepdim=True))
    assert terms == {} and model.scheduled_values()["teacher_temp"] == pytest.approx(0.04)  # logged, not a term

    assert "center" in model.state_dict()
    fresh = tiny_dino()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.center, model.center)  # a resumed run continues from the same centre

    model.eval()
    kept = model.center.clone()
    model.loss(views)
    assert torch.equal(model.center, kept)  # evaluating the loss outside training leaves it alone


# ---------------------------------------------------------------------------------------------------- multi-crop
def test_multi_crop_views_have_global_and_local_sizes_and_are_deterministic():
    model = tiny_dino(n_local_crops=3)
    x = torch.rand(4, 1, 16, 16)
    views = model.make_views(x, torch.Generator().manual_seed(1))
    assert [v.shape for v in views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 7, 7)] * 3  # round(16 * 3 / 7) = 7
    again = model.make_views(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = model.make_views(x, torch.Generator().manual_seed(2))
    assert not torch.equal(views[2], other[2])
    assert [v.shape[-1] for v in tiny_dino(n_local_crops=1, local_size=10).make_views(
        x, torch.Generator().manual_seed(1))] == [16, 16, 10]

    loss, _ = model.train().loss(views)  # the local views take a second backbone pass at their own size
    assert torch.isfinite(loss)


def test_global_crop_scale_overrides_the_presets_crops():
    ops = {"resized_crop": {"scale": [0.3, 0.5], "ratio": [1.0, 1.0]}}
    x = torch.rand(4, 1, 16, 16)
    full = tiny_dino(ops, global_crop_scale=[1.0, 1.0]).make_views(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(full[0], x)  # whole-image square crops at the input size: the image itself
    preset = tiny_dino(ops).make_views(x, torch.Generator().manual_seed(0))
    assert (preset[0] - x).abs().max() > 0.05


def test_multi_crop_refusals_name_the_option():
    with pytest.raises(ConfigError, match=r"method\.n_local_crops=2 .*resized_crop"):
        tiny_dino({"hflip": {}}, n_local_crops=2)
    with pytest.raises(ConfigError, match=r"method\.global_crop_scale"):
        tiny_dino({"hflip": {}}, global_crop_scale=[0.4, 1.0])
    with pytest.raises(ConfigError, match=r"method\.local_size=20 is larger than the 16 px"):
        tiny_dino(n_local_crops=2, local_size=20)
    with pytest.raises(ConfigError, match=r"method\.local_crop_scale"):
        tiny_dino(n_local_crops=2, local_crop_scale=[0.5, 0.1])
    with pytest.raises(ConfigError, match=r"method\.n_local_crops"):
        tiny_dino(n_local_crops=-1)
    vit = build_backbone("vit_tiny", in_chans=1, image_size=16, depth=1)
    with pytest.raises(ConfigError, match=r"\+backbone\.dynamic_img_size=true"):
        tiny_dino(backbone=vit, n_local_crops=2)
    vgg = build_backbone("vgg11", in_chans=1, image_size=32)
    with pytest.raises(ConfigError, match=r"too small for vgg11"):
        tiny_dino(backbone=vgg, size=32, n_local_crops=2)


def test_multi_crop_with_a_dynamic_size_vit_uses_whole_patches():
    vit = build_backbone("vit_tiny", in_chans=1, image_size=32, depth=1, dynamic_img_size=True)
    model = tiny_dino(backbone=vit, size=32, n_local_crops=2)
    assert model.local_view_size(32) == 16  # 3/7 of 32 px, rounded to whole 8 px patches
    with pytest.raises(ConfigError, match=r"method\.local_size=12 is not a multiple .* patch size 8"):
        tiny_dino(backbone=vit, size=32, n_local_crops=2, local_size=12)
    views = model.make_views(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    loss, _ = model.train().loss(views)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------- teacher, schedule
def test_teacher_follows_the_ema_rule_and_is_not_optimised():
    pl.seed_everything(0)
    model = tiny_dino(base_tau=0.9, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=2, freeze_last_layer=1)
    teacher_old = model.teacher_backbone[0].weight.detach().clone()
    last_old = model.head.last_layer.weight.detach().clone()
    assert torch.equal(teacher_old, model.backbone[0].weight)  # the teacher starts as a copy
    trainer = fit(model, steps=1)

    tau = cosine_tau(0, 1, 0.9)
    assert model.tau == pytest.approx(0.9)
    online_new = model.backbone[0].weight.detach()
    assert not torch.equal(online_new, teacher_old)
    torch.testing.assert_close(model.teacher_backbone[0].weight, tau * teacher_old + (1 - tau) * online_new)
    assert torch.equal(model.head.last_layer.weight, last_old)  # prototypes frozen during the first epoch

    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    assert teacher and not any(p.requires_grad or id(p) in optimised for p in teacher)
    assert id(model.backbone[0].weight) in optimised and id(model.head.last_layer.weight) in optimised
    assert any(k.startswith("teacher_head.") for k in model.state_dict())

    # 64 images in batches of 32: one step is half an epoch of the 2-epoch teacher-temperature warmup.
    assert model.epochs_done() == pytest.approx(0.5)
    assert model.current_teacher_temp() == pytest.approx(0.02 + (0.04 - 0.02) * 0.25)


def test_teacher_temperature_schedule():
    assert teacher_temp_at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temp_at(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temp_at(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temp_at(100, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temp_at(0, 0.04, 0.07, 0) == pytest.approx(0.07)  # no warmup


def test_head_prototypes_have_unit_norm_and_bottleneck_is_normalised():
    model = tiny_dino()
    with torch.no_grad():
        model.head.last_layer.weight.mul_(5.0)  # the norm of the stored weights does not matter
        feats = model.backbone.eval()(torch.rand(3, 1, 16, 16))
        z = model.head.eval().bottleneck(feats)
        logits = model.head(feats)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    w = torch.nn.functional.normalize(model.head.last_layer.weight, dim=1)
    torch.testing.assert_close(logits, z @ w.T)
    assert logits.abs().max() <= 1.0 + 1e-5  # cosine similarities


# ------------------------------------------------------------------------------------------------------ learning
def patterns(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny learnable problem: 4 noisy 16 px patterns (row stripes, column stripes, a grid, a blob) whose class
    survives the crops and flips. Uniform noise images (test_methods_more.images) give DINO's teacher nothing to
    tell apart, so its centred output is flat whatever the student does."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    bases = torch.stack([torch.sin(1.2 * yy), torch.sin(1.2 * xx), torch.sin(1.2 * yy) * torch.sin(1.2 * xx),
                         torch.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 20)])
    labels = torch.arange(n) % 4
    return bases[labels, None] + 0.3 * torch.randn(n, 1, 16, 16, generator=g), labels


def test_loss_falls_without_collapse():
    pl.seed_everything(0)
    # A 30-step run: base_tau 0.9 lets the teacher move within it; BN in the head (DINO's option for ResNets)
    # makes the tiny head learn in that many steps.
    model = tiny_dino(n_local_crops=2, freeze_last_layer=1, base_tau=0.9, head_norm="bn")
    last_old = model.head.last_layer.weight.detach().clone()
    recorder = LossRecorder()
    x, labels = patterns()
    loader = torch.utils.data.DataLoader([{"x": xi} for xi in x], batch_size=32, shuffle=True, drop_last=True)
    pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[recorder]).fit(model, loader)
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < 0.7 * first, recorder.losses
    assert not torch.equal(model.head.last_layer.weight, last_old)  # trained after the frozen first epoch

    model.eval()
    with torch.no_grad():
        feats = model.backbone(x)
        z = model.head.bottleneck(feats)
        winners = model.head(feats).argmax(dim=1)
    # Not collapsed: the images spread over several prototypes, each pattern mostly on its own one.
    per_class = [winners[labels == k].mode().values.item() for k in range(4)]
    assert len(set(per_class)) >= 2, per_class
    purity = sum((winners[labels == k] == per_class[k]).float().mean().item() for k in range(4)) / 4
    assert purity > 0.8, (purity, winners.tolist())
    std = z.std(0).mean().item()  # unit vectors spread over D dims: about 1/sqrt(D); collapsed: ~0
    assert std > 0.2 / z.shape[1] ** 0.5, std


# ----------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize("dataset,chans", [("lens_sim", 1), ("jets_sim", 8)])
def test_dino_multi_crop_pretrains_through_the_cli(tmp_path, cache_dir, dataset, chans):
    data = tiny_data(dataset, cache_dir)
    pre = tmp_path / "pre"
    out = run_cli([*TINY, *data, "method=dino", "method.out_dim=64", "method.n_local_crops=2", f"run_dir={pre}"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = load_backbone_file(pre / "backbone.pt")["meta"]
    assert (meta["in_chans"], meta["method"], meta["dataset"], meta["view_size"]) == (chans, "dino", dataset, 32)
    header = (pre / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert all(col in header for col in ("train/loss_step", "train/tau", "train/teacher_temp"))
    if dataset != "lens_sim":
        return
    lin = tmp_path / "linear"
    out = run_cli([*TINY, *data, "task=linear", "task.max_epochs=1", "+trainer.limit_val_batches=1",
                   f"pretrained={pre}", f"run_dir={lin}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((lin / "metrics.json").read_text())
    assert metrics["method"] == "dino" and metrics["pretrained"].endswith("backbone.pt")


@pytest.mark.slow
def test_resumed_multi_crop_run_matches_uninterrupted_run(tmp_path, cache_dir):
    # The centre (a buffer), the teacher, the teacher-temperature warmup (1.5 of 2 epochs) and the frozen
    # prototypes of epoch 0 must all continue exactly after a resume at the epoch boundary.
    def cfg(run_dir, *extra):
        return compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), "trainer.max_epochs=2", "method=dino",
                            "method.out_dim=64", "method.n_local_crops=2", "method.warmup_teacher_temp=0.02",
                            "method.warmup_teacher_temp_epochs=1.5", f"run_dir={run_dir}", *extra])

    whole = pretrain(cfg(tmp_path / "whole"))
    first = pretrain(cfg(tmp_path / "split", "+callbacks.stop._target_=test_resume.StopAfterEpoch"))
    second = pretrain(cfg(tmp_path / "split", "resume=auto"))
    assert (whole["global_step"], first["global_step"], second["global_step"]) == (4, 2, 4)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {"center", "teacher_head.last_layer.weight"} <= a.keys() and a.keys() == b.keys()
    assert a["center"].abs().sum() > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
