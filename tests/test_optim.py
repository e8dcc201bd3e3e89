"""Optimizers, LARS, parameter groups and schedules against hand-computed numbers."""

import math

import pytest
import torch
from torch import nn

from ssl_lab.backbones import build_backbone
from ssl_lab.errors import ConfigError
from ssl_lab.optim import LARS, build_optimizer, build_scheduler, param_groups, scale_lr, warmup_cosine


def test_warmup_cosine_known_steps():
    # total 110, warmup 10, floor 0.1: cosine spans steps 10..110 (100 steps).
    def f(s):
        return warmup_cosine(s, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)

    assert f(0) == pytest.approx(0.1)  # 1/10: the first step already learns
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 25% into the cosine
    assert f(60) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    assert warmup_cosine(0, 4, 0) == pytest.approx(1.0)
    assert warmup_cosine(2, 4, 0) == pytest.approx(0.5)


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_build_scheduler_drives_the_optimizer_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    lrs = _lrs(build_scheduler(opt, "constant", total_steps=10, warmup_steps=4), opt, 6)
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    opt = torch.optim.SGD([p], lr=2.0)
    lrs = _lrs(build_scheduler(opt, "cosine", total_steps=4, warmup_steps=0), opt, 5)
    assert lrs == pytest.approx([2.0, 2.0 * (1 + math.cos(math.pi / 4)) / 2, 1.0, 2.0 * (1 - math.cos(math.pi / 4)) / 2,
                                 0.0])


def test_scheduler_resumes_from_state_dict():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=20, warmup_steps=5, min_lr_ratio=0.2)
    _lrs(sched, opt, 7)
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", total_steps=20, warmup_steps=5, min_lr_ratio=0.2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert _lrs(sched2, opt2, 3) == pytest.approx(_lrs(sched, opt, 3))


def test_restored_scheduler_continues_bit_identically_with_the_same_plan():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4, weight_decay=0.05)
    sched = build_scheduler(opt, "cosine", total_steps=50, warmup_steps=5, min_lr_ratio=0.1)
    _lrs(sched, opt, 13)
    opt2 = torch.optim.AdamW([p], lr=3e-4, weight_decay=0.05)
    sched2 = build_scheduler(opt2, "cosine", total_steps=50, warmup_steps=5, min_lr_ratio=0.1)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # exact, not approximately
    assert _lrs(sched2, opt2, 10) == _lrs(sched, opt, 10)


def test_restored_scheduler_follows_the_plan_of_a_longer_run():
    """resume=extend: 10 planned steps all done (lr at the floor), then restored into a 30-step plan. torch's own
    LambdaLR restore would keep total_steps=10 and train every further step at lr 0."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    _lrs(sched, opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", total_steps=30, warmup_steps=2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    expect = [warmup_cosine(s, 30, 2) for s in range(10, 15)]
    assert _lrs(sched2, opt2, 5) == pytest.approx(expect)
    assert expect[0] > 0.5  # the stretched cosine is far from its end at step 10


def test_restored_scheduler_applies_this_runs_lr_and_weight_decay():
    """resume=force with a new optim.lr / weight_decay: the restored optimizer would keep the saved ones."""
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    opt = torch.optim.SGD([p], lr=1.0, weight_decay=1e-4, momentum=0.9)
    sched = build_scheduler(opt, "constant", total_steps=20)
    _lrs(sched, opt, 4)
    opt2 = torch.optim.SGD([p], lr=0.1, weight_decay=1e-3, momentum=0.9)
    sched2 = build_scheduler(opt2, "constant", total_steps=20)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 1.0 and opt2.param_groups[0]["weight_decay"] == 1e-4  # torch's restore
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt2.param_groups[0]["weight_decay"] == 1e-3
    assert sched2.last_epoch == sched.last_epoch  # the position is the checkpoint's
    assert "momentum_buffer" in opt2.state[p]  # and so is the optimizer's state


def test_scheduler_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="'step'.*cosine, constant"):
        build_scheduler(opt, "step", total_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps=10"):
        build_scheduler(opt, "cosine", total_steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        build_scheduler(opt, "cosine", total_steps=10, min_lr_ratio=1.5)


def test_lars_one_and_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, eta=0.02)
    g = torch.tensor([0.6, 0.8])  # ||g|| = 1
    w.grad, b.grad = g.clone(), torch.tensor([0.5, 0.5])
    opt.step()
    # trust = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; d = (g + 0.1 w) * trust = [0.9, 1.2] / 15 = [0.06, 0.08].
    assert w.tolist() == pytest.approx([3.0 - 0.5 * 0.06, 4.0 - 0.5 * 0.08], rel=1e-6)
    # Excluded group: plain SGD step, no trust ratio.
    assert b.tolist() == pytest.approx([1.0 - 0.25, -2.0 - 0.25], rel=1e-6)

    w.grad = g.clone()
    opt.step()
    # w1 = [2.97, 3.96], ||w1|| = 4.95; trust = 0.02 * 4.95 / (1 + 0.495); buf = 0.9 * [0.06, 0.08] + d2.
    trust = 0.02 * 4.95 / (1 + 0.1 * 4.95)
    d2 = [(0.6 + 0.1 * 2.97) * trust, (0.8 + 0.1 * 3.96) * trust]
    buf = [0.9 * 0.06 + d2[0], 0.9 * 0.08 + d2[1]]
    assert w.tolist() == pytest.approx([2.97 - 0.5 * buf[0], 3.96 - 0.5 * buf[1]], rel=1e-6)


def test_lars_zero_weight_falls_back_to_plain_step():
    w = nn.Parameter(torch.zeros(2))
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert w.tolist() == pytest.approx([-0.1, 0.1])


def test_param_groups_exclude_bias_and_norm():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.LayerNorm(2))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    net.append(frozen)
    groups = param_groups(net, weight_decay=0.05, lr=0.3)
    assert len(groups) == 2
    decay, no_decay = groups
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert decay["weight_decay"] == 0.05 and "lars_exclude" not in decay
    expected = {id(p) for p in (net[0].bias, net[1].weight, net[1].bias, net[2].bias, net[3].weight, net[3].bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    assert decay["lr"] == no_decay["lr"] == 0.3
    everything = param_groups(net, weight_decay=0.05, exclude_bias_and_norm=False)
    assert len(everything) == 1 and len(everything[0]["params"]) == 8 and "lr" not in everything[0]


def test_param_groups_respect_no_weight_decay_of_vit():
    vit = build_backbone("vit_tiny", 1, image_size=32)
    _, no_decay = param_groups(vit, weight_decay=0.05)
    ids = {id(p) for p in no_decay["params"]}
    assert id(vit.model.pos_embed) in ids and id(vit.model.cls_token) in ids


def test_group_weight_decay_overrides_default():
    net = nn.Linear(2, 2)
    opt = build_optimizer(param_groups(net, weight_decay=0.01), "adamw", lr=1e-3, weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    plain = build_optimizer(net.parameters(), "sgd", lr=0.1, weight_decay=0.5)
    assert plain.param_groups[0]["weight_decay"] == 0.5


@pytest.mark.parametrize(("name", "lr", "cls"), [("adam", 0.05, torch.optim.Adam), ("adamw", 0.05, torch.optim.AdamW),
                                                 ("sgd", 0.05, torch.optim.SGD), ("lars", 1.0, LARS)])
def test_every_optimizer_reduces_a_quadratic(name, lr, cls):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.7
    model = nn.Linear(4, 1)
    opt = build_optimizer(param_groups(model, 1e-4), name, lr=lr)
    assert type(opt) is cls
    initial = ((model(x) - y) ** 2).mean().item()
    for _ in range(100):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * initial


def test_optimizer_errors():
    with pytest.raises(ConfigError, match="'rmsprop'.*adam, adamw, sgd, lars"):
        build_optimizer([nn.Parameter(torch.zeros(1))], "rmsprop", lr=0.1)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], "sgd", lr=0.1)
    with pytest.raises(ConfigError, match="eta"):
        LARS([nn.Parameter(torch.zeros(1))], lr=0.1, eta=0.0)


@pytest.mark.parametrize("rule,batch,factor", [("none", 1024, 1.0), ("linear", 1024, 4.0), ("linear", 64, 0.25),
                                               ("sqrt", 1024, 2.0), ("sqrt", 64, 0.5)])
def test_scale_lr_rules(rule, batch, factor):
    optim = {"name": "lars", "lr": 0.3, "momentum": 0.9, "lr_scaling": rule, "base_batch_size": 256}
    cfg, record = scale_lr(optim, batch)
    assert cfg["lr"] == pytest.approx(0.3 * factor)
    assert "lr_scaling" not in cfg and "base_batch_size" not in cfg and cfg["momentum"] == 0.9  # ready for the optimizer
    assert record == {"global_batch_size": batch, "lr_scaling": rule, "base_batch_size": 256, "base_lr": 0.3,
                      "lr": pytest.approx(0.3 * factor)}
    assert optim["lr"] == 0.3  # the caller's config is left as it was


def test_scale_lr_errors():
    with pytest.raises(ConfigError, match="optim.lr_scaling='cubic'"):
        scale_lr({"lr": 0.1, "lr_scaling": "cubic"}, 256)
    with pytest.raises(ConfigError, match="optim.base_batch_size=0"):
        scale_lr({"lr": 0.1, "lr_scaling": "linear", "base_batch_size": 0}, 256)
