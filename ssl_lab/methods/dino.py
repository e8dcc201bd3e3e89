"""DINO (Caron et al. 2021): a student matches its EMA teacher's centred, sharpened output on other views.

No negatives and no predictor: collapse is avoided by two opposite pressures on the teacher's output. Centring
(subtracting an EMA of the teacher's batch mean) keeps one prototype from dominating; sharpening (a teacher
temperature below the student's) keeps the output from becoming uniform.

Multi-crop (``n_local_crops > 0``): besides the 2 global views the student sees N small crops at ``local_size``;
the teacher sees only the global views, so the student learns "local-to-global" correspondences cheaply.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_lab.augment import Augment
from ssl_lab.backbones import VGG_MIN_SIZE
from ssl_lab.distributed import all_reduce_mean
from ssl_lab.errors import ConfigError
from ssl_lab.heads import dino_head
from ssl_lab.losses import dino_loss
from ssl_lab.methods.base import SSLMethod
from ssl_lab.methods.momentum import MomentumMixin, momentum_copy

LOCAL_FRACTION = 3 / 7  # the paper's 96 px local crops of 224 px global views


def teacher_temp_at(epoch: float, warmup_temp: float, temp: float, warmup_epochs: float) -> float:
    """Teacher temperature after ``epoch`` (fractional) epochs: linear from ``warmup_temp`` to ``temp`` over
    ``warmup_epochs``, then constant. A pure function of training progress, so a resumed run repeats it."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(temp)
    return float(warmup_temp + (temp - warmup_temp) * max(epoch, 0.0) / warmup_epochs)


def _positive(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"method.{option}={value!r} must be a positive number.")
    return float(value)


def _count(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"method.{option}={value!r} must be an integer >= 0.")
    return value


def _scale(value: Any, option: str) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and 0 < value[0] <= value[1] <= 1)
    if not ok:
        raise ConfigError(f"method.{option}={value!r} must be a crop area range [lo, hi] with 0 < lo <= hi <= 1, "
                          "e.g. [0.05, 0.4].")
    return float(value[0]), float(value[1])


class DINO(MomentumMixin, SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 out_dim: int = 4096, proj_hidden_dims: Sequence[int] = (2048, 2048), proj_output_dim: int = 256,
                 head_norm: str = "none", student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float | None = None, warmup_teacher_temp_epochs: float = 0.0,
                 center_momentum: float = 0.9, freeze_last_layer: int = 1, n_local_crops: int = 0,
                 local_size: int | None = None, local_crop_scale: Sequence[float] = (0.05, 0.4),
                 global_crop_scale: Sequence[float] | None = None, base_tau: float = 0.996, final_tau: float = 1.0,
                 seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.student_temp = _positive(student_temp, "student_temp")
        self.teacher_temp = _positive(teacher_temp, "teacher_temp")
        self.warmup_teacher_temp = (self.teacher_temp if warmup_teacher_temp is None
                                    else _positive(warmup_teacher_temp, "warmup_teacher_temp"))
        if (isinstance(warmup_teacher_temp_epochs, bool) or not isinstance(warmup_teacher_temp_epochs, (int, float))
                or warmup_teacher_temp_epochs < 0):
            raise ConfigError(f"method.warmup_teacher_temp_epochs={warmup_teacher_temp_epochs!r} must be a number "
                              ">= 0 (0: no warmup).")
        self.warmup_teacher_temp_epochs = float(warmup_teacher_temp_epochs)
        if (isinstance(center_momentum, bool) or not isinstance(center_momentum, (int, float))
                or not 0 <= center_momentum <= 1):
            raise ConfigError(f"method.center_momentum={center_momentum!r} must be in [0, 1] (the paper: 0.9).")
        self.center_momentum = float(center_momentum)
        self.freeze_last_layer = _count(freeze_last_layer, "freeze_last_layer")
        self.n_local_crops = _count(n_local_crops, "n_local_crops")
        if local_size is not None and (isinstance(local_size, bool) or not isinstance(local_size, int)
                                       or local_size < 1):
            raise ConfigError(f"method.local_size={local_size!r} must be a positive integer (px), or null for "
                              "about 3/7 of the global view size.")
        self.local_size = local_size
        self.local_crop_scale = _scale(local_crop_scale, "local_crop_scale")
        self.global_crop_scale = _scale(global_crop_scale, "global_crop_scale")
        self._check_views()

        self.head = dino_head(backbone.num_features, list(proj_hidden_dims), proj_output_dim, out_dim,
                              norm=head_norm)
        # The teacher starts as an exact copy of the student's backbone + head and then trails it by EMA.
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.init_momentum(base_tau, final_tau)
        # A buffer: saved in the checkpoint, so a resumed run continues from the same centre.
        self.register_buffer("center", torch.zeros(1, out_dim))

    # ------------------------------------------------------------------------------------------------------ views
    def _check_views(self) -> None:
        """Refuse view settings the preset or the backbone cannot honour, before any training."""
        has_crop = "resized_crop" in self.augment.active
        if self.global_crop_scale is not None and not has_crop:
            raise ConfigError(f"method.global_crop_scale={list(self.global_crop_scale)} needs a resized_crop op, but "
                              f"augment={self.augment.name} has none; add augment.ops.resized_crop or set "
                              "method.global_crop_scale=null.")
        if not self.n_local_crops:
            return
        if not has_crop:
            raise ConfigError(f"method.n_local_crops={self.n_local_crops} needs small crops, but augment="
                              f"{self.augment.name} has no resized_crop op; use augment=physics or augment=minimal, "
                              "add augment.ops.resized_crop, or set method.n_local_crops=0.")
        name = str(getattr(self.backbone, "name", ""))
        kwargs = getattr(self.backbone, "build_kwargs", {})
        if name.startswith("vit") and not kwargs.get("dynamic_img_size"):
            raise ConfigError(f"method.n_local_crops={self.n_local_crops} feeds backbone={name} views smaller than "
                              "the size it was built for; build it for any size with "
                              "+backbone.dynamic_img_size=true, or set method.n_local_crops=0.")
        if self.augment.size is not None:
            self.local_view_size(self.augment.size)

    def local_view_size(self, global_size: int) -> int:
        """The side of the local crops for global views of ``global_size`` px (checked against the backbone)."""
        name = str(getattr(self.backbone, "name", ""))
        patch = getattr(self.backbone, "build_kwargs", {}).get("patch_size") if name.startswith("vit") else None
        unit = int(patch) if patch else 1  # a ViT needs whole patches
        if self.local_size is None:
            size = max(unit, round(global_size * LOCAL_FRACTION / unit) * unit)
            what = f"the default local size {size} px (about 3/7 of the {global_size} px global views)"
        else:
            size = self.local_size
            what = f"method.local_size={size}"
            if size > global_size:
                raise ConfigError(f"{what} is larger than the {global_size} px global views; set method.local_size "
                                  f"to at most {global_size}, or null for about 3/7 of it.")
            if size % unit:
                raise ConfigError(f"{what} is not a multiple of {name}'s patch size {unit}; use a multiple such as "
                                  f"method.local_size={max(unit, size // unit * unit)}, or null.")
        if name.startswith("vgg") and size < VGG_MIN_SIZE:
            raise ConfigError(f"{what} is too small for {name} (five 2x2 max-pools need {VGG_MIN_SIZE} px); use a "
                              "ResNet or ViT backbone, larger views (augment.size), or method.n_local_crops=0.")
        return size

    def make_views(self, x: Tensor, generator: torch.Generator) -> list[Tensor]:
        """2 global views (the teacher's and the student's), then ``n_local_crops`` small ones (student only)."""
        views = self.augment(x, generator=generator, n_views=2, crop_scale=self.global_crop_scale)
        if self.n_local_crops:
            size = self.local_view_size(views[0].shape[-1])
            views += self.augment(x, generator=generator, n_views=self.n_local_crops, out_size=size,
                                  crop_scale=self.local_crop_scale)
        return views

    # ------------------------------------------------------------------------------------------------- training
    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def epochs_done(self) -> float:
        """Training progress in (fractional) epochs, from the optimizer step count the checkpoint restores."""
        if self._trainer is None:
            return 0.0
        per_epoch = self.trainer.num_training_batches
        if not math.isfinite(per_epoch) or per_epoch < 1:
            return float(self.current_epoch)
        return self.trainer.global_step / math.ceil(per_epoch / self.trainer.accumulate_grad_batches)

    def current_teacher_temp(self) -> float:
        return teacher_temp_at(self.epochs_done(), self.warmup_teacher_temp, self.teacher_temp,
                               self.warmup_teacher_temp_epochs)

    def loss(self, views):
        if len(views) < 2:
            raise ValueError(f"DINO needs 2 global views (then any local ones), got {len(views)} view(s).")
        # Both global views in one pass; the local views (another size) in a second one.
        x_global = torch.cat(views[:2])
        outs = [self.head(self.backbone(x_global))]
        if len(views) > 2:
            outs.append(self.head(self.backbone(torch.cat(views[2:]))))
        student = list(torch.cat(outs).chunk(len(views)))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(x_global))
        temp = self.current_teacher_temp()
        loss = dino_loss(student, list(teacher.chunk(2)), self.center, self.student_temp, temp)
        if self.training:
            self.update_center(teacher)  # after the loss: the loss used the centre from before this step
        return loss, {}  # the temperature is a host float: logged on logging steps (scheduled_values)

    def scheduled_values(self) -> dict[str, float]:
        return {**super().scheduled_values(), "teacher_temp": self.current_teacher_temp()}

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """center <- m * center + (1 - m) * (mean teacher output over both global views and the GLOBAL batch)."""
        batch_mean = all_reduce_mean(teacher_logits.detach().float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        # The paper freezes the prototypes for the first epoch(s): moving them while the rest is still random
        # destabilises training. No gradient means no step and no weight decay for them (any optimizer).
        if self.current_epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None
