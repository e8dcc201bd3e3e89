"""The lightly side of benchmarks/peer_check.py: each method as lightly's own ResNet-18 benchmark builds it.

Heads, losses, momentum and transforms follow lightly's Imagenette benchmark (ResNet-18, batch 128,
docs/source/getting_started/benchmarks/imagenette_benchmark.py), the one of its benchmarks closest to this scale
that has every method here but MoCo v3. Adapted only where the data force it: 1-channel PIL images (mode 'L'),
the data's own mean/std instead of ImageNet's, the image size as input size, no blur at 32 px (what lightly's
CIFAR-10 benchmark does for its 32 px images), and no flips for digits (a flipped 2 is no digit). Lightly 1.6 has no
MoCo v3: that row uses lightly's MoCo heads in their documented v3 setting, its momentum helpers, BYOL's transform
(MoCo v3's augmentation) and the paper's ResNet recipe (temperature 1.0, momentum 0.99 -> 1), with the paper's loss
written out below. The optimiser, lr and schedule are NOT lightly's: they are copied from the ssl_lab run
(see `train`), so the comparison is of methods and recipes, not of optimiser tuning.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import heads
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform, SimCLRTransform,
                                VICRegTransform)
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_lab.errors import ConfigError, DataError
from ssl_lab.optim import SCALING_KEYS, build_optimizer, build_scheduler

METHODS = ("simclr", "byol", "barlow", "vicreg", "mocov3", "dino")
MOCOV3_TEMPERATURE = 1.0  # MoCo v3's ResNet-50 recipe (its ViT recipe: 0.2)


def transform(method: str, size: int, mean: float, std: float, flips: bool, n_local: int, local_size: int) -> Any:
    """lightly's transform for ``method`` (Imagenette benchmark parameters, adapted as the module docstring says)."""
    norm = {"mean": [float(mean)], "std": [float(std)]}
    blur = size > 32
    hf = 0.5 if flips else 0.0
    if method in ("simclr", "vicreg"):
        cls = SimCLRTransform if method == "simclr" else VICRegTransform
        extra = {} if blur else {"gaussian_blur": 0.0}
        return cls(input_size=size, cj_strength=0.5, hf_prob=hf, normalize=norm, **extra)
    if method in ("byol", "barlow", "mocov3"):
        extra = {} if blur else {"gaussian_blur": 0.0}
        return BYOLTransform(BYOLView1Transform(input_size=size, hf_prob=hf, normalize=norm, **extra),
                             BYOLView2Transform(input_size=size, hf_prob=hf, normalize=norm, **extra))
    if method == "dino":
        extra = {} if blur else {"gaussian_blur": (0.0, 0.0, 0.0)}
        return DINOTransform(global_crop_size=size, local_crop_size=local_size, n_local_views=n_local,
                             cj_strength=0.5, hf_prob=hf, normalize=norm, **extra)
    raise ConfigError(f"lightly recipe: unknown method {method!r}; choose from {', '.join(METHODS)}.")


class ViewsDataset(Dataset):
    """uint8 [N, H, W] images as PIL mode 'L', each turned into a list of views by a lightly transform."""

    def __init__(self, images: np.ndarray, views: Any) -> None:
        self.images, self.views = images, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[Tensor]:
        return self.views(Image.fromarray(self.images[i], mode="L"))


class LightlyMethod(nn.Module):
    """A backbone, lightly's heads and loss; ``loss(views)`` is one training objective, ``momentum(step, total)``
    the EMA update lightly's benchmark makes before each step (methods with a target network only)."""

    def __init__(self, method: str, backbone: nn.Module) -> None:
        super().__init__()
        self.method, self.backbone = method, backbone
        f = backbone.num_features
        self.targets: list[tuple[nn.Module, nn.Module]] = []
        if method == "simclr":
            self.head = heads.SimCLRProjectionHead(f, f, 128)
            self.criterion = NTXentLoss()
        elif method in ("barlow", "vicreg"):
            self.head = heads.BarlowTwinsProjectionHead(f, 2048, 2048)
            self.criterion = BarlowTwinsLoss() if method == "barlow" else VICRegLoss()
        elif method == "byol":
            self.head = heads.BYOLProjectionHead(f, 4096, 256)
            self.predictor = heads.BYOLPredictionHead(256, 4096, 256)
            self.criterion = NegativeCosineSimilarity()
        elif method == "mocov3":
            self.head = heads.MoCoProjectionHead(f, 4096, 256, num_layers=3, batch_norm=True)
            # the paper's 2-layer predictor, BN after every layer, from lightly's generic head builder
            self.predictor = heads.ProjectionHead([(256, 4096, nn.BatchNorm1d(4096), nn.ReLU()),
                                                   (4096, 256, nn.BatchNorm1d(256), None)])
        elif method == "dino":
            self.head = heads.DINOProjectionHead(f, 2048, 256, 2048, batch_norm=True)
            self.criterion = DINOLoss(output_dim=2048)
        else:
            raise ConfigError(f"lightly recipe: unknown method {method!r}; choose from {', '.join(METHODS)}.")
        if method in ("byol", "mocov3", "dino"):
            # the benchmark builds DINO's teacher head anew (a weight-normed layer cannot be deep-copied)
            self.target_backbone = copy.deepcopy(backbone)
            self.target_head = (heads.DINOProjectionHead(f, 2048, 256, 2048, batch_norm=True) if method == "dino"
                                else copy.deepcopy(self.head))
            deactivate_requires_grad(self.target_backbone)
            deactivate_requires_grad(self.target_head)
            self.targets = [(self.backbone, self.target_backbone), (self.head, self.target_head)]

    def trainable(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.head, getattr(self, "predictor", None)) if m is not None]

    def momentum(self, step: int, total: int) -> None:
        if not self.targets:
            return
        # Imagenette benchmark: a constant 0.99 (BYOL, DINO); MoCo v3's paper: cosine from 0.99 to 1
        m = cosine_schedule(step, total, 0.99, 1.0) if self.method == "mocov3" else 0.99
        for online, target in self.targets:
            update_momentum(online, target, m=m)

    def embed(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def embed_target(self, x: Tensor) -> Tensor:
        return self.target_head(self.target_backbone(x))

    def loss(self, views: Sequence[Tensor]) -> Tensor:
        if self.method in ("simclr", "barlow", "vicreg"):
            return self.criterion(self.embed(views[0]), self.embed(views[1]))
        if self.method == "byol":
            p0, p1 = (self.predictor(self.embed(v)) for v in views)
            z0, z1 = (self.embed_target(v) for v in views)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        if self.method == "mocov3":
            q0, q1 = (self.predictor(self.embed(v)) for v in views)
            k0, k1 = (self.embed_target(v) for v in views)
            return mocov3_ctr(q0, k1, MOCOV3_TEMPERATURE) + mocov3_ctr(q1, k0, MOCOV3_TEMPERATURE)
        teacher = [self.embed_target(v) for v in views[:2]]  # dino: the teacher sees the global views only
        student = [self.embed(v) for v in views]
        return self.criterion(teacher, student)


def mocov3_ctr(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3's ctr(q, k) from the paper's pseudocode (lightly 1.6 has no MoCo v3 loss)."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def optimizer_and_schedule(model: LightlyMethod, optim: Mapping[str, Any], epochs: int, steps_per_epoch: int):
    """The ssl_lab run's optimiser family, lr, weight decay and per-step warmup-cosine schedule, on lightly's split
    of decayed / not decayed parameters (biases and norms are not decayed, as in ssl_lab's param_groups)."""
    cfg = {k: v for k, v in optim.items() if k not in SCALING_KEYS}
    name, lr, wd = cfg.pop("name"), float(cfg.pop("lr")), float(cfg.pop("weight_decay", 0.0))
    schedule, warmup_epochs = cfg.pop("schedule", "cosine"), float(cfg.pop("warmup_epochs", 0.0))
    min_lr_ratio = float(cfg.pop("min_lr_ratio", 0.0))
    decay, no_decay = get_weight_decay_parameters(model.trainable())
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = build_optimizer(groups, name=name, lr=lr, weight_decay=wd, **cfg)
    total = epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, schedule, total_steps=total,
                                warmup_steps=int(round(warmup_epochs * steps_per_epoch)), min_lr_ratio=min_lr_ratio)
    return optimizer, scheduler


def train(method: str, backbone: nn.Module, images: np.ndarray, mean: float, std: float, *, epochs: int,
          batch_size: int, optim: Mapping[str, Any], seed: int, flips: bool, n_local: int, local_size: int
          ) -> dict[str, Any]:
    """Pretrain ``backbone`` in place with lightly's recipe on uint8 [N, H, W] ``images``; a plain PyTorch loop.

    Speed is measured as ssl_lab's SpeedMeter does: images per second from the end of the first batch to the end
    of the last, so start-up costs stay out of both numbers."""
    torch.manual_seed(seed)
    model = LightlyMethod(method, backbone)
    views = transform(method, images.shape[-1], mean, std, flips, n_local, local_size)
    loader = DataLoader(ViewsDataset(images, views), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=0, generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise DataError(f"lightly: {len(images)} training images make no full batch of {batch_size}; lower "
                        "--batch-size.")
    optimizer, scheduler = optimizer_and_schedule(model, optim, epochs, len(loader))
    total, step, t0, counted, last_losses = epochs * len(loader), 0, None, 0, []
    model.train()
    for epoch in range(epochs):
        last_losses = []
        for batch in loader:
            model.momentum(step, total)
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            last_losses.append(loss.item())
            if t0 is None:
                t0 = time.perf_counter()
            else:
                counted += len(batch[0])
        if not all(math.isfinite(v) for v in last_losses):
            raise FloatingPointError(f"lightly {method}: non-finite loss in epoch {epoch}.")
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    return {"final_loss": float(np.mean(last_losses)), "images_per_s": counted / seconds if seconds > 0 else None,
            "steps": step, "steps_per_epoch": len(loader)}
