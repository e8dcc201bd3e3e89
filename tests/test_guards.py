"""Guards while training: NaN/Inf stops (or skips) a step before any weight moves; collapse and chance warnings."""
from __future__ import annotations

import copy
import json
import logging
import math
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from conftest import TINY, compose_cfg, run_cli, tiny_data
from ssl_lab.augment import Augment
from ssl_lab.backbones import build_backbone
from ssl_lab.errors import ConfigError, TrainingDiverged
from ssl_lab.guards import (TrainingGuard, backbone_features, build_guard, chance_warmup, embedding_spread,
                            step_verdict)
from ssl_lab.losses import nt_xent_loss
from ssl_lab.methods.barlow import BarlowTwins
from ssl_lab.methods.blur import Blur
from ssl_lab.methods.byol import BYOL
from ssl_lab.methods.mae import MAE
from ssl_lab.methods.mocov3 import MoCoV3
from ssl_lab.methods.rotation import Rotation
from ssl_lab.methods.simclr import SimCLR

OPTIMS = {"adam": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"},
          "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "constant"}}
# The fused kernels (the default on CUDA) have CPU versions: the guard's device-side skip runs here too.
OPTIMS.update({f"{k}_fused": {**v, "fused": True} for k, v in list(OPTIMS.items())})


class Encoder(nn.Module):
    """Conv + BatchNorm (running statistics a bad step must not leave behind); ``poison`` makes its input NaN."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = width
        self.poison = False

    def forward(self, x):
        return self.net(x * float("nan") if self.poison else x)


class Constant(nn.Module):
    """A collapsed backbone: every image gets the same features."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.num_features = width
        self.value = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return self.value.expand(x.shape[0], -1)


def augment(n_views: int = 2) -> Augment:
    return Augment("minimal", {"resized_crop": {"scale": [0.5, 1.0]}, "hflip": {"p": 0.5}}, n_views=n_views, size=16)


def simclr(backbone: nn.Module | None = None, optim: str = "adam") -> SimCLR:
    return SimCLR("simclr", backbone or Encoder(), augment(), OPTIMS[optim], proj_hidden_dims=[32], proj_output_dim=16)


def loader(n: int = 64, batch_size: int = 8) -> torch.utils.data.DataLoader:
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader([{"x": xi} for xi in x], batch_size=batch_size, drop_last=True)


def fit(model, steps: int, callbacks: list, root=None, ckpt_path=None, accelerator: str = "cpu", **kw) -> pl.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=checkpointing, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=root, **kw)
    trainer.fit(model, loader(), ckpt_path=ckpt_path, weights_only=True)
    return trainer


class PoisonAt(pl.Callback):
    """NaN input pixels at the given optimizer steps: NaN features, loss, gradients and BatchNorm statistics."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.backbone.poison = trainer.global_step in self.steps


class History(pl.Callback):
    """The module's state and the optimizer's state, keyed by the number of optimizer steps taken."""

    def __init__(self):
        self.model, self.optim = {}, {}

    def _record(self, trainer, pl_module):
        self.model[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optim[trainer.global_step] = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, pl_module)


def assert_same(a, b):
    """Equal to the bit, recursively (state dicts, optimizer state)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=False)
    else:
        assert a == b


# ------------------------------------------------------------------------------------------------------ stopping
def test_nan_loss_stops_before_the_step_and_no_checkpoint_holds_the_bad_state(tmp_path):
    pl.seed_everything(0)
    model = BarlowTwins("barlow", Encoder(), augment(), OPTIMS["adam"], proj_hidden_dims=[32], proj_output_dim=16)
    history = History()
    # A checkpoint after every step, and one more on the exception: the worst case for writing a bad state.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1,
                           save_last=True, save_on_exception=True)
    with pytest.raises(TrainingDiverged) as err:
        fit(model, 6, [TrainingGuard(), PoisonAt({3}), history, ckpt], root=tmp_path)
    msg = str(err.value)
    assert "training diverged at step 3 (epoch 0)" in msg
    assert "loss=nan (non-finite)" in msg and "on_diag=nan (non-finite)" in msg and "off_diag=nan" in msg
    assert "gradient norm nan (non-finite)" in msg and "backbone.net.0.weight" in msg
    assert msg.index("optim.lr=0.001") < msg.index("dataset.nan_policy") < msg.index("ssl_lab.inspect")
    assert "16-mixed" not in msg  # 32-true: mixed-precision overflow is not among the causes
    assert f"{tmp_path / 'ckpt' / 'last.ckpt'} (step 3)" in msg and "resume=force optim.lr=0.0001" in msg
    assert "\n" not in msg  # one line for the CLI

    # The module is exactly as after step 2 (3 steps done): weights and BatchNorm running statistics.
    assert max(history.model) == 3
    assert_same(model.state_dict(), history.model[3])
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) >= 4  # step=1..3, last, and the one written on the exception
    for path in saved:
        ckpt_state = torch.load(path, weights_only=True)
        assert ckpt_state["global_step"] <= 3, path
        assert all(torch.isfinite(t).all() for t in ckpt_state["state_dict"].values() if t.is_floating_point()), path
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert_same(last["state_dict"], history.model[3])


def test_inf_gradient_with_finite_loss_names_the_parameter():
    pl.seed_everything(0)
    model = simclr()
    name = "projector.0.weight"
    inject = {"on": False}
    dict(model.named_parameters())[name].register_hook(lambda g: g * float("inf") if inject["on"] else g)

    class InfAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            inject["on"] = trainer.global_step == 2

    history = History()
    with pytest.raises(TrainingDiverged) as err:
        fit(model, 5, [TrainingGuard(), InfAt(), history])
    msg = str(err.value)
    loss = float(re.search(r"loss=([0-9.]+)[;,]", msg).group(1))
    assert math.isfinite(loss) and loss > 0
    assert re.search(rf"gradient norm (inf|nan) \(non-finite\), NaN/Inf gradients in {name}\. Likely", msg), msg
    assert "training diverged at step 2" in msg and "No checkpoint was saved yet" in msg
    assert_same(model.state_dict(), history.model[2])


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_bad_steps_are_skipped_without_moving_anything_until_max_bad_steps(optim, caplog):
    pl.seed_everything(0)
    model = simclr(optim=optim)
    guard = TrainingGuard(max_bad_steps=2)
    history = History()
    with caplog.at_level(logging.WARNING, logger="ssl_lab.guards"), pytest.raises(TrainingDiverged) as err:
        fit(model, 8, [guard, PoisonAt({2, 4, 6}), history])
    assert guard.skipped_steps == 2 and guard.skipped_at == [2, 4]
    for bad in (2, 4):
        # A skipped step counts as a step, but no weight, BatchNorm statistic, Adam moment or momentum buffer moved.
        assert_same(history.model[bad + 1], history.model[bad])
        assert_same(history.optim[bad + 1], history.optim[bad])
        assert history.optim[bad]  # the optimizer has state to protect by then
    weight = "backbone.net.0.weight"
    assert not torch.equal(history.model[4][weight], history.model[3][weight])  # training went on in between
    assert "training diverged at step 6" in str(err.value) and "guard.max_bad_steps=2" in str(err.value)
    assert_same(model.state_dict(), history.model[6])
    logged = [r.getMessage() for r in caplog.records if r.name == "ssl_lab.guards" and r.levelno == logging.WARNING]
    assert any("step 2 " in m and "1 of guard.max_bad_steps=2" in m for m in logged)
    assert any("step 4 " in m and "2 of guard.max_bad_steps=2" in m for m in logged)
    assert guard.summary()["skipped_steps"] == 2 and len(guard.summary()["warnings"]) == 2


@pytest.mark.parametrize("optim", ["sgd_fused", "adam_fused"])
def test_fused_optimizer_skips_bad_steps_on_the_device_and_reads_the_flags_on_logging_steps(optim):
    pl.seed_everything(0)
    model = simclr(optim=optim)
    guard = TrainingGuard(max_bad_steps=1)
    history = History()
    with pytest.raises(TrainingDiverged) as err:
        fit(model, 12, [history, guard, PoisonAt({2, 5})], log_every_n_steps=4)  # history sees step 8 too
    for bad in (2, 5):  # nothing moved in either bad step, BatchNorm statistics and optimizer state included
        assert_same(history.model[bad + 1], history.model[bad])
        assert_same(history.optim[bad + 1], history.optim[bad])
    weight = "backbone.net.0.weight"
    assert not torch.equal(history.model[7][weight], history.model[6][weight])  # good steps still train
    # Step 2 was within max_bad_steps; step 5 was one too many, found when the flags were read at the logging
    # step after 8 steps, and the run stopped there, holding the weights of those 8 steps (two of them skipped).
    assert guard.skipped_at == [2]
    msg = str(err.value)
    assert "training diverged at step 5 (epoch 0): non-finite loss (loss nan)" in msg
    assert "stopped at step 8" in msg and "optim.fused=false" in msg and "\n" not in msg
    assert max(history.model) == 8
    assert_same(model.state_dict(), history.model[8])


def test_fused_sgd_first_step_is_checked_on_the_host():
    """Fused SGD allocates its momentum buffers uninitialised on its first step and fills them only if the step
    runs: a first step skipped on the device would leave garbage momentum behind."""
    pl.seed_everything(0)
    model = simclr(optim="sgd_fused")
    guard = TrainingGuard(max_bad_steps=1)
    history = History()
    fit(model, 3, [guard, PoisonAt({0}), history])
    assert guard.skipped_at == [0]
    assert history.optim[1] == {}  # no momentum buffer came out of the skipped first step
    assert all(torch.isfinite(v["momentum_buffer"]).all() for v in history.optim[3].values())


@pytest.mark.parametrize("optim", ["adam", "adam_fused"])
def test_skipped_steps_survive_resume(tmp_path, optim):
    pl.seed_everything(0)
    def ckpt():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True)

    first = TrainingGuard(max_bad_steps=5)
    fit(simclr(optim=optim), 3, [first, PoisonAt({1}), ckpt()], root=tmp_path)
    assert first.skipped_at == [1]
    again = TrainingGuard(max_bad_steps=5)
    trainer = fit(simclr(optim=optim), 5, [again, PoisonAt({4}), ckpt()], root=tmp_path,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 5
    assert again.skipped_steps == 2 and again.skipped_at == [1, 4]


# ------------------------------------------------------------------------------------------- 16-mixed and DDP
@pytest.mark.parametrize("loss_finite,grads_finite,scaled,distributed,expected", [
    (True, True, False, False, "ok"),
    (False, True, False, False, "bad"),     # one process: a NaN loss is enough
    (False, True, False, True, "ok"),       # DDP: the loss is the rank's own; only the all-reduced gradients decide
    (True, False, False, True, "bad"),
    (True, False, True, False, "scaler"),   # 16-mixed: the GradScaler skips inf gradients itself
    (True, False, True, True, "scaler"),
    (False, False, True, False, "bad"),     # ... but a NaN loss stops the run
    (False, False, True, True, "scaler"),   # ... except under DDP, where the ranks would disagree
])
def test_step_verdict(loss_finite, grads_finite, scaled, distributed, expected):
    assert step_verdict(loss_finite, grads_finite, scaled=scaled, distributed=distributed) == expected


class InfGrad(torch.autograd.Function):
    """Identity forward; Inf gradient backward when ``on`` (with a finite loss)."""

    @staticmethod
    def forward(ctx, x, on):
        ctx.on = on
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * float("inf") if ctx.on else grad), None


class Linear(pl.LightningModule):
    """A linear model whose gradients (``inf_at``) or loss (``nan_at``) turn non-finite at given steps."""

    def __init__(self, inf_at=(), nan_at=(), lr=0.1, gain=1.0):
        super().__init__()
        self.lin = nn.Linear(256, 4)
        self.inf_at, self.nan_at, self.lr, self.gain = set(inf_at), set(nan_at), lr, gain

    def training_step(self, batch, batch_idx):
        out = InfGrad.apply(self.lin(batch["x"].flatten(1)), self.global_step in self.inf_at)
        loss = out.float().pow(2).mean() * (float("nan") if self.global_step in self.nan_at else self.gain)
        self.last_terms = {"loss": loss.detach()}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_weights_overflowed_by_a_finite_step_are_never_saved_or_exported(tmp_path):
    # lr 1e38 x gradients ~1e6 overflow float32: finite loss and gradients, Inf weights after the update.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True)
    with pytest.raises(TrainingDiverged, match="update of step 0 made the weights non-finite") as err:
        fit(Linear(lr=1e38, gain=1e6), 3, [TrainingGuard(), ckpt], root=tmp_path)
    assert "before writing a checkpoint" in str(err.value) and "NaN/Inf weights in lin.weight" in str(err.value)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))
    # Without checkpoints: stopped when training ends, before a callback after the guard (BackboneExport) runs.
    with pytest.raises(TrainingDiverged, match="at the end of training, before anything is exported"):
        fit(Linear(lr=1e38, gain=1e6), 1, [TrainingGuard()])


def fp16(model, steps: int, guard: TrainingGuard, history: History | None = None) -> pl.Trainer:
    # Real 16-mixed on the CPU: Lightning maps precision="16-mixed" to bf16 there, so the plugin is given directly.
    # Scale 1: no overflow of its own, only the injected one.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[guard, *([history] if history else [])])
    trainer.fit(model, loader())
    return trainer


def test_fp16_inf_gradients_are_left_to_the_grad_scaler():
    guard, history = TrainingGuard(), History()
    trainer = fp16(Linear(inf_at={1}), 4, guard, history)
    assert trainer.precision == "16-mixed" and trainer.global_step == 4  # no stop
    assert guard.amp_skipped_steps == 1 and guard.skipped_steps == 0
    assert_same(history.model[2], history.model[1])  # the scaler skipped that step
    assert not torch.equal(history.model[3]["lin.weight"], history.model[2]["lin.weight"])


def test_fp16_stops_after_too_many_scaler_skips_in_a_row_or_on_a_nan_loss():
    with pytest.raises(TrainingDiverged) as err:
        fp16(Linear(inf_at=range(100)), 20, TrainingGuard(amp_max_skips=3))
    msg = str(err.value)
    assert "at step 3" in msg and "GradScaler skipped 4 steps in a row" in msg
    assert "accelerator.precision=16-mixed" in msg and "bf16-mixed or 32-true" in msg

    with pytest.raises(TrainingDiverged, match=r"at step 2 .*loss=nan \(non-finite\)"):
        fp16(Linear(nan_at={2}), 5, TrainingGuard())


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_huge_lr_exits_2_with_one_line_and_exports_nothing(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, *tiny_data("lens_sim", cache_dir), f"run_dir={run_dir}", "optim.lr=1e30"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("ssl_lab: error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    line = lines[0]
    assert re.search(r"training diverged at step \d+ \(epoch 0\)", line), line
    assert "optim.lr=1e+30" in line and "dataset.nan_policy" in line and "python -m ssl_lab.inspect" in line
    assert not (run_dir / "backbone.pt").exists() and not (run_dir / "summary.json").exists()
    assert "training diverged" in (run_dir / "run.log").read_text()


def test_pretrain_summary_records_the_guard(tmp_path, cache_dir):
    from ssl_lab.tasks.pretrain import pretrain

    run_dir = tmp_path / "run"
    cfg = compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), f"run_dir={run_dir}", "guard.check_every_n_steps=1"])
    summary = pretrain(cfg)
    expected = {"skipped_steps": 0, "skipped_at": [], "amp_skipped_steps": 0, "warnings": []}
    assert summary["guard"] == expected
    assert json.loads((run_dir / "summary.json").read_text())["guard"] == expected
    header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/embedding_std" in header


# ------------------------------------------------------------------------------------------------ collapse
def test_collapsed_backbone_warns_once_with_advice(caplog):
    pl.seed_everything(0)
    guard = TrainingGuard(check_every_n_steps=1, patience=3, chance_after_steps=0)
    with caplog.at_level(logging.WARNING, logger="ssl_lab.guards"):
        fit(simclr(Constant()), 6, [guard])
    assert guard.embedding_std is not None and guard.embedding_std < 1e-3
    collapse = [w for w in guard.warnings if "embeddings are collapsing" in w]
    assert len(collapse) == 1  # once, though 4 checks were below the threshold
    assert "at step 3" in collapse[0] and "SimCLR:" in collapse[0] and "optim.lr" in collapse[0]
    assert "augmentations" in collapse[0]
    # Identical embeddings give SimCLR exactly its chance loss.
    chance = [w for w in guard.warnings if "the loss sits at chance" in w]
    assert len(chance) == 1 and f"{math.log(15):.4g}" in chance[0]
    logged = [r.getMessage() for r in caplog.records if r.name == "ssl_lab.guards"]
    assert collapse[0] in logged and chance[0] in logged


def test_random_backbone_does_not_warn_and_the_std_is_logged():
    pl.seed_everything(0)
    guard = TrainingGuard(check_every_n_steps=1, patience=1, chance_after_steps=10**6)
    trainer = fit(simclr(), 4, [guard])
    assert guard.embedding_std > 0.05 and float(trainer.callback_metrics["train/embedding_std"]) > 0.05
    assert guard.warnings == []


def test_embedding_check_leaves_no_trace():
    pl.seed_everything(0)
    backbone = Encoder()
    x = torch.rand(8, 1, 16, 16)
    buffers = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    out = backbone_features(pl.Trainer(accelerator="cpu", logger=False), backbone, x)
    assert backbone.training and torch.equal(torch.get_rng_state(), rng)
    assert_same(backbone.state_dict(), buffers)  # running statistics and batch count untouched
    torch.testing.assert_close(out, backbone(x))  # train-mode features (batch statistics), as the loss sees them


def test_embedding_spread_separates_spread_from_collapsed():
    g = torch.Generator().manual_seed(0)
    assert embedding_spread(torch.randn(256, 64, generator=g)) == pytest.approx(1.0, abs=0.02)
    assert float(embedding_spread(torch.ones(256, 64))) == 0.0
    near = torch.randn(1, 64, generator=g) + 0.01 * torch.randn(256, 64, generator=g)
    assert float(embedding_spread(near)) < 0.05


def test_methods_without_a_backbone_view_are_skipped():
    pl.seed_everything(0)
    vit = build_backbone("vit_tiny", in_chans=1, image_size=32)
    aug = Augment("minimal", {"resized_crop": {"scale": [0.5, 1.0]}}, n_views=1, size=32)
    mae = MAE("mae", vit, aug, OPTIMS["adam"], decoder_dim=32, decoder_depth=1, decoder_heads=2)
    guard = TrainingGuard(check_every_n_steps=1, patience=1)
    trainer = fit(mae, 2, [guard])
    assert guard.embedding_std is None and "train/embedding_std" not in trainer.callback_metrics
    guard = TrainingGuard(check_every_n_steps=1, patience=1)
    fit(Scripted([1.0]), 2, [guard])  # no backbone and no views in the batch
    assert guard.embedding_std is None


# -------------------------------------------------------------------------------------------------- chance
class Scripted(pl.LightningModule):
    """The loss follows a script, step by step; its chance loss is 1."""

    def __init__(self, losses):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.losses = list(losses)

    def training_step(self, batch, batch_idx):
        loss = self.w * 0 + self.losses[min(self.global_step, len(self.losses) - 1)]
        self.last_terms = {"loss": loss.detach()}
        return loss

    def chance_loss(self, batch_size):
        return 1.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("losses,steps,after,warned_at", [
    ([1.015], 5, 0, 3),                    # within 2% for 3 checks in a row
    ([0.985], 5, 0, 3),                    # below chance counts too
    ([1.03], 5, 0, None),                  # 3% off: not at chance
    ([1.0], 4, 3, None),                   # checks count from step 3: steps 3 and 4 are two ...
    ([1.0], 5, 3, 5),                      # ... and step 5 is the third
    ([1.0, 1.0, 0.5, 1.0, 1.0], 5, 0, None),  # a check off chance restarts the count: 2, then 2 again
])
def test_chance_warning_needs_patience_after_the_warmup(losses, steps, after, warned_at):
    guard = TrainingGuard(check_every_n_steps=1, patience=3, chance_after_steps=after)
    fit(Scripted(losses), steps, [guard])
    chance = [w for w in guard.warnings if "at chance" in w]
    if warned_at is None:
        assert chance == []
    else:
        assert len(chance) == 1 and f"at step {warned_at})" in chance[0]


def test_chance_warmup_rule():
    assert chance_warmup(1000, 100) == 200  # 20% of the run is later than one epoch
    assert chance_warmup(1000, 400) == 400  # one epoch is later than 20%
    assert chance_warmup(10, 10) == 5       # never past half the run
    assert chance_warmup(float("inf"), 50) == 50


def test_chance_losses_equal_the_loss_of_uninformative_models():
    n = 8
    x = torch.rand(n, 1, 16, 16)
    sim = simclr(Constant())
    assert sim.chance_loss(n) == pytest.approx(math.log(2 * n - 1))
    assert nt_xent_loss(torch.ones(n, 16), torch.ones(n, 16)).item() == pytest.approx(sim.chance_loss(n), rel=1e-6)
    assert sim.loss([x, x])[0].item() == pytest.approx(sim.chance_loss(n), rel=1e-6)

    # MoCo v3: both directions of 2T x cross-entropy, uniform over the N keys (a constant backbone gets there).
    moco = MoCoV3("mocov3", Constant(), augment(), OPTIMS["adam"], temperature=0.2, proj_hidden_dims=[32],
                  proj_output_dim=16, pred_hidden_dims=[32])
    assert moco.chance_loss(n) == pytest.approx(4 * 0.2 * math.log(n))
    assert moco.loss([x, x])[0].item() == pytest.approx(moco.chance_loss(n), rel=1e-6)

    # Pretext tasks: uniform scores over the K transforms (a zeroed classifier), any batch size.
    for model, k in [(Rotation("rotation", Encoder(), augment(1), OPTIMS["adam"], head_hidden_dims=[8]), 4),
                     (Blur("blur", Encoder(), augment(1), OPTIMS["adam"], sigmas=[0.0, 1.0, 2.0],
                           head_hidden_dims=[8]), 3)]:
        last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        assert model.chance_loss(n) == pytest.approx(math.log(k)) == model.chance_loss(3 * n)
        assert model.loss([x])[0].item() == pytest.approx(math.log(k), rel=1e-6)

    byol = BYOL("byol", Encoder(), augment(), OPTIMS["adam"], proj_hidden_dims=[32], proj_output_dim=16,
                pred_hidden_dims=[32])
    assert byol.chance_loss(n) is None  # no such constant: the guard does not check


# -------------------------------------------------------------------------------------------------- config
def test_guard_config_defaults():
    guard = build_guard(compose_cfg([]).guard)
    assert (guard.max_bad_steps, guard.check_every_n_steps, guard.collapse_std, guard.patience) == (0, None, 0.05, 3)
    assert build_guard(None).max_bad_steps == 0  # a config without the section


@pytest.mark.parametrize("override,option", [
    ("guard.max_bad_steps=-1", "guard.max_bad_steps=-1"),
    ("guard.max_bad_steps=true", "guard.max_bad_steps=True"),
    ("guard.max_bad_steps=1.5", "guard.max_bad_steps=1.5"),
    ("guard.check_every_n_steps=0", "guard.check_every_n_steps=0"),
    ("guard.collapse_std=abc", "guard.collapse_std='abc'"),
    ("guard.collapse_std=-0.1", "guard.collapse_std=-0.1"),
    ("guard.patience=0", "guard.patience=0"),
    ("+guard.max_bad_step=1", "guard.max_bad_step is not an option"),
])
def test_bad_guard_options_name_the_option(override, option):
    with pytest.raises(ConfigError, match=re.escape(option)):
        build_guard(compose_cfg([override]).guard)
