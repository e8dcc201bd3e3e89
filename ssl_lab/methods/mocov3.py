"""MoCo v3 (Chen, Xie & He 2021): an online network's prediction of one view must pick out the momentum
encoder's key of the other view among all keys of the global batch."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.distributed import gather
from ssl_lab.heads import mlp
from ssl_lab.losses import mocov3_loss
from ssl_lab.methods.base import SSLMethod
from ssl_lab.methods.momentum import MomentumMixin, momentum_copy


class MoCoV3(MomentumMixin, SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 temperature: float = 0.2, proj_hidden_dims: Sequence[int] = (4096, 4096), proj_output_dim: int = 256,
                 pred_hidden_dims: Sequence[int] = (4096,), base_tau: float = 0.99, final_tau: float = 1.0,
                 seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.temperature = float(temperature)
        # The paper's projector and predictor both end in BatchNorm; the keys come from the momentum projector.
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim, last_norm=True)
        self.predictor = mlp(proj_output_dim, list(pred_hidden_dims), proj_output_dim, last_norm=True)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.init_momentum(base_tau, final_tau)

    def momentum_pairs(self):
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def loss(self, views):
        x = torch.cat(views)
        q1, q2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_backbone(x)).chunk(2)
        # Every rank computes the loss of the global batch: other ranks' keys are negatives too.
        q1, q2, k1, k2 = gather(q1), gather(q2), gather(k1), gather(k2)
        loss = mocov3_loss(q1, k2, self.temperature) + mocov3_loss(q2, k1, self.temperature)
        return loss, {}

    def chance_loss(self, batch_size: int) -> float | None:
        # Each direction: 2T x cross-entropy of a uniform guess among the N keys; the loss sums both directions.
        return 2 * 2.0 * self.temperature * math.log(batch_size)
