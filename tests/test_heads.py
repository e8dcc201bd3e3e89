"""MLP heads: layer layout per option, shapes, and option errors."""

import pytest
import torch
from torch import nn

from ssl_lab.errors import ConfigError
from ssl_lab.heads import mlp


def _layout(head):
    return [type(m).__name__ for m in head]


def test_default_projector_layout_and_shape():
    head = mlp(8, [16], 4)
    assert _layout(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].bias is None  # BN follows, so the hidden bias would be redundant
    assert head[-1].bias is not None
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (8, 16, 4)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 4)


def test_barlow_style_three_layers_with_last_norm_and_no_bias():
    head = mlp(8, [32, 32], 32, last_norm=True, last_bias=False)
    assert _layout(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear",
                             "BatchNorm1d"]
    assert head[6].bias is None
    out = head.train()(torch.randn(6, 8))
    # Final BN in train mode: every output feature has ~zero batch mean.
    assert out.mean(0).abs().max() < 1e-5


def test_no_norm_and_linear_head():
    head = mlp(8, [16], 3, norm="none")
    assert _layout(head) == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None
    probe = mlp(8, [], 3)
    assert _layout(probe) == ["Linear"]
    # A single sample works without BN (eval-time linear probe).
    assert probe(torch.randn(1, 8)).shape == (1, 3)


def test_gradients_reach_first_layer():
    head = mlp(4, [8], 2)
    head(torch.randn(3, 4)).pow(2).sum().backward()
    assert head[0].weight.grad is not None and head[0].weight.grad.abs().sum() > 0


def test_bad_options():
    with pytest.raises(ConfigError, match="'ln'.*bn, none"):
        mlp(8, [16], 4, norm="ln")
    with pytest.raises(ConfigError, match="out_dim=0"):
        mlp(8, [16], 0)
    with pytest.raises(ConfigError, match="hidden_dims"):
        mlp(8, [-1], 4)
    assert isinstance(mlp(2, [2], 2), nn.Sequential)
