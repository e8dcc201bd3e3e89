"""Blur-level prediction: which of K Gaussian blur strengths was the view blurred by?

A pretext task for images whose information sits in fine structure (thin lensing arcs, narrow jet cores): to tell
sigma 0.5 from 1.0 px the backbone has to know what sharp structure in this data looks like, which no label says.

The blur runs on the normalised view: a Gaussian kernel sums to 1, so blurring commutes with the per-channel
normalisation. The preset's own `blur` op is refused (an unknown extra blur would move every level). Crops smooth
too, as the bilinear upsampling to the view size interpolates: on white noise a half-area crop (augment=minimal's
widest zoom, 1.4x) removes about as much fine detail as sigma 0.6 px. It is allowed because that smoothing varies
across the pixel grid where a Gaussian does not, and the default levels stay separable (the tests train on such
views), but levels closer than ~0.5 px are better used with crop scales near 1.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl_lab.augment import Augment, gaussian_blur
from ssl_lab.errors import ConfigError
from ssl_lab.methods.pretext import PretextClassification


def check_sigmas(sigmas: Any) -> list[float]:
    """Blur levels: at least 2, distinct, finite and >= 0 (0 = no blur)."""
    fix = "pass a list of at least 2 distinct sigmas >= 0 in view pixels, e.g. method.sigmas=[0.0,0.5,1.0,2.0]"
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence):
        raise ConfigError(f"method.sigmas={sigmas!r} is not a list; {fix}.")
    values = list(sigmas)
    ok = all(not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s >= 0
             for s in values)
    if not ok or len(values) < 2 or len(set(values)) != len(values):
        raise ConfigError(f"method.sigmas={values!r} is invalid (it needs >= 2 levels, distinct, each a finite "
                          f"number >= 0); {fix}.")
    return [float(s) for s in values]


class Blur(PretextClassification):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 sigmas: Sequence[float] = (0.0, 0.5, 1.0, 2.0), head_hidden_dims: Sequence[int] = (512,),
                 mode: str = "random", seed: int = 0):
        levels = check_sigmas(sigmas)
        super().__init__(name, backbone, augment, optim, num_transforms=len(levels),
                         head_hidden_dims=head_hidden_dims, mode=mode, seed=seed)
        self.refuse_augment_ops({"blur"}, "an unknown extra blur on top of the labelled one makes the levels "
                                "ambiguous")
        self.kernel_size = 2 * math.ceil(3.0 * max(levels)) + 1  # +-3 sigma of the widest level; 1 if all are 0
        self.register_buffer("sigmas", torch.tensor(levels), persistent=False)

    def transform(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Label j blurs the view with sigma ``sigmas[j]`` (view pixels), every sample by its own sigma."""
        return gaussian_blur(x, self.sigmas[labels], self.kernel_size)
