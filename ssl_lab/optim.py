"""Optimizers (adam, adamw, sgd, LARS), weight-decay parameter groups and the warmup-cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ssl_lab.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "lars")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def _no_decay_names(module: nn.Module) -> set[str]:
    """Full names that modules ask not to decay via timm's ``no_weight_decay()`` convention (pos_embed, cls_token)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None,
                 exclude_bias_and_norm: bool = True, name: str | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a bias/norm group (no decay, ``lars_exclude=True``).

    Biases and norm scales (ndim <= 1) are excluded because decaying them hurts SSL training and LARS's trust
    ratio is meaningless for them. ``lr`` (if given) is set on every group so callers can concatenate groups of
    several modules with different rates. ``name`` names the groups (`<name>`, `<name>/no_decay`), which is how
    Lightning's LearningRateMonitor labels their logged lr. Empty groups are left out.
    """
    skip = _no_decay_names(module) if exclude_bias_and_norm else set()
    decay, no_decay = [], []
    for pname, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and (p.ndim <= 1 or pname in skip) else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    if name is not None:
        for g in groups:
            g["name"] = f"{name}/no_decay" if g.get("lars_exclude") else name
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)`` (You et al., 2017).

    Large-batch SSL (SimCLR, Barlow Twins) needs it so each layer moves by a fraction of its own norm.
    Groups with ``lars_exclude=True`` (biases, norms) take plain momentum-SGD steps.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, nesterov: bool = False, eps: float = 1e-8) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ConfigError(f"LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0; got lr={lr}, "
                              f"momentum={momentum}, weight_decay={weight_decay}, eta={eta}.")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, eta = group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = eta * w_norm / (g_norm + wd * w_norm + group["eps"])
                    # A zero weight or zero gradient gives no usable ratio: fall back to the plain step.
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


FUSED_OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")


def step_kwargs(name: str, on_cuda: bool, fused: bool | None = None) -> dict[str, bool]:
    """How torch's optimizer steps: ``fused`` (one kernel for all parameters) by default on CUDA for adam, adamw and
    sgd; ``foreach`` (batched over tensors) for the others on CUDA; torch's own default (a for-loop) on the CPU, so
    CPU runs are unchanged. ``fused=True`` forces the fused kernel (torch has CPU ones too), ``False`` refuses it."""
    if fused and name not in FUSED_OPTIMIZERS:
        raise ConfigError(f"optim.fused=true: optimizer '{name}' has no fused kernel; fused steps exist for "
                          f"{', '.join(FUSED_OPTIMIZERS)}. Remove optim.fused.")
    if fused is None:
        fused = on_cuda and name in FUSED_OPTIMIZERS
    if fused:
        return {"fused": True}
    return {"foreach": True} if on_cuda and name in FUSED_OPTIMIZERS else {}


def build_optimizer(params_or_groups: Iterable[Any], name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eta: float = 0.02,
                    nesterov: bool = False, fused: bool | None = None) -> torch.optim.Optimizer:
    """Optimizer by name. ``weight_decay`` is the default for groups that do not set their own (see param_groups).

    ``fused``: see ``step_kwargs`` (None: fused where every parameter is on a CUDA device, as under Lightning,
    which builds optimizers after moving the model)."""
    params = list(params_or_groups)
    if not params:
        raise ConfigError(f"Optimizer '{name}' got no trainable parameters; check what the task freezes.")
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    impl = step_kwargs(name, bool(tensors) and all(t.is_cuda for t in tensors), fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **impl)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                               **impl)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov)
    raise ConfigError(f"Unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)} (optim.name).")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then a half cosine
    from 1 down to ``min_lr_ratio`` at ``total_steps`` (held there after). Step 0 is never a zero-lr step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Multiplier:
    """Picklable LR-multiplier callable for LambdaLR (its fields go into the scheduler's state_dict)."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.schedule, self.total_steps = schedule, total_steps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if self.schedule == "cosine":
            return warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)
        return (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0) -> LambdaLR:
    """Per-step LambdaLR (Lightning ``interval="step"``) for ``schedule`` in SCHEDULES, with optional warmup."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"Unknown schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)} (optim.schedule).")
    if total_steps < 1:
        raise ConfigError(f"Scheduler needs total_steps >= 1, got {total_steps}; train for at least one step.")
    if warmup_steps < 0 or (schedule == "cosine" and warmup_steps >= total_steps):
        raise ConfigError(f"optim.warmup_steps={warmup_steps} must be >= 0 and smaller than the {total_steps} "
                          "training steps; lower the warmup or train longer.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be within [0, 1], got {min_lr_ratio}.")
    return PlannedLR(optimizer, _Multiplier(schedule, total_steps, warmup_steps, min_lr_ratio))


class PlannedLR(LambdaLR):
    """A LambdaLR whose plan is this run's and whose position is the checkpoint's.

    torch's load_state_dict restores everything the scheduler saved, the plan included: a run resumed to train
    longer would keep the old run's total steps (lr 0 after its end), and a run resumed with a new lr would keep
    the old one. Here a restore takes only the step count from the checkpoint; the schedule (total steps, warmup,
    floor), the base lrs and the optimizer's hyperparameters stay those this run built from its config, and the
    lr for the restored step is set from them. A resume with the same config gets the same numbers back, exactly.
    """

    _PLAN = "_planned_groups"

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> None:
        super().__init__(optimizer, multiplier)
        setattr(self, self._PLAN, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop(self._PLAN, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = getattr(self, self._PLAN)
        multipliers = [dict(fn.__dict__) for fn in self.lr_lambdas]
        base_lrs = list(self.base_lrs)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != self._PLAN})
        setattr(self, self._PLAN, plan)
        self.base_lrs = base_lrs
        for fn, fields in zip(self.lr_lambdas, multipliers):
            fn.__dict__.update(fields)
        # Lightning restores the optimizer first: its groups now hold the saved hyperparameters and lr.
        for group, planned in zip(self.optimizer.param_groups, plan):
            for key, value in planned.items():
                if key != "lr":
                    group[key] = value
        lrs = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]


LR_SCALINGS: tuple[str, ...] = ("none", "linear", "sqrt")
SCALING_KEYS = ("lr_scaling", "base_batch_size")


def scale_lr(optim: dict[str, Any], global_batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply ``optim.lr_scaling`` for the global batch; returns (optimizer config with the lr the run uses, a record).

    ``linear``: lr * B / base_batch_size (Goyal et al. 2017, SimCLR with LARS); ``sqrt``: lr * sqrt(B / base)
    (SimCLR's rule for small batches, and for Adam-type optimizers). ``none`` (the default): ``optim.lr`` is used as
    given. The record (global batch, rule, base and resulting lr) goes into the saved config and summary, so the
    rescaling is never hidden.
    """
    cfg = dict(optim)
    rule = cfg.pop("lr_scaling", "none") or "none"
    base = cfg.pop("base_batch_size", 256)
    if rule not in LR_SCALINGS:
        raise ConfigError(f"optim.lr_scaling={rule!r} is unknown; choose one of: {', '.join(LR_SCALINGS)}.")
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ConfigError(f"optim.base_batch_size={base!r} must be a positive integer (the batch optim.lr is for).")
    ratio = global_batch_size / base
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    lr = float(cfg["lr"]) * factor
    cfg["lr"] = lr
    record = {"global_batch_size": int(global_batch_size), "lr_scaling": rule, "base_batch_size": base,
              "base_lr": float(optim["lr"]), "lr": lr}
    return cfg, record
