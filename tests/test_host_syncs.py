"""A pretraining step makes no host sync between logging steps.

On a GPU the host queues kernels ahead of the device; reading a device value on the host (``.item()``, ``float()``,
``bool()``, ``.tolist()``) waits until the device has caught up, and the device then idles while the host queues
the next step. On the CPU the same reads go through the ops counted here, so the property is checked without a GPU:
every read of a tensor value between two batches is counted, with the fused optimizer the GPU default uses and the
progress bar as trainer_kwargs sets it up on a GPU.
"""
from __future__ import annotations

import traceback

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_lab import speed
from ssl_lab.callbacks import SpeedMeter, StepProgressBar, reads_values_now
from ssl_lab.guards import build_guard
from ssl_lab.preemption import PreemptionCheckpoint
from ssl_lab.tasks.common import trainer_kwargs
from ssl_lab.tasks.pretrain import build_pretraining

READ_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal", "aten::nonzero",
            "aten::masked_select", "aten::unique", "aten::_unique2"}  # .item/float/bool and data-dependent shapes


class HostReads(TorchDispatchMode):
    """Records every op that needs a tensor's value on the host, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def note(self, what: str) -> None:
        self.reads.append(what + "\n" + "".join(traceback.format_stack(limit=8)[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READ_OPS:
            self.note(func._schema.name)
        return func(*args, **(kwargs or {}))


class PerBatch(pl.Callback):
    """The reads between the start of one batch and the start of the next, and whether that batch logged."""

    def __init__(self, mode: HostReads) -> None:
        self.mode, self.windows, self._start, self._logged = mode, [], None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is not None:
            self.windows.append((self._logged, self.mode.reads[self._start:]))
        self._start = len(self.mode.reads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._logged = reads_values_now(trainer)


@pytest.fixture
def reads_counted(monkeypatch):
    mode = HostReads()
    for name in ("tolist", "numpy"):  # these read CPU tensors without going through the dispatcher
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            mode.note(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return mode


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["method=simclr"], ["method=byol"], ["method=dino"],
                                       ["method=rotation", "augment=minimal"],
                                       ["method=mae", "backbone=vit_tiny", "augment=minimal"]],
                         ids=lambda o: o[0].split("=")[1])
def test_no_host_sync_between_logging_steps(tmp_path, cache_dir, monkeypatch, reads_counted, overrides):
    cfg = compose_cfg(["accelerator=cpu", "backbone=resnet15", "dataset=lens_sim", f"dataset.cache_dir={cache_dir}",
                       "dataset.n_per_class=40", "dataset.image_size=32", "dataset.batch_size=8",
                       "dataset.num_workers=0", "trainer.log_every_n_steps=4", "trainer.enable_progress_bar=true",
                       "+optim.fused=true", *overrides])
    datamodule, model, _, _ = build_pretraining(cfg)
    counter = PerBatch(reads_counted)
    callbacks = [counter, SpeedMeter(), build_guard(cfg.guard), PreemptionCheckpoint(tmp_path / "checkpoints")]
    monkeypatch.setattr(speed, "uses_cuda", lambda accelerator: True)  # the progress bar a GPU run gets
    kwargs = trainer_kwargs(cfg, "32-true", callbacks=callbacks, max_steps=10, logger=False,
                            enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    kwargs.pop("benchmark")  # a cuDNN flag: nothing to tune on the CPU, and global state
    bar = kwargs["callbacks"][-1]
    assert isinstance(bar, StepProgressBar) and bar.refresh_rate == 4
    trainer = pl.Trainer(default_root_dir=str(tmp_path), **kwargs)
    with reads_counted:
        trainer.fit(model, datamodule=datamodule)

    assert trainer.global_step == 10 and len(counter.windows) == 9
    quiet = [reads for logged, reads in counter.windows if not logged]
    busy = [reads for logged, reads in counter.windows if logged]
    assert len(quiet) == 7 and len(busy) == 2  # batches 4 and 8 log
    for reads in quiet:
        assert reads == [], "a host read between logging steps:\n" + "\n".join(reads)
    assert all(busy)  # the counter sees reads: the guard's flags and the logged values are read on these steps
    assert "loss" in bar.train_progress_bar.postfix  # the bar still shows the loss
