"""Rotation and blur pretext methods: loss, batched transforms, label layout, refusals, learning, and the CLI."""
from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY, compose_cfg, run_cli, tiny_data
from test_methods_more import LossRecorder, TinyEncoder

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import Augment, gaussian_blur
from ssl_lab.errors import ConfigError
from ssl_lab.losses import pretext_classification_loss
from ssl_lab.methods.blur import Blur
from ssl_lab.methods.rotation import Rotation
from ssl_lab.tasks import TASKS

OPTIM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"}
MINIMAL = {"resized_crop": {"scale": [0.5, 1.0]}, "hflip": {"p": 0.5}}


class SpyEncoder(torch.nn.Module):
    """Records what the backbone is fed; any channel count."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def build(cls, ops=None, backbone=None, **kw):
    augment = Augment("minimal", MINIMAL if ops is None else ops, size=16)
    return cls(cls.__name__.lower(), backbone or TinyEncoder(), augment, OPTIM, **{"head_hidden_dims": [32], **kw})


# ------------------------------------------------------------------------------------------------------ the loss
def test_pretext_loss_matches_hand_computed_cross_entropy_and_accuracy():
    # row 0: softmax (1/4, 3/4), label 1 -> -ln(3/4), correct; row 1: (3/4, 1/4), label 1 -> -ln(1/4), wrong
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], requires_grad=True)
    loss, terms = pretext_classification_loss(logits, torch.tensor([1, 1]))
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(4.0)) / 2, rel=1e-6)
    assert terms["acc"].item() == pytest.approx(0.5) and not terms["acc"].requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert pretext_classification_loss(logits.bfloat16(), torch.tensor([1, 1]))[0].dtype == torch.float32
    with pytest.raises(ValueError, match=r"logits must be \[N, K\] and labels \[N\]"):
        pretext_classification_loss(logits, torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="integer class indices"):
        pretext_classification_loss(logits, torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------- the transforms
@pytest.mark.parametrize("chans", [1, 8])
def test_rotation_turns_each_sample_by_its_label(chans):
    model = build(Rotation, backbone=SpyEncoder())
    x = torch.rand(6, chans, 5, 5)
    labels = torch.tensor([0, 1, 2, 3, 1, 3])
    out = model.transform(x, labels)
    for xi, oi, k in zip(x, out, labels.tolist()):
        assert torch.equal(oi, torch.rot90(xi, k, dims=(-2, -1)))


def test_blur_blurs_each_sample_by_its_level():
    model = build(Blur, sigmas=[0.0, 0.5, 2.0])
    assert model.kernel_size == 13  # 2 * ceil(3 * 2.0) + 1
    impulse = torch.zeros(1, 2, 31, 31)
    impulse[..., 15, 15] = 1.0
    x = torch.cat([impulse, torch.rand(3, 2, 31, 31)])
    labels = torch.tensor([2, 0, 1, 2])
    out = model.transform(x, labels)
    assert torch.equal(out[1], x[1])  # level 0 = the sharp view
    torch.testing.assert_close(out, gaussian_blur(x, torch.tensor([2.0, 0.0, 0.5, 2.0]), 13))
    # the centre of a blurred impulse is the squared peak of the normalised 1-d kernel (separable blur)
    peak = 1.0 / sum(math.exp(-0.5 * (k / 2.0) ** 2) for k in range(-6, 7))
    assert out[0, :, 15, 15].tolist() == pytest.approx([peak**2] * 2, rel=1e-5)
    def sharpness(t):
        return (t[..., 1:] - t[..., :-1]).pow(2).mean().item()
    assert sharpness(out[1]) > sharpness(out[2]) > sharpness(out[3])


# ------------------------------------------------------------------------------------------------ label layout
def test_mode_all_shows_every_image_in_all_turns():
    spy = SpyEncoder()
    model = build(Rotation, backbone=spy)  # mode all is the default
    assert model.pretext_labels(3, torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    x = torch.rand(3, 2, 8, 8)
    loss, terms = model.loss([x])
    (fed,) = spy.seen
    assert fed.shape == (12, 2, 8, 8) and set(terms) == {"acc"} and loss.ndim == 0
    for k in range(4):
        assert torch.equal(fed[3 * k:3 * (k + 1)], torch.rot90(x, k, dims=(-2, -1)))


def test_mode_random_draws_one_label_per_image_from_the_step_generator():
    spy = SpyEncoder()
    model = build(Blur, backbone=spy, sigmas=[0.0, 1.0, 2.0])  # mode random is the default
    cpu = torch.device("cpu")
    model.step_rng = torch.Generator().manual_seed(7)
    first = model.pretext_labels(64, cpu)
    model.step_rng = torch.Generator().manual_seed(7)
    assert torch.equal(first, model.pretext_labels(64, cpu))  # a resumed step draws the same labels
    model.step_rng = torch.Generator().manual_seed(8)
    assert not torch.equal(first, model.pretext_labels(64, cpu))
    assert first.shape == (64,) and set(first.tolist()) == {0, 1, 2}
    model.loss([torch.rand(5, 1, 8, 8)])
    assert spy.seen[-1].shape == (5, 1, 8, 8)  # one transformed copy per image
    views = model.make_views(torch.rand(5, 1, 20, 20), torch.Generator().manual_seed(0))
    assert len(views) == 1 and views[0].shape == (5, 1, 16, 16)


# --------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cls,op", [(Rotation, "rot90"), (Rotation, "vflip"), (Rotation, "rotate"), (Blur, "blur")])
def test_ops_that_make_the_label_ambiguous_are_refused(cls, op):
    with pytest.raises(ConfigError, match=rf"method={cls.__name__.lower()} cannot use .* with {op}.*~augment.ops.{op}"):
        build(cls, ops={**MINIMAL, op: {}})
    build(cls, ops={**MINIMAL, op: {"p": 0.0}})  # switched off: nothing to refuse


def test_rotation_accepts_hflip_and_blur_accepts_geometry():
    build(Rotation, ops={"hflip": {"p": 0.5}, "blur": {}})
    build(Blur, ops={"rot90": {}, "vflip": {}, "hflip": {}})


@pytest.mark.parametrize("sigmas", [[1.0], [0.5, 0.5], [-1.0, 1.0], [0.0, float("nan")], [0.0, True], "0.5", 2.0])
def test_bad_sigmas_are_refused(sigmas):
    with pytest.raises(ConfigError, match=r"method\.sigmas=.*method\.sigmas=\[0\.0,0\.5,1\.0,2\.0\]"):
        build(Blur, sigmas=sigmas)


def test_bad_mode_is_refused():
    with pytest.raises(ConfigError, match=r"method\.mode='every'.*all, random"):
        build(Rotation, mode="every")


# --------------------------------------------------------------------------------------------------- learning
def oriented_images(n: int, seed: int) -> torch.Tensor:
    """Noise over a top-to-bottom ramp: which way is up is learnable (and survives hflip); noise texture alone
    would not be, as white noise looks the same at every turn."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.0, 1.0, 16).view(1, 1, 16, 1)
    return 0.5 * torch.rand(n, 1, 16, 16, generator=g) + ramp


def noise_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def fit(model, x: torch.Tensor, steps: int = 30) -> list[float]:
    recorder = LossRecorder()
    loader = torch.utils.data.DataLoader([{"x": xi} for xi in x], batch_size=32, shuffle=True, drop_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(model, loader)
    return recorder.losses


@pytest.mark.parametrize("cls,make", [(Rotation, oriented_images), (Blur, noise_images)], ids=["rotation", "blur"])
def test_loss_falls_and_pretext_accuracy_beats_chance(cls, make):
    pl.seed_everything(0)
    model = build(cls)  # default mode and blur levels, crops and flips as augment=minimal
    losses = fit(model, make(64, seed=0))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses

    # Unseen images, views made as in training. BatchNorm stays in batch-statistics mode, as for train/acc: after 30
    # steps its running averages still carry ~4% of their init (var 1), far above the tiny encoder's feature variance.
    model.step_rng = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, terms = model.loss(model.make_views(make(256, seed=1), torch.Generator().manual_seed(2)))
    chance = 1.0 / model.num_transforms
    assert terms["acc"].item() > chance + 0.3, terms


# ----------------------------------------------------------------------------------------------------- the CLI
# TINY without the projector sizes (pretext methods have a classifier head instead), and one step per run.
PRETEXT_TINY = [o for o in TINY if not o.startswith(("method.proj_", "trainer.limit_train_batches"))]
PRETEXT_TINY += ["trainer.limit_train_batches=1", "augment=minimal",
                 "++method.head_hidden_dims=[32]"]  # ++: the sweep's base config (simclr) has no such key


@pytest.fixture(scope="module")
def lens_sweep(tmp_path_factory, cache_dir):
    return pretext_sweep(tmp_path_factory.mktemp("lens"), cache_dir, "lens_sim")


def pretext_sweep(tmp, cache_dir, dataset):
    sweep = tmp / "sweep"
    out = run_cli(["-m", "method=rotation,blur", *PRETEXT_TINY, *tiny_data(dataset, cache_dir),
                   f"hydra.sweep.dir={sweep}"], cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep


@pytest.mark.slow
@pytest.mark.parametrize("dataset,chans", [("lens_sim", 1), ("jets_sim", 8)])
def test_pretext_methods_pretrain_through_the_cli(request, tmp_path, cache_dir, dataset, chans):
    sweep = request.getfixturevalue("lens_sweep") if dataset == "lens_sim" else pretext_sweep(tmp_path, cache_dir,
                                                                                              dataset)
    for i, method in enumerate(("rotation", "blur")):
        run_dir = next(sweep.glob(f"{i}_pretrain_{method}_*"))
        meta = load_backbone_file(run_dir / "backbone.pt")["meta"]
        assert (meta["in_chans"], meta["method"], meta["dataset"]) == (chans, method, dataset)
        header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert "train/loss_step" in header and "train/acc_step" in header


@pytest.mark.slow
def test_linear_probe_loads_the_rotation_backbone(tmp_path, cache_dir, lens_sweep):
    pretrained = next(lens_sweep.glob("0_pretrain_rotation_*"))
    run_dir = tmp_path / "linear"
    TASKS["linear"](compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), "task=linear", "task.max_epochs=1",
                                 "+trainer.limit_val_batches=1", f"pretrained={pretrained}", f"run_dir={run_dir}"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "rotation" and metrics["pretrained"] == str(pretrained / "backbone.pt")
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
