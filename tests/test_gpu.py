"""Proof on a real GPU: the CUDA paths of pretraining, the guard, the speed options, checkpoints and the CLI.

Every test takes the ``gpu_device`` fixture (tests/conftest.py). With CUDA they run there, and are the proof; without
it they are deselected, unless ``--gpu-device=cpu`` runs them on the CPU (their CPU version, so they cannot rot
where no GPU is). Sizes are tiny: the file is meant to take well under 3 minutes on one GPU.

    python -m pytest tests/test_gpu.py                     # on a machine with CUDA
    python -m pytest tests/test_gpu.py --gpu-device=cpu    # anywhere
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import CONF, compose_cfg, run_cli, tiny_data
from test_guards import History, PoisonAt, assert_same, fit, simclr
from host_reads import PerBatch, reads_counted  # noqa: F401  (reads_counted: a fixture)

from ssl_lab import speed
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.callbacks import SpeedMeter, reads_values_now
from ssl_lab.errors import TrainingDiverged
from ssl_lab.guards import TrainingGuard, build_guard
from ssl_lab.preemption import PreemptionCheckpoint
from ssl_lab.tasks import TASKS
from ssl_lab.tasks.common import resolve_precision, trainer_kwargs
from ssl_lab.tasks.pretrain import build_pretraining

pytestmark = pytest.mark.gpu

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
PROJECTOR = ["method.proj_hidden_dims=[32]", "method.proj_output_dim=16"]
# What each method needs beyond the shared tiny settings (the pretext tasks and MAE have no projector to shrink).
METHOD_OVERRIDES = {
    "barlow": ["method.proj_hidden_dims=[32,32]", "method.proj_output_dim=16"],
    "blur": ["augment=minimal", "method.head_hidden_dims=[32]"],
    "byol": [*PROJECTOR, "method.pred_hidden_dims=[32]"],
    "dino": [*PROJECTOR, "method.out_dim=64"],
    "mae": ["backbone=vit_tiny", "backbone.depth=2", "augment=minimal", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2"],
    "mocov3": [*PROJECTOR, "method.pred_hidden_dims=[32]"],
    "rotation": ["augment=minimal", "method.head_hidden_dims=[32]"],
    "simsiam": [*PROJECTOR, "method.pred_hidden_dims=[32]"],
}


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def accelerator(device: torch.device) -> str:
    """The accelerator preset (conf/accelerator) and Lightning accelerator name for a device."""
    return "gpu" if on_cuda(device) else "cpu"


def base(device: torch.device, cache: Path, *extra: str, n_per_class: int = 8) -> list[str]:
    """The shared tiny settings on `device`: ResNet-15 on 32 px simulated lenses, batches of 8, no workers."""
    return [f"accelerator={accelerator(device)}", "backbone=resnet15", *tiny_data("lens_sim", cache),
            f"dataset.n_per_class={n_per_class}", "dataset.batch_size=8", "dataset.num_workers=0",
            "trainer.enable_progress_bar=false", *extra]


def method_cfg(method: str, device: torch.device, cache: Path, *extra: str, n_per_class: int = 8):
    return compose_cfg(base(device, cache, f"method={method}", *METHOD_OVERRIDES.get(method, PROJECTOR), *extra,
                            n_per_class=n_per_class))


def trainer_for(cfg, precision: str, root: Path, callbacks: list, max_steps: int, **kw) -> pl.Trainer:
    """A pretraining Trainer as ssl_lab.tasks.pretrain builds it (trainer_kwargs), without logger or checkpoints."""
    kwargs = trainer_kwargs(cfg, precision, callbacks=callbacks, max_steps=max_steps, logger=False,
                            enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_model_summary=False, **kw)
    if kwargs["accelerator"] == "cpu":
        kwargs.pop("benchmark", None)  # set where uses_cuda is patched: a cuDNN flag, and global state
    return pl.Trainer(default_root_dir=str(root), **kwargs)


class StepLosses(pl.Callback):
    """The loss of every step, read at its end (tests only: a host read each step)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


# ------------------------------------------------------------------------------------- 1. bf16, every method
@pytest.mark.parametrize("method", METHODS)
def test_bf16_pretraining_step_for_every_method(method, gpu_device, cache_dir, tmp_path):
    """Two bf16-mixed steps with each method's real config: autocast really runs the backbone in bf16, the loss is
    finite, the float32 master weights move and stay finite, on the device."""
    cfg = method_cfg(method, gpu_device, cache_dir, "accelerator.precision=bf16-mixed")
    precision = resolve_precision(cfg.accelerator.precision)
    assert precision == "bf16-mixed"
    datamodule, model, _, _ = build_pretraining(cfg)
    before = float_state(model.backbone)
    dtypes: set[torch.dtype] = set()
    layers = [m for m in model.backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [m.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype)) for m in layers]
    losses = StepLosses()
    trainer = trainer_for(cfg, precision, tmp_path, [losses], max_steps=2)
    trainer.fit(model, datamodule=datamodule)
    for hook in hooks:
        hook.remove()

    assert trainer.precision == "bf16-mixed" and trainer.global_step == 2
    assert trainer.strategy.root_device.type == gpu_device.type
    assert all(p.device.type == gpu_device.type for p in model.parameters())
    assert dtypes == {torch.bfloat16}, dtypes  # every conv / linear of the backbone ran under bf16 autocast
    assert len(losses.losses) == 2 and all(math.isfinite(v) for v in losses.losses), losses.losses
    after = float_state(model.backbone)
    assert all(v.dtype == torch.float32 for v in after.values())  # mixed precision: the weights stay float32
    assert all(torch.isfinite(v).all() for v in after.values())
    moved = [k for k in before if not torch.equal(before[k], after[k].cpu())]
    weights = [k for k in before if k.endswith("weight")]
    assert len(set(moved) & set(weights)) > len(weights) // 2, f"only {len(moved)} of {len(before)} moved"


# ------------------------------------------------------------------------------- 2. fused optimizers, guard
def fit_on(device: torch.device, model, steps: int, callbacks: list, precision: str, **kw) -> pl.Trainer:
    """test_guards.fit, on `device`."""
    return fit(model, steps, callbacks, accelerator=accelerator(device), precision=precision, **kw)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("optim", ["adam_fused", "sgd_fused"])
def test_fused_optimizer_skips_a_bad_step_on_the_device_and_stops_at_the_next_logging_step(optim, precision,
                                                                                           gpu_device):
    """As tests/test_guards.py on the CPU: NaN steps 2 and 5 (one more than guard.max_bad_steps=1) leave weights,
    BatchNorm statistics and optimizer state bit-identical; the flags are read on the device's logging step 8."""
    pl.seed_everything(0)
    model = simclr(optim=optim)
    guard = TrainingGuard(max_bad_steps=1)
    history = History()
    with pytest.raises(TrainingDiverged) as err:
        fit_on(gpu_device, model, 12, [history, guard, PoisonAt({2, 5})], precision, log_every_n_steps=4)
    assert model.device.type == gpu_device.type
    opt_state = history.optim[8]
    assert opt_state and all(t.device.type == gpu_device.type for s in opt_state.values() for t in s.values()
                             if isinstance(t, torch.Tensor) and t.dim() > 0)
    for bad in (2, 5):
        assert_same(history.model[bad + 1], history.model[bad])
        assert_same(history.optim[bad + 1], history.optim[bad])
    bn = "backbone.net.1.running_mean"
    assert not torch.equal(history.model[2][bn], history.model[1][bn])  # good steps do update the statistics
    weight = "backbone.net.0.weight"
    assert not torch.equal(history.model[7][weight], history.model[6][weight])
    assert guard.skipped_at == [2]
    msg = str(err.value)
    assert "training diverged at step 5 (epoch 0): non-finite loss (loss nan)" in msg
    assert "stopped at step 8" in msg and "optim.fused=false" in msg
    assert max(history.model) == 8
    assert_same(model.state_dict(), history.model[8])


def test_fused_optimizers_are_fused_on_the_device(gpu_device):
    """The guard's device-side skip needs torch's fused kernels: the configured optimizers really are fused."""
    for optim in ("adam_fused", "sgd_fused"):
        trainer = fit_on(gpu_device, simclr(optim=optim), 1, [], "32-true")
        opt = trainer.optimizers[0]
        assert speed.optimizer_impl(opt) == "fused" and opt._step_supports_amp_scaling
        assert all(p.device.type == gpu_device.type for g in opt.param_groups for p in g["params"])


# ------------------------------------------------------------------------------------- 3. no host syncs
class NoSyncWindows(pl.Callback):
    """CUDA: torch's sync debug mode raises at any host sync from the start of a quiet batch (neither a logging
    step nor the run's last) to the start of the next batch, which includes loading and augmenting that batch.
    Batch 0 is left out: start-up syncs once (SpeedMeter starts its clock after a sync, cuDNN autotunes)."""

    def __init__(self) -> None:
        self.armed = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = trainer.global_step + 1 >= trainer.max_steps
        quiet = trainer.global_step > 0 and not last and not reads_values_now(trainer)
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        self.armed += quiet

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("method", ["simclr", "byol", "dino", "rotation", "mae"])
def test_no_host_sync_between_logging_steps(method, gpu_device, cache_dir, tmp_path, request, monkeypatch):
    """Ten fused-optimizer steps, logging every 4th, with the callbacks and progress bar a GPU run has. On CUDA no
    sync happens in a quiet window (sync debug mode); on the CPU no tensor value is read there (a dispatch mode
    counts every read: tests/host_reads.py)."""
    cfg = method_cfg(method, gpu_device, cache_dir, "trainer.log_every_n_steps=4", "trainer.enable_progress_bar=true",
                     "+optim.fused=true", n_per_class=40)
    datamodule, model, _, _ = build_pretraining(cfg)
    callbacks = [SpeedMeter(), build_guard(cfg.guard), PreemptionCheckpoint(tmp_path / "checkpoints")]
    precision = resolve_precision(cfg.accelerator.precision)
    if on_cuda(gpu_device):
        torch.cuda.set_sync_debug_mode("error")
        try:  # the detector itself: a read of a device value raises in this mode
            with pytest.raises(RuntimeError, match="synchroniz"):
                torch.ones(1, device=gpu_device).item()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        watch = NoSyncWindows()
        trainer = trainer_for(cfg, precision, tmp_path, [watch, *callbacks], max_steps=10)
        try:
            trainer.fit(model, datamodule=datamodule)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert watch.armed == 6  # batches 1, 2, 4, 5, 6 and 8: 3 and 7 log, 9 is the last
    else:
        reads = request.getfixturevalue("reads_counted")
        counter = PerBatch(reads)
        monkeypatch.setattr(speed, "uses_cuda", lambda accelerator: True)  # the progress bar a GPU run gets
        trainer = trainer_for(cfg, precision, tmp_path, [counter, *callbacks], max_steps=10)
        with reads:
            trainer.fit(model, datamodule=datamodule)
        quiet = [r for logged, r in counter.windows if not logged]
        assert len(counter.windows) == 9 and len(quiet) == 7
        for r in quiet:
            assert r == [], "a host read between logging steps:\n" + "\n".join(r)
        assert all(r for logged, r in counter.windows if logged)  # the counter does see the logging steps' reads
    assert trainer.global_step == 10 and model.device.type == gpu_device.type
    assert speed.optimizer_impl(trainer.optimizers[0]) == "fused"
    assert "loss" in trainer.progress_bar_callback.train_progress_bar.postfix


# ------------------------------------------------------------------------------- 4. channels_last, compile
def first_step(cfg, root: Path) -> tuple[float, torch.Tensor, torch.nn.Module, dict]:
    """One float32 step of the configured run: its loss, the backbone's update (flat, on the CPU), the model and
    the record of the speed options used."""
    datamodule, model, _, record = build_pretraining(cfg)  # seeded: the same weights and views every time
    start = float_state(model.backbone)
    losses = StepLosses()
    trainer_for(cfg, "32-true", root, [losses], max_steps=1).fit(model, datamodule=datamodule)
    update = torch.cat([(v.cpu() - start[k]).flatten() for k, v in float_state(model.backbone).items()])
    return losses.losses[0], update, model, record


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_speed_option_gives_the_eager_first_step(option, gpu_device, cache_dir, tmp_path, monkeypatch):
    """accelerator.channels_last (on a conv net) and accelerator.compile (on a one-block ViT: Inductor builds a
    ResNet for minutes on a CPU) train the first step as eager does: the same loss and update up to rounding.
    In float32 without TF32, so the tolerance can be tight."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # on by default; matmuls have it off already
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    net = ["backbone=resnet15"] if option == "channels_last" else ["backbone=vit_tiny", "backbone.depth=1",
                                                                   "augment=minimal"]

    def cfg(on: bool):
        flags = {"channels_last": "false", "compile": "false", option: str(on).lower()}
        return compose_cfg(base(gpu_device, cache_dir, *PROJECTOR, *net, "accelerator.precision=32-true",
                                *(f"accelerator.{k}={v}" for k, v in flags.items())))

    graphs = counters["stats"]["unique_graphs"]
    eager_loss, eager_update, _, eager = first_step(cfg(False), tmp_path / "eager")
    # Inductor's precompiled header is 150 MB per compiler flag set, kept in /tmp for good. config.patch, not
    # monkeypatch: pytest 9's undo deletes an attribute that a torch config module resolves in __getattr__.
    with inductor_config.patch(cpp_cache_precompile_headers=False):
        loss, update, fast, record = first_step(cfg(True), tmp_path / option)

    assert eager == {"compile": False, "compiled": [], "channels_last": False}
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    assert update.abs().sum() > 0 and (update - eager_update).norm() < 0.05 * eager_update.norm()
    if option == "channels_last":
        assert record == {"compile": False, "compiled": [], "channels_last": True}
        convs = [m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert all(c.weight.device.type == gpu_device.type for c in convs)  # the layout survived the move
    else:
        assert record == {"compile": True, "compiled": ["backbone.model.blocks"], "channels_last": False}
        assert counters["stats"]["unique_graphs"] > graphs  # Dynamo really captured the blocks


# ------------------------------------------------------------------------- 5. checkpoints across devices
@pytest.mark.parametrize("direction", ["device_to_cpu", "cpu_to_device"])
def test_checkpoint_resumes_across_devices(direction, gpu_device, cache_dir, tmp_path):
    """A run written on one device continues on the other for one more epoch from its checkpoints/last.ckpt. The
    accelerator is part of the saved config, so the move is a resume=force segment (resume=auto and extend refuse
    any change but the length)."""
    cpu = torch.device("cpu")
    first, second = (gpu_device, cpu) if direction == "device_to_cpu" else (cpu, gpu_device)
    run_dir = tmp_path / "run"

    def cfg(device, epochs, *extra):
        return compose_cfg(base(device, cache_dir, *PROJECTOR, f"trainer.max_epochs={epochs}",
                                "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", f"run_dir={run_dir}",
                                *extra))

    done = TASKS["pretrain"](cfg(first, 1))
    assert done["global_step"] == 2 and done["precision"] == ("bf16-mixed" if on_cuda(first) else "32-true")
    written = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert written["global_step"] == 2
    more = TASKS["pretrain"](cfg(second, 2, "resume=force"))

    assert more["global_step"] == 4 and more["resumed_from"].endswith("last.ckpt")
    assert more["precision"] == ("bf16-mixed" if on_cuda(second) else "32-true")
    assert math.isfinite(more["final_loss"])
    segment = more["segments"][1]
    assert segment["mode"] == "force" and segment["from_step"] == 2
    if first != second:
        assert segment["changed"]["accelerator.accelerator"] == [accelerator(first), accelerator(second)]
    old = load_backbone_file(run_dir / "backbone.1.pt")["state_dict"]
    new = load_backbone_file(run_dir / "backbone.pt")["state_dict"]
    # the first segment's export is the checkpoint's backbone: the second segment starts there and trains on
    assert all(torch.equal(old[k], written["state_dict"][f"backbone.{k}"].cpu()) for k in old)
    assert any(not torch.equal(old[k], new[k]) for k in old if old[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in new.values() if v.is_floating_point())


# --------------------------------------------------------------------------------------- 6. the CLI
def test_cli_demo_then_linear_probe_on_the_device(gpu_device, cache_dir, tmp_path):
    """`python run.py experiment=demo accelerator=gpu`, shrunk, then `task=linear pretrained=<that run>` on the same
    accelerator: both exit 0, on the device (precision, speed options), and the probe writes its metrics."""
    acc = accelerator(gpu_device)
    data = [*tiny_data("lens_sim", cache_dir), "dataset.n_per_class=16", "dataset.batch_size=8",
            "dataset.num_workers=0", "trainer.enable_progress_bar=false"]
    pre = tmp_path / "demo"
    out = run_cli(["experiment=demo", f"accelerator={acc}", *data, "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", f"run_dir={pre}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((pre / "summary.json").read_text())
    assert (summary["method"], summary["backbone"], summary["global_step"]) == ("simclr", "resnet18", 2)
    assert math.isfinite(summary["final_loss"])
    assert summary["precision"] == ("bf16-mixed" if on_cuda(gpu_device) else "32-true")
    assert summary["speed"]["channels_last"] is on_cuda(gpu_device)  # auto: on for a conv net on CUDA
    assert summary["speed"]["optimizer"] == ("fused" if on_cuda(gpu_device) else "for-loop")

    probe = tmp_path / "linear"
    out = run_cli(["task=linear", f"pretrained={pre}", "task.max_epochs=3", f"accelerator={acc}", *data,
                   f"run_dir={probe}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["task"] == "linear" and metrics["method"] == "simclr"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
