"""One momentum (EMA) mechanism for every teacher-student method (BYOL now; MoCo v3 and DINO reuse it).

A method mixes in `MomentumMixin` before `SSLMethod`, builds each target with `momentum_copy(online)` and
lists its (online, target) pairs in `momentum_pairs()`. The mixin then, after every optimizer step, moves each
target towards its online module by ``target = tau * target + (1 - tau) * online`` with tau rising from
``base_tau`` to ``final_tau`` on a half cosine over the run (the BYOL schedule).

Why this shape:
- Targets are ordinary submodules with ``requires_grad=False``: `param_groups` skips them, so no optimizer
  ever sees them, and they sit in the checkpoint's state_dict, so a resumed run continues from the same target.
- tau is a pure function of ``trainer.global_step``, which the checkpoint restores: no schedule state to save.
- The update is keyed to ``global_step`` advancing, not to every batch, so gradient accumulation gives one EMA
  update per optimizer step.
- Only parameters are averaged; a target's BatchNorm buffers follow its own forward passes (it runs in train
  mode, like the online network).
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from ssl_lab.callbacks import reads_values_now
from ssl_lab.errors import ConfigError


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` to serve as its EMA target (no gradients, never in an optimizer)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_tau(step: int, total_steps: int, base_tau: float, final_tau: float = 1.0) -> float:
    """EMA coefficient after ``step`` of ``total_steps`` optimizer steps: base_tau at 0, final_tau at the end."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """In place: every target parameter becomes ``tau * target + (1 - tau) * online``."""
    online_params, target_params = list(online.parameters()), list(target.parameters())
    if len(online_params) != len(target_params):
        raise ValueError(f"ema_update: online has {len(online_params)} parameters, target {len(target_params)}; "
                         "build the target with momentum_copy(online).")
    torch._foreach_lerp_(target_params, online_params, 1.0 - tau)


class MomentumMixin(ABC):
    """Lightning hooks that keep the EMA targets of `momentum_pairs()` up to date; mix in before SSLMethod."""

    def init_momentum(self, base_tau: float, final_tau: float = 1.0) -> None:
        if not 0.0 <= base_tau <= final_tau <= 1.0:
            raise ConfigError(f"Momentum needs 0 <= base_tau <= final_tau <= 1, got base_tau={base_tau}, "
                              f"final_tau={final_tau}; fix method.base_tau / method.final_tau.")
        self.base_tau, self.final_tau = float(base_tau), float(final_tau)
        self.tau = float(base_tau)
        self._ema_step = -1

    @abstractmethod
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (online, target) module pairs to average; each target built by `momentum_copy(online)`."""

    def current_tau(self) -> float:
        """tau for the update that follows the optimizer step just taken (base_tau for the first one)."""
        done = self.trainer.global_step - 1
        return cosine_tau(done, int(self.trainer.estimated_stepping_batches), self.base_tau, self.final_tau)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._ema_step = self.trainer.global_step  # a resumed run: steps before it are already in the targets

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.trainer.global_step == self._ema_step:
            return  # accumulating gradients: no optimizer step yet
        self._ema_step = self.trainer.global_step
        self.tau = self.current_tau()
        for online, target in self.momentum_pairs():
            ema_update(online, target, self.tau)
        # Logged on logging steps only: Lightning copies a logged Python float to the device, and a blocking
        # host-to-device copy is a host sync on a GPU (tests/test_gpu.py checks none happens in between).
        if reads_values_now(self.trainer):
            for name, value in self.scheduled_values().items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    def scheduled_values(self) -> dict[str, float]:
        """Values the schedules set for this step (host floats), for the log."""
        return {"tau": self.tau}
