"""Backbones: any channel count in, [B, num_features] out, stems chosen by image size, clear config errors."""

import pytest
import torch
from torch import nn

from ssl_lab.backbones import BACKBONES, backbone_from_meta, build_backbone
from ssl_lab.errors import ConfigError

EXPECTED_FEATURES = {"resnet15": 512, "resnet18": 512, "resnet50": 2048, "vgg11": 512, "vit_tiny": 192,
                     "vit_small": 384}


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("in_chans", [1, 3, 8])
def test_forward_shape_for_any_channel_count(name, in_chans):
    torch.manual_seed(0)
    net = build_backbone(name, in_chans, image_size=32).eval()
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, EXPECTED_FEATURES[name])
    assert net.num_features == EXPECTED_FEATURES[name]
    assert torch.isfinite(out).all()
    # Different images must give different features (the input really reaches the output).
    assert not torch.allclose(out[0], out[1])
    assert (net.name, net.in_chans) == (name, in_chans)


def test_resnet_stem_auto_rule():
    """auto: the small stem where its compute fits the device (on the CPU, tiny views only; test_first_hour.py
    checks the budget rule), the standard one above 64 px whatever the device."""
    small = build_backbone("resnet18", 3, image_size=16 if not torch.cuda.is_available() else 64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.small_stem is True
    for size in (96, None):
        big = build_backbone("resnet18", 3, image_size=size)
        assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
        assert isinstance(big.maxpool, nn.MaxPool2d)
        assert big.small_stem is False
    # Explicit choice overrides auto.
    forced = build_backbone("resnet15", 8, small_stem=True)
    assert forced.conv1.kernel_size == (3, 3) and forced.conv1.in_channels == 8
    assert build_backbone("resnet15", 8, small_stem=False, image_size=32).conv1.kernel_size == (7, 7)


def test_stem_changes_spatial_resolution():
    x = torch.randn(1, 2, 32, 32)
    small = build_backbone("resnet18", 2, small_stem=True, image_size=32).eval()
    big = build_backbone("resnet18", 2, small_stem=False).eval()
    with torch.no_grad():
        assert small.forward_features(x).shape == (1, 512, 4, 4)
        assert big.forward_features(x).shape == (1, 512, 1, 1)


def test_resnet_layouts():
    def count(net):
        return [len(getattr(net, f"layer{i}")) for i in range(1, 5)], type(net.layer1[0]).__name__

    assert count(build_backbone("resnet15", 1)) == ([2, 2, 2, 1], "BasicBlock")
    assert count(build_backbone("resnet18", 1)) == ([2, 2, 2, 2], "BasicBlock")
    assert count(build_backbone("resnet50", 1)) == ([3, 4, 6, 3], "Bottleneck")
    assert isinstance(build_backbone("resnet18", 1).fc, nn.Identity)


def test_vgg_exposes_conv_trunk():
    net = build_backbone("vgg11", 8, image_size=96)
    assert net.features[0].in_channels == 8
    assert not any(isinstance(m, nn.Linear) for m in net.modules())
    with torch.no_grad():
        fmap = net.features(torch.randn(1, 8, 96, 96))
    assert fmap.shape == (1, 512, 3, 3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_backbone("vgg11", 1, batch_norm=True).modules())


def test_vit_patch_size_default_and_override():
    small = build_backbone("vit_tiny", 8, image_size=32)
    assert small.model.patch_embed.proj.kernel_size == (8, 8)
    assert small.model.patch_embed.proj.in_channels == 8
    big = build_backbone("vit_tiny", 1, image_size=96)
    assert big.model.patch_embed.proj.kernel_size == (16, 16)
    assert build_backbone("vit_tiny", 1).image_size == 224
    custom = build_backbone("vit_tiny", 1, image_size=32, patch_size=4)
    assert custom.model.patch_embed.num_patches == 64
    assert custom.meta()["kwargs"]["patch_size"] == 4


def test_meta_is_plain_python_and_rebuilds_same_architecture():
    for name, kwargs in [("resnet15", {}), ("vgg11", {}), ("vit_tiny", {"patch_size": 4})]:
        net = build_backbone(name, 5, image_size=32, **kwargs)
        meta = net.meta()
        assert meta["name"] == name and meta["in_chans"] == 5 and meta["image_size"] == 32
        assert meta["num_features"] == net.num_features
        assert all(type(v) in (str, int, bool, dict, type(None)) for v in meta.values())
        clone = backbone_from_meta(meta)
        clone.load_state_dict(net.state_dict())  # strict: identical parameter names and shapes
        assert clone.meta() == meta
    assert build_backbone("resnet18", 1, small_stem=True, image_size=32).meta()["small_stem"] is True


@pytest.mark.parametrize("in_chans", [None, 0, -1, 2.5, True])
def test_bad_in_chans(in_chans):
    with pytest.raises(ConfigError, match="dataset.in_chans"):
        build_backbone("resnet18", in_chans)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match="resnet15, resnet18, resnet50, vgg11, vit_tiny, vit_small"):
        build_backbone("resnet34", 3)


def test_vit_indivisible_image_size():
    with pytest.raises(ConfigError, match=r"image_size=30 .*patch_size=8.*backbone.patch_size"):
        build_backbone("vit_small", 3, image_size=30)
    with pytest.raises(ConfigError, match="patch_size=16"):
        build_backbone("vit_small", 3, image_size=100, patch_size=16)


def test_unknown_kwargs_are_named():
    with pytest.raises(ConfigError, match="patch_size"):
        build_backbone("resnet18", 3, patch_size=8)
    with pytest.raises(ConfigError, match="dropout_rate"):
        build_backbone("vit_tiny", 3, image_size=32, dropout_rate=0.1)


def test_other_bad_options():
    with pytest.raises(ConfigError, match="small_stem"):
        build_backbone("resnet18", 3, small_stem="yes")
    with pytest.raises(ConfigError, match="small_stem"):
        build_backbone("vit_tiny", 3, small_stem=True, image_size=32)
    with pytest.raises(ConfigError, match="at least 32"):
        build_backbone("vgg11", 3, image_size=16)
    with pytest.raises(ConfigError, match="image_size"):
        build_backbone("resnet18", 3, image_size=0)
    with pytest.raises(ConfigError, match="lacks key"):
        backbone_from_meta({"name": "resnet18"})
