"""Rotation prediction (Gidaris et al. 2018, RotNet): which of 0/90/180/270 degrees was the view turned by?

To answer, the backbone has to find the objects and their usual orientation, which needs no labels. Quarter turns
(torch.rot90) are exact on the pixel grid for any channel count, so no interpolation trace gives the label away.

The preset must not turn the views itself: rot90 and the free `rotate` op would put an unknown turn on top of the
labelled one, so the label would no longer say how the image sits. vflip is refused too: vflip = rot180 o hflip, so a
vertically flipped upright image is exactly a mirrored upside-down one, and labels 0 and 2 (and 1 and 3) become the
same picture. hflip alone is fine: a mirrored upright image is still upright.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.methods.pretext import PretextClassification

REFUSED_OPS = frozenset({"rot90", "rotate", "vflip"})


class Rotation(PretextClassification):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 head_hidden_dims: Sequence[int] = (512,), mode: str = "all", seed: int = 0):
        super().__init__(name, backbone, augment, optim, num_transforms=4, head_hidden_dims=head_hidden_dims,
                         mode=mode, seed=seed)
        self.refuse_augment_ops(REFUSED_OPS, "they turn or mirror the views by an unknown amount, so the "
                                "rotation label becomes ambiguous (vflip = rot180 o hflip); hflip alone is fine")

    def transform(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Label k turns the view by k*90 degrees as torch.rot90(k, dims=(-2, -1)); views are square."""
        pick = labels.view(-1, 1, 1, 1)
        out = x
        for k in range(1, 4):  # three whole-batch turns, each kept where the label asks for it
            out = torch.where(pick == k, torch.rot90(x, k, dims=(-2, -1)), out)
        return out
