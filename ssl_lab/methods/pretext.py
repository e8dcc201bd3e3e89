"""Pretext classification: the backbone learns by telling which of K known transforms an image went through.

The labels come for free, so the task needs no negatives, no second view and no target network: one view per
image (the preset's crops and flips still apply), then a transform chosen by the label. Subclasses say what the K
transforms are (`transform`, batched) and refuse the augment ops that would make the label ambiguous.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.errors import ConfigError
from ssl_lab.heads import mlp
from ssl_lab.losses import pretext_classification_loss
from ssl_lab.methods.base import SSLMethod

MODES = ("all", "random")


class PretextClassification(SSLMethod):
    """Predict which of ``num_transforms`` transforms was applied.

    ``mode``: ``all`` shows every image in all K versions (a batch of K*B, labels 0..K-1 in blocks of B): each step
    then contrasts the versions of the same image, which Gidaris et al. 2018 found best for rotation, at K times
    the compute. ``random`` gives each image one transform drawn from the step's generator (batch B).
    """

    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 num_transforms: int, head_hidden_dims: Sequence[int] = (512,), mode: str = "all", seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        if mode not in MODES:
            raise ConfigError(f"method.mode={mode!r} is unknown for method={name}; choose one of: "
                              f"{', '.join(MODES)}.")
        self.mode = mode
        self.num_transforms = int(num_transforms)
        # A hidden layer (as a contrastive projector) lets the last backbone features stay more general than the
        # pretext task needs; head_hidden_dims=[] is a linear classifier on the features.
        self.head = mlp(backbone.num_features, list(head_hidden_dims), self.num_transforms)

    @abstractmethod
    def transform(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Apply transform ``labels[i]`` to view ``x[i]``, for the whole batch at once (no loop over samples)."""

    def make_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return self.augment(x, generator=generator, n_views=1)

    def pretext_labels(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Labels of one step: [K*B] as K blocks 0..K-1 (mode all) or [B] drawn from ``step_rng`` (mode random)."""
        k = self.num_transforms
        if self.mode == "all":
            return torch.arange(k, device=device).repeat_interleave(batch_size)
        rng = self.step_rng  # None only outside a training step (a direct call): the global RNG then
        draw_device = rng.device if rng is not None else device
        return torch.randint(k, (batch_size,), generator=rng, device=draw_device).to(device)

    def loss(self, views):
        (x,) = views
        labels = self.pretext_labels(x.shape[0], x.device)
        if self.mode == "all":
            x = x.repeat(self.num_transforms, 1, 1, 1)  # block j = the whole batch, to get transform j
        logits = self.head(self.backbone(self.transform(x, labels)))
        return pretext_classification_loss(logits, labels)

    def chance_loss(self, batch_size: int) -> float | None:
        return math.log(self.num_transforms)  # uniform scores over the K transforms, whatever the batch
