"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.distributed import gather
from ssl_lab.heads import mlp
from ssl_lab.losses import barlow_twins_loss
from ssl_lab.methods.base import SSLMethod


class BarlowTwins(SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 lambd: float = 0.0051, proj_hidden_dims: Sequence[int] = (2048, 2048), proj_output_dim: int = 2048,
                 seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.lambd = float(lambd)
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim)

    def loss(self, views):
        h1, h2 = self.backbone(torch.cat(views)).chunk(2)
        # The projector's BatchNorm sees each view alone, as in the paper: its statistics are per view.
        # Under DDP the standardisation and the cross-correlation span the global batch.
        return barlow_twins_loss(gather(self.projector(h1)), gather(self.projector(h2)), self.lambd)
