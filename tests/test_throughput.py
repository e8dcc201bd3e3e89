"""Speed options (channels_last, torch.compile, fused optimizers, cuDNN autotuning) and benchmarks/throughput.py.

Nothing here is timed: the benchmark runs at tiny size to show it works end to end and writes its JSON.
"""
from __future__ import annotations

import json
import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, compose_cfg
from torch import nn

from ssl_lab import speed
from ssl_lab.augment import OPS, Augment
from ssl_lab.backbones import build_backbone
from ssl_lab.callbacks import SpeedMeter, StepProgressBar
from ssl_lab.errors import ConfigError
from ssl_lab.methods.simclr import SimCLR
from ssl_lab.optim import build_optimizer, param_groups, step_kwargs
from ssl_lab.tasks.common import trainer_kwargs

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput


@pytest.fixture
def one_thread():
    """One intra-op thread: on a CPU box shared with other jobs, two spinning OpenMP threads run ~3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ benchmark script
@pytest.mark.slow
def test_quick_benchmark_writes_three_numbers_and_ratios_for_every_case(tmp_path, one_thread):
    out = tmp_path / "throughput.json"
    throughput.main(["--quick", "--image-size", "16", "--batch-size", "2", "--steps", "1", "--workers", "1",
                     "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["case"] for r in runs] == list(throughput.CASES)
    for run in runs:
        res, settings = run["results"], run["settings"]
        assert set(res) == set(throughput.PATHS)
        for r in res.values():
            assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
            assert r["timed_images"] == settings["steps"] * settings["batch_size"]
            assert r["peak_gpu_mem_gb"] is None  # CPU: no GPU memory to report
        ips = {k: v["images_per_s"] for k, v in res.items()}
        assert run["ratios"]["b_over_a"] == pytest.approx(ips["b_memory"] / ips["a_ceiling"])
        assert run["ratios"]["b_h5_over_c"] == pytest.approx(ips["b_h5"] / ips["c_reference"])
        # CPU defaults: every speed option off, the optimizer steps as before
        assert run["speed"] == {"compile": False, "compiled": [], "channels_last": False, "optimizer": "for-loop",
                                "cudnn_benchmark": False}
        assert run["device"] == "cpu" and run["date"] and run["device_name"]
    jets = runs[1]
    assert jets["model"]["channels"] == 8 and "no torchvision op" in jets["reference_ops"]["intensity"]
    assert runs[2]["settings"]["overrides"] == ["backbone.depth=2"]  # --quick shrinks the ViT


def _augment(name: str, ops: dict, channels: int) -> Augment:
    aug = Augment(name, ops, size=12)
    aug.set_stats([0.5] * channels, [0.25] * channels)
    return aug


def test_reference_transform_covers_every_op_and_any_channel_count():
    rgb = _augment("all", {op: None for op in OPS}, 3)
    transform, notes = throughput.reference_transform(rgb, 12, 20, uint8=True)
    assert set(notes) == set(OPS)  # each op has a stand-in, and says what it is
    view = transform(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8))
    assert view.shape == (3, 12, 12) and view.dtype == torch.float32

    physics = compose_cfg(["augment=physics"]).augment.ops
    jets = _augment("physics", physics, 8)
    transform, notes = throughput.reference_transform(jets, 12, 20, uint8=False)
    assert set(notes) == set(jets.active)
    torch.manual_seed(0)
    x = torch.rand(8, 20, 20)
    views = [transform(x) for _ in range(2)]
    assert all(v.shape == (8, 12, 12) for v in views) and not torch.equal(views[0], views[1])


def test_reference_views_stack_the_views_of_one_image():
    aug = _augment("minimal", {"resized_crop": None, "hflip": None}, 3)
    transform, _ = throughput.reference_transform(aug, 12, 16, uint8=True)
    ds = throughput.ReferenceViews(torch.zeros(2, 3, 16, 16, dtype=torch.uint8).numpy(), transform, n_views=2)
    assert ds[1]["views"].shape == (2, 3, 12, 12)


# ------------------------------------------------------------------------------------------- channels_last
def test_channels_last_auto_is_on_only_for_conv_nets_on_cuda(monkeypatch):
    resnet = build_backbone("resnet15", 2, image_size=16)
    vit = build_backbone("vit_tiny", 2, image_size=16, depth=1)
    assert speed.resolve_channels_last("auto", resnet, "auto") is torch.cuda.is_available()
    assert speed.resolve_channels_last("auto", resnet, "cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert speed.resolve_channels_last("auto", resnet, "gpu") is True
    assert speed.resolve_channels_last("auto", vit, "gpu") is False  # one patch-embedding conv: not a conv net
    assert speed.resolve_channels_last("auto", resnet, "cpu") is False
    assert speed.resolve_channels_last(False, resnet, "gpu") is False
    with pytest.raises(ConfigError, match="accelerator.channels_last='yes'"):
        speed.resolve_channels_last("yes", resnet, "gpu")


def _tiny_simclr(channels: int = 1) -> SimCLR:
    backbone = build_backbone("resnet15", channels, image_size=8)
    aug = Augment("minimal", {"hflip": None}, size=8)
    return SimCLR("simclr", backbone, aug, {"name": "adam", "lr": 1e-3}, proj_hidden_dims=[8], proj_output_dim=4)


def test_channels_last_true_converts_conv_weights_and_keeps_outputs():
    model = _tiny_simclr()
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    before = model.backbone(x)
    record = speed.apply_speed_options(model, {"accelerator": "cpu", "channels_last": True, "compile": False})
    assert record == {"compile": False, "compiled": [], "channels_last": True}
    conv = model.backbone.layer1[0].conv1.weight  # [64, 64, 3, 3]: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.backbone(x), before, rtol=1e-5, atol=1e-5)
    # CPU defaults leave the layout alone
    plain = _tiny_simclr()
    assert speed.apply_speed_options(plain, {"accelerator": "cpu", "channels_last": "auto"})["channels_last"] is False
    assert not plain.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- optimizers
def test_fused_on_cuda_foreach_for_others_cpu_unchanged():
    assert step_kwargs("adamw", on_cuda=True) == {"fused": True}
    assert step_kwargs("sgd", on_cuda=True, fused=False) == {"foreach": True}
    assert step_kwargs("adam", on_cuda=False) == {}  # torch's own CPU default: what CPU runs used before
    assert step_kwargs("lars", on_cuda=True) == {}  # our LARS has one implementation
    with pytest.raises(ConfigError, match="optim.fused=true.*lars"):
        step_kwargs("lars", on_cuda=True, fused=True)


def test_fused_option_reaches_the_torch_optimizer():
    net = nn.Linear(3, 2)
    cpu_default = build_optimizer(param_groups(net, 0.01), "adamw", lr=1e-3)
    assert not cpu_default.defaults["fused"] and not cpu_default.defaults["foreach"]
    assert speed.optimizer_impl(cpu_default) == "for-loop"
    forced = build_optimizer(param_groups(net, 0.01), "adam", lr=1e-3, fused=True)  # torch has CPU fused Adam
    assert forced.defaults["fused"] is True and speed.optimizer_impl(forced) == "fused"
    net(torch.randn(4, 3)).sum().backward()
    forced.step()


# ------------------------------------------------------------------------------------------------- Trainer
def test_trainer_gets_cudnn_autotuning_only_on_cuda(monkeypatch):
    cfg = compose_cfg(["accelerator=gpu"])
    assert cfg.accelerator.compile is False and cfg.accelerator.channels_last == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "benchmark" not in trainer_kwargs(cfg, "32-true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs = trainer_kwargs(cfg, "bf16-mixed")
    assert kwargs["benchmark"] is True
    assert not {"compile", "channels_last"} & set(kwargs)  # model options, not Trainer arguments
    cfg.trainer.deterministic = True
    assert "benchmark" not in trainer_kwargs(cfg, "bf16-mixed")
    assert "benchmark" not in trainer_kwargs(compose_cfg(["accelerator=cpu"]), "32-true")


def test_progress_bar_redraws_only_on_logging_steps_on_cuda(monkeypatch):
    cfg = compose_cfg(["accelerator=gpu", "trainer.log_every_n_steps=7", "trainer.enable_progress_bar=true"])
    mine = pl.Callback()
    for cuda, every in ((False, 1), (True, 7)):  # the CPU: every step, as Lightning's default bar
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        callbacks = trainer_kwargs(cfg, "32-true", callbacks=[mine])["callbacks"]
        bars = [c for c in callbacks if isinstance(c, StepProgressBar)]
        assert callbacks[0] is mine and len(bars) == 1 and bars[0].refresh_rate == every
    assert not any(isinstance(c, StepProgressBar)
                   for c in trainer_kwargs(cfg, "bf16-mixed", enable_progress_bar=False)["callbacks"])


class CountedClock(SpeedMeter):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _now(self, trainer):
        self.reads.append(self._batch)
        return float(len(self.reads))  # one "second" per read


def test_speed_meter_reads_the_clock_only_on_logging_steps_and_epoch_ends():
    torch.manual_seed(0)
    model = _tiny_simclr()
    meter = CountedClock()
    gen = torch.Generator().manual_seed(1)
    data = [{"x": torch.rand(4, 1, 8, 8, generator=gen)} for _ in range(10)]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                         log_every_n_steps=4)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    # the first batch starts the clock; batches 4 and 8 (1-based) are logged; batch 10 ends the epoch
    assert meter.reads == [0, 3, 7, 9]
    assert meter.images == 9 * 4 and meter.images_per_s == pytest.approx(36 / 3)


# ------------------------------------------------------------------------------------------------- compile
def _fit(model: SimCLR, steps: int = 2, callbacks: list | None = None) -> pl.Trainer:
    gen = torch.Generator().manual_seed(1)
    data = [{"x": torch.rand(4, 1, 8, 8, generator=gen)} for _ in range(steps)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_compile_failure_is_one_clear_config_error():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code generator here")

    model = _tiny_simclr()
    assert speed.compile_model(model, "cpu", backend=broken_backend) == ["backbone"]
    with pytest.raises(ConfigError, match=r"accelerator.compile=true: torch.compile failed on backbone \(RuntimeError: "
                                          r"no code generator here\); set accelerator.compile=false"):
        _fit(model)


def test_compile_without_a_cpp_compiler_fails_before_training(monkeypatch):
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*accelerator.compile=false"):
        speed.apply_speed_options(_tiny_simclr(), {"accelerator": "cpu", "compile": True})
    with pytest.raises(ConfigError, match="accelerator.compile='yes'"):
        speed.apply_speed_options(_tiny_simclr(), {"accelerator": "cpu", "compile": "yes"})


def test_compile_targets_vit_blocks_and_keeps_state_dict_keys():
    vit = build_backbone("vit_tiny", 1, image_size=16, depth=1)
    holder = nn.Module()
    holder.backbone = vit
    assert list(speed.compile_targets(holder)) == ["backbone.model.blocks"]
    holder.backbone = build_backbone("vgg11", 1, image_size=32)  # forward and forward_features both run features
    assert list(speed.compile_targets(holder)) == ["backbone.features"]
    model = _tiny_simclr()
    keys = list(model.state_dict())
    speed.compile_model(model, "cpu", backend="eager")
    assert list(model.state_dict()) == keys  # backbone.pt and checkpoints stay loadable without compile


class TwoConvs(nn.Module):
    """The smallest backbone worth compiling: Inductor's C++ build of a ResNet takes minutes on 2 cores."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3))


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_compile_true_trains_like_eager_on_a_tiny_cpu_run(one_thread, tmp_path, monkeypatch):
    """The real Inductor backend (C++ on the CPU) inside a Lightning step: the same first loss as eager, and the
    same optimizer updates up to float rounding."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    # Inductor's precompiled header is 150 MB per compiler flag set, kept in /tmp for good; this test needs none.
    # (config.patch restores the option; monkeypatch.setattr's undo deletes it from torch's config module)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    runs = []
    graphs = counters["stats"]["unique_graphs"]
    with inductor_config.patch(cpp_cache_precompile_headers=False):
        for compile_opt in (False, True):
            torch.manual_seed(0)
            model = SimCLR("simclr", TwoConvs(), Augment("minimal", {"hflip": None}, size=8),
                           {"name": "adam", "lr": 1e-2}, proj_hidden_dims=[8], proj_output_dim=4)
            start = model.backbone.conv2.weight.detach().clone()
            record = speed.apply_speed_options(model, {"accelerator": "cpu", "compile": compile_opt})
            assert record["compiled"] == (["backbone"] if compile_opt else [])
            log = LossLog()
            _fit(model, callbacks=[log])
            runs.append((log.losses, model.backbone.conv2.weight.detach() - start))
    assert counters["stats"]["unique_graphs"] > graphs  # Dynamo really captured the backbone
    (eager_losses, eager_step), (compiled_losses, compiled_step) = runs
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-3)  # fused kernels round differently
    assert compiled_step.abs().sum() > 0
    assert (compiled_step - eager_step).norm() < 0.05 * eager_step.norm()
