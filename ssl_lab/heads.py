"""Projector / predictor / classifier heads as plain MLPs (one builder, sizes from the config), and DINO's head."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lab.errors import ConfigError

_NORMS = ("bn", "none")


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, norm: str = "bn", last_norm: bool = False,
        last_bias: bool = True) -> nn.Sequential:
    """Linear -> [BN] -> ReLU per hidden layer, then a final Linear (-> BN if ``last_norm``).

    Hidden Linears drop their bias when BN follows (BN's shift makes it redundant). ``hidden_dims=[]`` gives a
    single Linear, i.e. a linear probe. SimCLR: ``mlp(F, [2048], 128)``; Barlow: ``mlp(F, [8192, 8192], 8192)``.
    """
    if norm not in _NORMS:
        raise ConfigError(f"Head norm '{norm}' is unknown; choose one of: {', '.join(_NORMS)}.")
    dims = [in_dim, *hidden_dims, out_dim]
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or d < 1]
    if bad:
        raise ConfigError(
            f"Head sizes must be positive integers, got in_dim={in_dim}, hidden_dims={list(hidden_dims)}, "
            f"out_dim={out_dim}; fix the head's size options."
        )
    use_bn = norm == "bn"
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=not use_bn))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], out_dim, bias=last_bias))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


def conv_map_mlp(in_channels: int, out_dim: int, grid: int = 3, hidden: int = 4096, dropout: float = 0.5) -> nn.Sequential:
    """The VGG classifier design: pool the last conv map to grid x grid, flatten, two wide hidden layers.

    With VGG-11's 512 channels: 512 * 3 * 3 -> 4096 -> 4096 -> out, the large head of the jet-image baseline.
    """
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(grid), nn.Flatten(),
        nn.Linear(in_channels * grid * grid, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class UnitNormLinear(nn.Linear):
    """A bias-free Linear whose rows (one per prototype) are L2-normalised in every forward.

    DINO's weight-normalised last layer with its norm fixed to 1: on L2-normalised inputs the outputs are cosine
    similarities in [-1, 1], so only the temperatures set how sharp the softmax is; a free norm lets the logits
    grow and destabilises training (Caron et al. 2021, appendix). Written out instead of
    ``parametrizations.weight_norm`` so the module deep-copies into an EMA teacher like any other.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """``mlp`` to a bottleneck -> L2 normalise -> `UnitNormLinear` to the prototype logits."""

    def __init__(self, projector: nn.Module, last_layer: UnitNormLinear):
        super().__init__()
        self.mlp = projector
        self.last_layer = last_layer

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck features (what a collapse check should look at)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))


def dino_head(in_dim: int, hidden_dims: Sequence[int], bottleneck_dim: int, out_dim: int,
              norm: str = "none") -> DINOHead:
    """DINO's head: ``mlp(in_dim, hidden_dims, bottleneck_dim)`` then ``out_dim`` unit-norm prototypes.

    The paper's head is ``mlp(F, [2048, 2048], 256)`` (GELU there, ReLU here) and 65536 prototypes, without BN for
    ViTs; its ResNet recipe puts BN in the head (``norm="bn"``).
    """
    projector = mlp(in_dim, hidden_dims, bottleneck_dim, norm=norm)
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ConfigError(f"DINO head: out_dim={out_dim!r} must be a positive integer (method.out_dim).")
    return DINOHead(projector, UnitNormLinear(bottleneck_dim, out_dim))
