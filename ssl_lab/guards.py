"""Guards while training: a NaN/Inf loss or gradient stops the run (or skips the step) before the weights move,
and collapsed embeddings or a loss stuck at chance are warned about while there is still time to fix the run.

Why before the optimizer step: with automatic optimization Lightning calls ``on_before_optimizer_step`` after the
backward pass (gradients all-reduced under DDP, unscaled under 16-mixed) and before ``optimizer.step``, so the
weights, the optimizer state and every checkpoint still hold the last good step. The buffers a forward pass moves
(BatchNorm running statistics, DINO's centre) are restored from a copy taken at the start of the step, so nothing
of a bad step survives in memory either, whatever saves the model afterwards.

Without a host sync where it can: a fused optimizer (the default on CUDA for adam, adamw and sgd) takes a
``found_inf`` flag on the device and skips the whole update there when it is set, as it does for the GradScaler.
The guard sets it from the loss and gradient-norm finite flags and puts the forward-moved buffers back with a
device-side select, so a bad step changes nothing while the host runs ahead. The flags are read where the host reads
values anyway (``reads_values_now``: logging steps, epoch ends), before any checkpoint is written and at the end: a
run with ``max_bad_steps=0`` stops at the first of those after a bad step, all bad steps skipped. Other optimizers
(LARS, the CPU's for-loop ones) and 16-mixed (the GradScaler decides) need the flags on the host before the step:
one sync per step. Under DDP the decision rests on the all-reduced gradients, the same on every rank, so all ranks
stop or skip together; strategies that shard gradients (FSDP, DeepSpeed) would need a collective here and are not
covered.

Collapse: every ``check_every_n_steps`` the backbone's features of the first view give ``train/embedding_std``
(:func:`embedding_spread`). At random initialisation it measured 0.26-0.33 for ResNet-15/18/50, 0.15 for ViT-tiny
and 0.14-0.18 for a two-layer conv net; constant features plus noise of relative size e give about e. The default
threshold 0.05 sits 3x below the lowest healthy value and still flags features that vary by under 5% of their size.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssl_lab.callbacks import reads_values_now
from ssl_lab.errors import ConfigError, TrainingDiverged

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"max_bad_steps": 0, "check_every_n_steps": None, "collapse_std": 0.05, "patience": 3}
# Under 16-mixed the GradScaler skips a step with inf gradients and halves its scale; from 2^16, 25 halvings reach
# 2^-9: gradients still inf there are not an fp16 range problem, so the run stops.
AMP_MAX_CONSECUTIVE_SKIPS = 25
CHANCE_TOLERANCE = 0.02  # a window-mean loss within 2% of the chance loss counts as "at chance"
MAX_NAMES = 5
# Methods whose objective cannot collapse to a constant embedding (pixel reconstruction): no embedding-std check.
NO_COLLAPSE_CHECK = frozenset({"MAE"})
COLLAPSE_ADVICE = {
    "BYOL": "BYOL: lower optim.weight_decay, keep the target slow (method.base_tau 0.99-0.996) and the predictor "
            "learning (its lr must not decay to 0)",
    "SimSiam": "SimSiam: check optim.weight_decay (the paper: 1e-4) and keep the predictor's lr from decaying (the "
               "paper holds it fixed)",
    "MoCoV3": "MoCo v3: check method.temperature (0.2 in the paper) and method.base_tau (0.99)",
    "BarlowTwins": "Barlow Twins: its batch standardisation needs a batch of many samples; check method.lambd "
                   "(0.0051) and widen the projector",
    "VICReg": "VICReg: raise method.var_weight (the variance hinge) relative to method.sim_weight",
    "SimCLR": "SimCLR: lower method.temperature or use a larger batch (more negatives)",
    "DINO": "DINO: keep method.teacher_temp below method.student_temp and method.center_momentum near 0.9",
}
CHANCE_ADVICE = {
    "PretextClassification": "pretext task: the transforms may look alike on this data (rotation on images with "
                             "rotational symmetry such as lensing rings; blur levels closer than the image's own "
                             "blur: spread method.sigmas)",
    "SimCLR": "SimCLR: identical embeddings give exactly this loss (see train/embedding_std); so do views that "
              "share nothing",
    "MoCoV3": "MoCo v3: identical keys give exactly this loss (see train/embedding_std); check method.base_tau",
}
COMMON_ADVICE = ("for every method: a lower optim.lr (or optim.warmup_epochs), and augmentations that make the "
                 "views differ (too weak and a constant embedding solves the task; too strong and they share "
                 "nothing)")


# --------------------------------------------------------------------------------------------------------- config
def _int_option(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or null" if allow_none else ""
        raise ConfigError(f"guard.{name}={value!r} must be an integer >= {minimum}{extra}.")
    return int(value)


def _float_option(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"guard.{name}={value!r} must be a number >= {minimum}.")
    return float(value)


def build_guard(cfg: Mapping[str, Any] | DictConfig | None) -> TrainingGuard:
    """The guard from the config's ``guard:`` section (missing section or keys: the defaults)."""
    if cfg is None:
        options: dict[str, Any] = {}
    elif isinstance(cfg, DictConfig):
        options = OmegaConf.to_container(cfg, resolve=True)
    elif isinstance(cfg, Mapping):
        options = dict(cfg)
    else:
        raise ConfigError(f"guard={cfg!r} must be a section with the keys {', '.join(DEFAULTS)}.")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"guard.{unknown[0]} is not an option; the guard options are: {', '.join(DEFAULTS)}.")
    return TrainingGuard(**{**DEFAULTS, **options})


# --------------------------------------------------------------------------------------------------- pure helpers
def step_verdict(loss_finite: bool, grads_finite: bool, *, scaled: bool, distributed: bool) -> str:
    """``ok``, ``scaler`` (16-mixed: the GradScaler skips this step itself) or ``bad``.

    Under DDP the gradients are all-reduced, so every rank sees the same ``grads_finite``; the loss is the rank's
    own, so it may decide only in a single process (ranks that disagree would leave the others waiting forever).
    A NaN loss on one rank makes every rank's gradients NaN anyway."""
    loss_bad = not loss_finite and not distributed
    if not grads_finite and scaled and not loss_bad:
        return "scaler"
    return "bad" if loss_bad or not grads_finite else "ok"


def embedding_spread(features: Tensor) -> Tensor:
    """Std over the batch of the L2-normalised features, per dimension, averaged, times sqrt(D): about 1 for
    isotropic embeddings, 0 for a constant one (the collapse measure of Chen & He 2021, scaled by sqrt(D))."""
    z = F.normalize(features.detach().float().flatten(1), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


def chance_warmup(total_steps: float, steps_per_epoch: float) -> int:
    """Steps before the chance-loss check starts: the later of one epoch and 20% of the planned steps (losses start
    near chance), but at most half the run, so a short run still gets its second half checked."""
    per_epoch = int(steps_per_epoch) if math.isfinite(steps_per_epoch) else 0
    if not math.isfinite(total_steps):
        return per_epoch
    return min(max(per_epoch, math.ceil(0.2 * total_steps)), int(total_steps) // 2)


def _family_advice(module: nn.Module, table: Mapping[str, str]) -> list[str]:
    return [table[c.__name__] for c in type(module).__mro__ if c.__name__ in table][:1]


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6g}"


def _names(names: list[str]) -> str:
    more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
    return ", ".join(names[:MAX_NAMES]) + more


def saved_last_checkpoint(trainer: pl.Trainer) -> tuple[Path | None, int | None]:
    """The newest ``last.ckpt`` a ModelCheckpoint of this run keeps, and its global step when readable."""
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or not cb.dirpath:
            continue
        path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        if path.is_file():
            try:  # mmap: only the small pickle is read, the tensors stay on disk
                step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
            except Exception:  # a diagnostic in an error message: an unreadable file only loses the step
                step = None
            return path, step if isinstance(step, int) else None
    return None, None


# ------------------------------------------------------------------------------------------------------- callback
class TrainingGuard(pl.Callback):
    """Stops on NaN/Inf (or skips up to ``max_bad_steps`` bad steps) and warns on collapse or a loss at chance.

    ``check_every_n_steps``: None = the Trainer's ``log_every_n_steps``. ``collapse_std``: 0 turns the collapse
    warning off (``train/embedding_std`` is still logged). ``amp_max_skips``: consecutive GradScaler skips under
    16-mixed before the run stops. ``chance_after_steps``: None = :func:`chance_warmup`.
    """

    def __init__(self, max_bad_steps: int = 0, check_every_n_steps: int | None = None, collapse_std: float = 0.05,
                 patience: int = 3, amp_max_skips: int = AMP_MAX_CONSECUTIVE_SKIPS,
                 chance_after_steps: int | None = None) -> None:
        self.max_bad_steps = _int_option("max_bad_steps", max_bad_steps, 0)
        self.check_every_n_steps = _int_option("check_every_n_steps", check_every_n_steps, 1, allow_none=True)
        self.collapse_std = _float_option("collapse_std", collapse_std, 0.0)
        self.patience = _int_option("patience", patience, 1)
        self.amp_max_skips = _int_option("amp_max_skips", amp_max_skips, 1)
        self.chance_after_steps = _int_option("chance_after_steps", chance_after_steps, 0, allow_none=True)
        self.skipped_steps = 0
        self.skipped_at: list[int] = []
        self.amp_skipped_steps = 0
        self.warnings: list[str] = []
        self.embedding_std: float | None = None
        self._warned: set[str] = set()
        self._amp_run = 0
        self._low_std = 0
        self._at_chance = 0
        self._every = 1
        self._chance_from = 0
        self._checked_step: int | None = None
        self._loss_sum: Tensor | None = None
        self._loss_n: Tensor | None = None
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._saved_step: int | None = None
        self._pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor | None]] = []  # device-skipped, unread flags
        self._state_ready = False
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------------------------------------- bookkeeping
    def summary(self) -> dict[str, Any]:
        """What the run summary records about the guard."""
        return {"skipped_steps": self.skipped_steps, "skipped_at": list(self.skipped_at),
                "amp_skipped_steps": self.amp_skipped_steps, "warnings": list(self.warnings)}

    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None and self._module is not None:
            self._read_flags(self._trainer, self._module)  # a checkpoint records every skipped step
        return {**self.summary(), "warned": sorted(self._warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.skipped_at = [int(s) for s in state_dict.get("skipped_at", [])]
        self.amp_skipped_steps = int(state_dict.get("amp_skipped_steps", 0))
        self.warnings = [str(w) for w in state_dict.get("warnings", [])]
        self._warned = {str(w) for w in state_dict.get("warned", [])}

    def _warn(self, message: str, kind: str | None = None) -> None:
        if kind is not None:
            if kind in self._warned:
                return
            self._warned.add(kind)
        self.warnings.append(message)
        log.warning(message)

    # ----------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = self.check_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        if self.chance_after_steps is not None:
            self._chance_from = self.chance_after_steps
        else:
            per_epoch = trainer.num_training_batches / max(trainer.accumulate_grad_batches, 1)
            self._chance_from = chance_warmup(float(trainer.estimated_stepping_batches), math.ceil(per_epoch)
                                              if math.isfinite(per_epoch) else per_epoch)
        self._buffers = [b for b in pl_module.buffers()]
        self._saved = [b.detach().clone() for b in self._buffers]
        self._saved_step = None
        self._pending, self._state_ready = [], False
        self._trainer, self._module = trainer, pl_module

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Once per optimizer step (the first micro-batch under gradient accumulation): what the step may undo.
        if self._buffers and self._saved_step != trainer.global_step:
            with torch.no_grad():
                torch._foreach_copy_(self._saved, self._buffers)  # one fused copy, no host sync
            self._saved_step = trainer.global_step

    def _restore_buffers(self) -> None:
        if self._buffers and self._saved_step is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)

    def _skips_on_device(self, optimizer: Any, params: list[Tensor]) -> bool:
        """Whether this optimizer's step honours ``found_inf`` on the device (torch's fused kernels do). Fused SGD
        with momentum allocates its buffers uninitialised on its first step and only fills them if the step runs,
        so it qualifies once every buffer exists."""
        if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
            return False
        if not self._state_ready:
            momentum = any(group.get("momentum", 0) for group in optimizer.param_groups)
            self._state_ready = not (isinstance(optimizer, torch.optim.SGD) and momentum) or all(
                optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params if p.grad is not None)
        return self._state_ready

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        loss = (getattr(pl_module, "last_terms", None) or {}).get("loss")
        device = grads[0].device if grads else pl_module.device
        loss_ok = torch.isfinite(loss).all().to(device) if loss is not None else torch.ones((), dtype=torch.bool,
                                                                                             device=device)
        grads_ok = (torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0)) if grads
                    else torch.ones((), dtype=torch.bool, device=device))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        distributed = trainer.world_size > 1
        if scaler is None and self._skips_on_device(optimizer, params):
            bad = ~grads_ok if distributed else ~(loss_ok & grads_ok)  # as step_verdict decides, on the device
            optimizer.found_inf = bad.float()  # the fused kernel leaves weights and state alone where this is 1
            if self._buffers and self._saved_step is not None:
                with torch.no_grad():
                    for buf, saved in zip(self._buffers, self._saved):
                        torch.where(bad, saved, buf, out=buf)
            self._pending.append((int(trainer.global_step), bad, loss_ok, grads_ok,
                                  None if loss is None else loss.detach()))
            return
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        loss_finite, grads_finite = (bool(v) for v in torch.stack([loss_ok, grads_ok]).tolist())  # the one sync
        verdict = step_verdict(loss_finite, grads_finite, scaled=scaler is not None, distributed=distributed)
        if verdict == "ok":
            self._amp_run = 0
            return
        step = int(trainer.global_step)
        if verdict == "scaler":
            self._amp_run += 1
            self.amp_skipped_steps += 1
            log.info("step %d: inf/NaN gradients under 16-mixed; the GradScaler skips the step and lowers its scale "
                     "(%d in a row)", step, self._amp_run)
            if self._amp_run <= self.amp_max_skips:
                return
            why = (f"the GradScaler skipped {self._amp_run} steps in a row (loss scale now {scaler.get_scale():g}): "
                   "the gradients overflow at every scale")
            self._stop(trainer, pl_module, params, why)
        weights_ok = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        if weights_ok and self.skipped_steps < self.max_bad_steps:
            self._skip(trainer, params, step)
            return
        why = "non-finite loss or gradients"
        if not weights_ok:
            why += "; the weights themselves are already non-finite, so skipping cannot help"
        elif self.max_bad_steps:
            why += f"; {self.skipped_steps} bad step(s) were skipped already, guard.max_bad_steps={self.max_bad_steps}"
        self._stop(trainer, pl_module, params, why)

    def _skip(self, trainer: pl.Trainer, params: list[Tensor], step: int) -> None:
        for p in params:
            p.grad = None  # no gradient: no optimizer moves the weight or its state (momentum, Adam moments)
        self._restore_buffers()
        self._record_skip(trainer, step)

    def _record_skip(self, trainer: pl.Trainer, step: int) -> None:
        self.skipped_steps += 1
        self.skipped_at.append(step)
        self._warn(f"step {step} (epoch {trainer.current_epoch}): non-finite loss or gradients; skipped it without "
                   f"updating any weight ({self.skipped_steps} of guard.max_bad_steps={self.max_bad_steps} skipped "
                   "so far)")

    def _read_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Account for the steps the fused optimizer skipped on the device since the last read: record them as
        skipped, or stop once there are more than ``max_bad_steps``."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([bad for _, bad, *_ in pending]).tolist()  # the one sync, on a logging step
        bad = [entry for entry, flag in zip(pending, flags) if flag]
        if not bad:
            return
        weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all())
        room = self.max_bad_steps - self.skipped_steps if weights_ok else 0
        for step, *_ in bad[:max(room, 0)]:
            self._record_skip(trainer, step)
        if len(bad) <= room:
            return
        step, _, loss_ok, grads_ok, loss = bad[max(room, 0)]
        loss_value = float(loss.float().mean()) if loss is not None else None
        what = ("non-finite loss" if not bool(loss_ok) else "non-finite gradients with a finite loss"
                if not bool(grads_ok) else "non-finite loss or gradients")
        why = f"{what} (loss {_fmt(loss_value) if loss_value is not None else 'not known'})"
        if not weights_ok:
            why += "; the weights themselves are already non-finite, so skipping cannot help"
        elif self.max_bad_steps:
            why += f"; {self.skipped_steps} bad step(s) were skipped already, guard.max_bad_steps={self.max_bad_steps}"
        later = f" and {len(bad) - room - 1} more bad step(s) after it" if len(bad) - room > 1 else ""
        message = self._diagnosis(
            trainer, pl_module, why, f"The fused optimizer skipped step {step}{later} on the device: no weight, "
            f"BatchNorm statistic or optimizer state moved in {'them' if later else 'it'}, and no checkpoint was "
            f"written after it. The check reads these flags on logging steps, so it stopped at step "
            f"{trainer.global_step}; set optim.fused=false for a check (and the parameter names) at every step.",
            at_step=step, step_detail=False)
        raise TrainingDiverged(message)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], why: str) -> None:
        message = self._diagnosis(trainer, pl_module, why, "Nothing of this step was written: the weights, optimizer "
                                  "state and checkpoints hold the step before.")
        for p in params:
            p.grad = None
        self._restore_buffers()
        raise TrainingDiverged(message)  # the CLI logs it (run.log) and prints it as one line

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """A step whose loss and gradients were finite can still overflow the weights (an lr so high the update is
        Inf); such weights must not reach a checkpoint or backbone.pt. One check per save, not per step."""
        self._read_flags(trainer, pl_module)
        params = list(pl_module.parameters())
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            last = int(trainer.global_step) - 1
            raise TrainingDiverged(self._diagnosis(
                trainer, pl_module, f"the update of step {last} made the weights non-finite although that step's "
                f"loss and gradients were finite; stopped {when}", "Nothing was written from these weights."))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._check_weights(trainer, pl_module, "before writing a checkpoint")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_weights(trainer, pl_module, "at the end of training, before anything is exported")

    def _diagnosis(self, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str, written: str,
                   at_step: int | None = None, step_detail: bool = True) -> str:
        """One line: where, what was non-finite, the likely causes in order, and how to continue.

        ``step_detail``: the module's last loss terms and gradients belong to the bad step (False when the bad step
        was found later, from the flags the device kept)."""
        step = trainer.global_step if at_step is None else at_step
        detail = self._step_detail(pl_module) if step_detail else "which parameters: not recorded on the device"
        optim_cfg = getattr(pl_module, "optim_cfg", None) or {}
        current = optimizer_lr(trainer)
        lr = optim_cfg.get("lr", current)
        lr_text = f"optim.lr={_fmt(float(lr))}" if lr is not None else "optim.lr"
        if current is not None and lr is not None and not math.isclose(float(current), float(lr)):
            lr_text += f", {_fmt(float(current))} at this step of the schedule"
        causes = [f"learning rate too high ({lr_text}): lower it, e.g. 10x, or add optim.warmup_epochs",
                  "NaN/Inf input pixels: set dataset.nan_policy (error, zero or drop) and check the file with "
                  "`python -m ssl_lab.inspect <file>`"]
        precision = str(trainer.precision)
        if "16" in precision and "bf16" not in precision:
            causes.append(f"mixed-precision overflow (accelerator.precision={precision}): use "
                          "accelerator.precision=bf16-mixed or 32-true")
        ckpt, ckpt_step = saved_last_checkpoint(trainer)
        low = f"optim.lr={_fmt(float(lr) / 10)}" if lr is not None else "a lower optim.lr"
        if ckpt is None:
            resume = f"No checkpoint was saved yet: start again with a lower lr (e.g. {low})"
        else:
            at = f" (step {ckpt_step})" if ckpt_step is not None else ""
            # resume=force applies the new lr to the restored optimizer (ssl_lab.optim.PlannedLR)
            resume = (f"Last good checkpoint: {ckpt}{at}; continue from it with run_dir={ckpt.parent.parent} "
                      f"resume=force {low}")
        numbered = "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1))
        return (f"training diverged at step {step} (epoch {trainer.current_epoch}): {why}. {detail}. "
                f"Likely causes, most likely first: {numbered}. {resume}. {written}")

    @staticmethod
    def _step_detail(pl_module: pl.LightningModule) -> str:
        """The current step's loss terms, gradient norm and the parameters with NaN/Inf gradients or weights."""
        terms = {k: float(torch.as_tensor(v).float().mean()) for k, v in
                 (getattr(pl_module, "last_terms", None) or {}).items()}
        shown = ", ".join(f"{k}={_fmt(v)}" + ("" if math.isfinite(v) else " (non-finite)") for k, v in terms.items())
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([g for _, g in named], 2.0)) if named else 0.0
        bad_grads = [n for n, g in named if not bool(torch.isfinite(g).all())]
        bad_weights = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if math.isfinite(norm):
            grads = f"gradient norm {_fmt(norm)} (finite)"
        elif bad_grads:
            grads = f"gradient norm {_fmt(norm)} (non-finite), NaN/Inf gradients in {_names(bad_grads)}"
        else:
            grads = f"gradient norm {_fmt(norm)} (overflowed float32; every gradient entry is finite but huge)"
        weights = f"; NaN/Inf weights in {_names(bad_weights)}" if bad_weights else ""
        return f"Loss and terms: {shown or 'not known (the module keeps no last_terms)'}; {grads}{weights}"

    # ------------------------------------------------------------------------------------------ collapse watch
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = (getattr(pl_module, "last_terms", None) or {}).get("loss")
        if loss is not None:
            finite = torch.isfinite(loss)
            value = torch.where(finite, loss.float(), torch.zeros_like(loss, dtype=torch.float32))
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_n = finite.float() if self._loss_n is None else self._loss_n + finite.float()
        step = int(trainer.global_step)
        if reads_values_now(trainer):
            self._read_flags(trainer, pl_module)
        if step == 0 or step == self._checked_step or step % self._every:
            return  # no optimizer step since the last check (accumulating), or not a check step
        self._checked_step = step
        self._read_flags(trainer, pl_module)
        self._check_embeddings(trainer, pl_module, batch, step)
        self._check_chance(trainer, pl_module, batch, step)

    def _check_embeddings(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        views = batch.get("views") if isinstance(batch, Mapping) else None
        backbone = getattr(pl_module, "backbone", None)
        skip = (not getattr(pl_module, "collapse_monitor", True)
                or any(c.__name__ in NO_COLLAPSE_CHECK for c in type(pl_module).__mro__))
        if skip or not isinstance(backbone, nn.Module) or not views or not isinstance(views[0], Tensor):
            return
        x = views[0]
        if x.ndim != 4 or x.shape[0] < 2:  # the same on every rank (DistributedSampler evens out the batches), so
            return                         # a SyncBatchNorm backbone never waits for a rank that skipped
        std = float(embedding_spread(backbone_features(trainer, backbone, x)))
        self.embedding_std = std
        pl_module.log("train/embedding_std", std, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self._low_std = self._low_std + 1 if std < self.collapse_std else 0
        if self._low_std >= self.patience:
            advice = "; ".join([*_family_advice(pl_module, COLLAPSE_ADVICE), COMMON_ADVICE])
            self._warn(f"embeddings are collapsing (train/embedding_std {std:.3g} < guard.collapse_std="
                       f"{self.collapse_std:g} for {self._low_std} checks in a row, at step {step}): the backbone "
                       f"maps different images to nearly the same features. Common causes: {advice}.", "collapse")

    def _check_chance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        if self._loss_sum is None:
            return
        total, count = (float(v) for v in torch.stack([self._loss_sum, self._loss_n]).tolist())
        self._loss_sum = self._loss_n = None
        chance_fn = getattr(pl_module, "chance_loss", None)
        x = batch.get("x") if isinstance(batch, Mapping) else None
        if count == 0 or not callable(chance_fn) or not isinstance(x, Tensor):
            return
        chance = chance_fn(int(x.shape[0]) * trainer.world_size)
        if chance is None or not math.isfinite(chance) or chance <= 0:
            return
        mean = total / count
        near = step >= self._chance_from and abs(mean - chance) <= CHANCE_TOLERANCE * chance
        self._at_chance = self._at_chance + 1 if near else 0
        if self._at_chance >= self.patience:
            advice = "; ".join([*_family_advice(pl_module, CHANCE_ADVICE), COMMON_ADVICE])
            self._warn(f"the loss sits at chance ({mean:.4g}, mean of the last {int(count)} steps, vs {chance:.4g} "
                       f"for an uninformative model; within {CHANCE_TOLERANCE:.0%} for {self._at_chance} checks in "
                       f"a row, at step {step}): the method is not learning. Common causes: {advice}.", "chance")


def optimizer_lr(trainer: pl.Trainer) -> float | None:
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers and optimizers[0].param_groups else None


@torch.no_grad()
def backbone_features(trainer: pl.Trainer, backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's features of ``x`` as training sees them, leaving no trace on the run.

    Train mode: BatchNorm normalises by the batch, as in the loss; in eval mode a young network's running
    statistics (mean 0, var 1 at the start) squash every image onto one direction and would look collapsed (a
    random ResNet-18 scores 0.06 in eval mode, 0.27 in train mode). The running statistics are put back afterwards,
    the RNG is forked (dropout draws nothing from the run's streams), and a compiled backbone runs eagerly (a
    no-grad call would recompile it)."""
    buffers = list(backbone.buffers())
    saved = [b.detach().clone() for b in buffers]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with (torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext(),
              torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context()):
            return backbone(x)
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)
