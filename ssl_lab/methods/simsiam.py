"""SimSiam (Chen & He 2021): BYOL without the EMA target; a stop-gradient alone prevents collapse."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.heads import mlp
from ssl_lab.losses import simsiam_loss
from ssl_lab.methods.base import SSLMethod


class SimSiam(SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 proj_hidden_dims: Sequence[int] = (2048, 2048), proj_output_dim: int = 2048,
                 pred_hidden_dims: Sequence[int] = (512,), seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        # The paper's projector ends in BatchNorm; its predictor is a bottleneck back to the projection size.
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim, last_norm=True)
        self.predictor = mlp(proj_output_dim, list(pred_hidden_dims), proj_output_dim)

    def loss(self, views):
        # One pass over both views (BatchNorm statistics span both); the loss compares single samples.
        z1, z2 = self.projector(self.backbone(torch.cat(views))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2  # z is detached inside simsiam_loss
        return loss, {}
