"""Counting host reads of tensor values on the CPU: how tests/test_gpu.py checks, without a GPU, that a pretraining
step makes no host sync between logging steps.

On a GPU the host queues kernels ahead of the device; reading a device value on the host (``.item()``, ``float()``,
``bool()``, ``.tolist()``) waits until the device has caught up, and the device then idles while the host queues
the next step. On the CPU the same reads go through the ops counted here.
"""
from __future__ import annotations

import traceback

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_lab.callbacks import reads_values_now

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
