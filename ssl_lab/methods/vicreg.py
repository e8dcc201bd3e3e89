"""VICReg (Bardes et al. 2022): invariance between views, variance kept up and covariance down per view."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.distributed import gather
from ssl_lab.heads import mlp
from ssl_lab.losses import vicreg_loss
from ssl_lab.methods.base import SSLMethod


class VICReg(SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 proj_hidden_dims: Sequence[int] = (8192, 8192), proj_output_dim: int = 8192,
                 sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0, seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.weights = dict(sim_weight=float(sim_weight), var_weight=float(var_weight), cov_weight=float(cov_weight))
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim)  # the "expander"

    def loss(self, views):
        h1, h2 = self.backbone(torch.cat(views)).chunk(2)
        # The expander's BatchNorm sees each view alone: the variance and covariance terms are per-view batch
        # statistics, and a BatchNorm shared across views would mix the two distributions they regularise.
        # Under DDP the variance and covariance are statistics of the global batch.
        return vicreg_loss(gather(self.projector(h1)), gather(self.projector(h2)), **self.weights)
