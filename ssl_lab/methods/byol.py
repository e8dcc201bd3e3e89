"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection of the other view."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.heads import mlp
from ssl_lab.losses import byol_loss
from ssl_lab.methods.base import SSLMethod
from ssl_lab.methods.momentum import MomentumMixin, momentum_copy


class BYOL(MomentumMixin, SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 proj_hidden_dims: Sequence[int] = (4096,), proj_output_dim: int = 256,
                 pred_hidden_dims: Sequence[int] = (4096,), base_tau: float = 0.99, final_tau: float = 1.0,
                 seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim)
        self.predictor = mlp(proj_output_dim, list(pred_hidden_dims), proj_output_dim)
        # The target starts as an exact copy of the online backbone + projector and then trails it by EMA.
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.init_momentum(base_tau, final_tau)

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def loss(self, views):
        # Both views in one pass through each network; BatchNorm statistics then span both views, as in the
        # backbone of SimCLR here. The loss compares single samples, so nothing needs per-view statistics.
        x = torch.cat(views)
        p1, p2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(x)).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # symmetric, summed as in the paper
        return loss, {}
