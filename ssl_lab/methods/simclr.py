"""SimCLR (Chen et al. 2020): contrast two views of each image against every other view in the batch."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.distributed import gather
from ssl_lab.heads import mlp
from ssl_lab.losses import nt_xent_loss
from ssl_lab.methods.base import SSLMethod


class SimCLR(SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 temperature: float = 0.1, proj_hidden_dims: Sequence[int] = (2048,), proj_output_dim: int = 128,
                 seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        self.temperature = float(temperature)
        self.projector = mlp(backbone.num_features, list(proj_hidden_dims), proj_output_dim)

    def loss(self, views):
        # One backbone pass over both views: a larger batch keeps the device busier than two passes.
        z = self.projector(self.backbone(torch.cat(views)))
        z1, z2 = z.chunk(2)
        # Under DDP every rank scores the global batch, so negatives come from all ranks.
        return nt_xent_loss(gather(z1), gather(z2), self.temperature), {}

    def chance_loss(self, batch_size: int) -> float | None:
        # Equal similarity to all 2N-1 other views (e.g. identical embeddings): cross-entropy of a uniform guess.
        return math.log(2 * batch_size - 1)
