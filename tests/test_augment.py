"""Batched augmentation: shapes, per-sample randomness, determinism, exact geometry and each op's effect."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ssl_lab.augment import CROP_TRIES, RGB_ONLY, Augment, _sample_crop, affine_theta, gaussian_blur, warp
from ssl_lab.errors import ConfigError, DataError

GENERIC = {"resized_crop": {"scale": [0.3, 1.0]}, "hflip": {}, "vflip": {}, "rot90": {},
           "intensity": {"shift": [-0.1, 0.1]}, "blur": {}, "noise": {}, "channel_drop": {}}
RGB = {"resized_crop": {"scale": [0.3, 1.0]}, "hflip": {}, "color_jitter": {}, "grayscale": {}, "solarize": {},
       "blur": {}}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ident(n: int, k: int = 0) -> torch.Tensor:
    """theta for forced params: full image, turn k, no flips."""
    one, zero, no = torch.ones(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    return affine_theta(one, one, zero, zero, torch.full((n,), k), no, no)


@pytest.mark.parametrize("c", [1, 3, 8])
def test_shapes_kept_and_resized(c: int) -> None:
    ops = RGB if c == 3 else GENERIC
    x = torch.rand(4, c, 16, 16)
    views = Augment("p", ops, n_views=3)(x, generator=gen())
    assert len(views) == 3 and all(v.shape == (4, c, 16, 16) and v.dtype == torch.float32 for v in views)
    assert Augment("p", ops, size=12)(x, generator=gen())[0].shape == (4, c, 12, 12)
    assert Augment("p", ops, size=12)(x, generator=gen(), out_size=8)[1].shape == (4, c, 8, 8)
    assert Augment("p", ops, size=12).eval_view(x).shape == (4, c, 12, 12)


def test_pixels_change_and_views_are_independent() -> None:
    x = torch.rand(1, 8, 16, 16).expand(6, -1, -1, -1).contiguous()  # six identical samples
    v1, v2 = Augment("p", GENERIC)(x, generator=gen())
    assert not torch.allclose(v1, x, atol=1e-3)
    for i in range(6):
        assert not torch.allclose(v1[i], v2[i], atol=1e-3)  # two views of one sample differ
        for j in range(i):
            assert not torch.allclose(v1[i], v1[j], atol=1e-3)  # identical samples get different views


def test_seeded_generator_is_deterministic() -> None:
    aug = Augment("p", GENERIC)
    x = torch.rand(4, 8, 16, 16)
    a, b, c = aug(x, generator=gen(3)), aug(x, generator=gen(3)), aug(x, generator=gen(4))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    torch.manual_seed(5)
    d = aug(x)
    torch.manual_seed(5)
    assert torch.equal(d[0], aug(x)[0])  # without a generator the global RNG is the only source


def test_flips_equal_torch_flip() -> None:
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(Augment("h", {"hflip": {"p": 1.0}})(x)[0], torch.flip(x, dims=[-1]), atol=1e-5)
    assert torch.allclose(Augment("v", {"vflip": {"p": 1.0}})(x)[1], torch.flip(x, dims=[-2]), atol=1e-5)
    hand = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(Augment("h", {"hflip": {"p": 1.0}})(hand)[0], torch.tensor([[[[2.0, 1.0], [4.0, 3.0]]]]),
                          atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_forced_rot90_equals_torch_rot90(k: int) -> None:
    x = torch.rand(2, 3, 9, 9)
    assert torch.allclose(warp(x, ident(2, k), 9), torch.rot90(x, k, dims=(-2, -1)), atol=1e-5)


def test_rot90_draws_all_four_turns_per_sample() -> None:
    x = torch.rand(1, 2, 8, 8).expand(64, -1, -1, -1)
    (out,) = Augment("r", {"rot90": {"p": 1.0}}, n_views=1)(x, generator=gen())
    turns = torch.stack([torch.rot90(x[0], k, dims=(-2, -1)) for k in range(4)])  # [4, C, H, W]
    err = (out[:, None] - turns[None]).abs().amax(dim=(2, 3, 4))  # [64, 4]
    assert (err.min(dim=1).values < 1e-5).all()  # every output is exactly one of the four turns
    assert set(err.argmin(dim=1).tolist()) == {0, 1, 2, 3}


def test_full_crop_is_identity_and_matches_eval_view() -> None:
    x = torch.rand(3, 2, 12, 12)
    crop = {"resized_crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}}
    assert torch.allclose(Augment("c", crop)(x, generator=gen())[0], x, atol=1e-5)
    aug = Augment("c", crop, size=7)
    assert torch.allclose(aug(x, generator=gen())[0], aug.eval_view(x), atol=1e-5)


def test_crops_stay_inside_image_and_zoom_in() -> None:
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0  # centre square covers 25% of the image
    (out,) = Augment("c", {"resized_crop": {"scale": [0.1, 0.3]}}, n_views=1)(x, generator=gen())
    assert out.min() >= 0.0 and out.max() <= 1.0  # no padding values leak in
    ones = torch.ones(8, 2, 8, 8)  # upsampled crops touching the border: zero padding would darken the edge ring
    up = Augment("c", {"resized_crop": {"scale": [0.5, 1.0]}, "rot90": {}}, size=16)(ones, generator=gen())
    assert all(torch.allclose(v, torch.ones_like(v), atol=1e-6) for v in up)
    assert out.mean() > x.mean() + 0.05  # crops of <= 30% area, inside the image, magnify the square on average


def test_crop_boxes_follow_scale_and_ratio() -> None:
    u = torch.rand(512, 2 * CROP_TRIES + 2, generator=gen())
    fw, fh, cx, cy = _sample_crop(u, 16, 32, scale=(0.3, 0.6), ratio=(0.5, 2.0))  # non-square image
    area, ratio = fw * fh, (fw * 32) / (fh * 16)
    assert ((area > 0.3 - 1e-5) & (area < 0.6 + 1e-5)).all()
    assert ((ratio > 0.5 - 1e-4) & (ratio < 2.0 + 1e-4)).all()
    assert ((cx.abs() <= 1 - fw + 1e-6) & (cy.abs() <= 1 - fh + 1e-6)).all()  # box inside the image
    assert area.std() > 0.05 and cx.std() > 0.05


def test_blur_removes_high_frequencies_and_keeps_constants() -> None:
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(4, 2, 16, 16)
    aug = Augment("b", {"blur": {"p": 1.0, "sigma": [1.0, 2.0]}}, n_views=1)
    (out,) = aug(checker, generator=gen())
    hf = lambda t: (t[..., 1:] - t[..., :-1]).pow(2).mean()  # noqa: E731
    assert hf(out) < 0.05 * hf(checker)
    const = torch.full((4, 3, 10, 10), 0.7)
    assert torch.allclose(aug(const, generator=gen())[0], const, atol=1e-6)


def test_blur_sigma_is_per_sample() -> None:
    x = torch.rand(1, 1, 16, 16).expand(3, -1, -1, -1)
    out = gaussian_blur(x, torch.tensor([0.0, 0.5, 2.0]), 13)
    assert torch.allclose(out[0], x[0])  # sigma 0 = identity
    var = out.var(dim=(1, 2, 3))
    assert var[0] > var[1] > var[2]


def test_noise_std_in_normalised_units() -> None:
    aug = Augment("n", {"noise": {"p": 1.0, "std": [0.3, 0.3]}}, n_views=1)
    aug.set_stats(torch.tensor([5.0]), torch.tensor([10.0]))  # raw units are irrelevant: noise is added after
    (out,) = aug(torch.full((8, 1, 32, 32), 5.0), generator=gen())
    assert abs(out.mean().item()) < 0.02 and abs(out.std().item() - 0.3) < 0.01


def test_normalisation_uses_set_stats_and_uint8_scaling() -> None:
    aug = Augment("id", {})
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    aug.set_stats(mean, std)
    x = torch.rand(2, 3, 8, 8)
    want = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(aug.eval_view(x), want, atol=1e-6)
    assert torch.allclose(aug(x)[0], want, atol=1e-6)
    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(aug.eval_view(u8), (u8.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
                          atol=1e-6)


def test_stats_resize_buffers_and_survive_state_dict() -> None:
    aug = Augment("id", {})
    x = torch.rand(2, 5, 4, 4)
    assert torch.equal(aug.eval_view(x), x)  # identity until stats are set, for any C
    aug.set_stats([1.0] * 8, [2.0] * 8)
    with pytest.raises(DataError, match="batch has 5 channels but the normalisation stats have 8"):
        aug(x)
    fresh = Augment("id", {})  # built without stats, as on resume
    fresh.load_state_dict(aug.state_dict())
    assert torch.equal(fresh.mean, torch.ones(8)) and torch.equal(fresh.std, torch.full((8,), 2.0))
    with pytest.raises(DataError, match="3 channels"):
        fresh.eval_view(torch.rand(1, 3, 4, 4))


def test_constant_channel_is_not_divided_by_zero(caplog: pytest.LogCaptureFixture) -> None:
    aug = Augment("id", {})
    aug.set_stats([0.0, 0.5], [1.0, 0.0])
    assert "std 0" in caplog.text
    out = aug.eval_view(torch.full((1, 2, 4, 4), 0.5))
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()
    with pytest.raises(DataError, match="finite"):
        aug.set_stats([float("nan"), 0.0], [1.0, 1.0])


def test_intensity_scales_each_channel() -> None:
    aug = Augment("i", {"intensity": {"p": 1.0, "scale": [0.5, 2.0], "shift": [0.0, 0.0]}}, n_views=1)
    x = torch.rand(4, 5, 8, 8) + 0.5
    (out,) = aug(x, generator=gen())
    ratio = out / x
    per_channel = ratio.mean(dim=(2, 3))
    assert torch.allclose(ratio, per_channel[..., None, None].expand_as(ratio), atol=1e-5)  # one factor per plane
    assert ((per_channel >= 0.5 - 1e-6) & (per_channel <= 2.0 + 1e-6)).all()
    assert per_channel.std(dim=1).min() > 0.01  # channels of one sample get different factors
    shift = Augment("s", {"intensity": {"p": 1.0, "scale": [1.0, 1.0], "shift": [1.0, 1.0]}})
    shift.set_stats(torch.zeros(2), torch.tensor([2.0, 3.0]))  # shift is in units of each channel's std
    assert torch.allclose(shift(torch.zeros(1, 2, 4, 4))[0].mean(dim=(0, 2, 3)), torch.tensor([1.0, 1.0]))


def test_grayscale_gives_equal_channels() -> None:
    (out,) = Augment("g", {"grayscale": {"p": 1.0}}, n_views=1)(torch.rand(4, 3, 8, 8))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_color_jitter_stays_in_unit_range_and_changes_colour() -> None:
    x = torch.rand(16, 3, 8, 8)
    jit = {"color_jitter": {"p": 1.0, "brightness": 0.9, "contrast": 0.9, "saturation": 0.9, "hue": 0.5}}
    (out,) = Augment("j", jit, n_views=1)(x, generator=gen())
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - x).abs().mean() > 0.05


def test_hue_rotation_keeps_luma() -> None:
    x = 0.45 + 0.1 * torch.rand(4, 3, 8, 8)  # near grey: no clamping
    hue_only = {"color_jitter": {"p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": [0.25, 0.25]}}
    (out,) = Augment("h", hue_only, n_views=1)(x)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((out * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    assert (out - x).abs().max() > 0.01


def test_solarize_inverts_above_threshold() -> None:
    x = torch.rand(2, 3, 8, 8)
    (out,) = Augment("s", {"solarize": {"p": 1.0, "threshold": 0.5}}, n_views=1)(x)
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x))


def test_channel_drop_zeros_exactly_one_channel() -> None:
    x = torch.ones(16, 6, 4, 4)
    (out,) = Augment("d", {"channel_drop": {"p": 1.0}}, n_views=1)(x, generator=gen())
    zero = (out == 0).all(dim=(2, 3))
    assert (zero.sum(dim=1) == 1).all() and (out[~zero] == 1).all()
    assert len(set(zero.int().argmax(dim=1).tolist())) > 1  # the dropped channel varies by sample
    one = torch.rand(4, 1, 4, 4)
    assert torch.equal(Augment("d", {"channel_drop": {"p": 1.0}})(one)[0], one)


def test_dtypes_bf16_and_float64() -> None:
    x = torch.rand(2, 3, 8, 8)
    out = Augment("p", RGB)(x.bfloat16(), generator=gen())[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert Augment("p", RGB)(x.double(), generator=gen())[0].dtype == torch.float64


def test_omegaconf_ops_accepted_and_defaults_filled() -> None:
    aug = Augment("p", OmegaConf.create({"blur": {"sigma": [0.5, 1.0]}, "hflip": None, "color_jitter": {}}))
    assert aug.ops["blur"] == {"p": 0.5, "sigma": (0.5, 1.0), "kernel_size": None}
    assert aug.ops["hflip"]["p"] == 0.5
    assert aug.ops["color_jitter"]["brightness"] == pytest.approx((0.6, 1.4))
    assert aug.rgb_only_ops == ["color_jitter"] and "color_jitter" in RGB_ONLY


@pytest.mark.parametrize(
    ("ops", "match"),
    [
        ({"hflipp": {}}, r"preset 'bad'.*unknown op 'hflipp'.*valid ops: resized_crop, hflip"),
        ({"blur": {"sigmaa": [1, 2]}}, r"preset 'bad', op 'blur': unknown param 'sigmaa'; valid params: p, sigma"),
        ({"hflip": {"p": 1.5}}, r"op 'hflip': p=1.5 is invalid"),
        ({"resized_crop": {"scale": [0.9, 0.2]}}, r"op 'resized_crop': scale=\[0.9, 0.2\] is invalid"),
        ({"blur": {"kernel_size": 4}}, r"kernel_size=4 is invalid \(expected an odd integer"),
        ({"noise": {"std": 0.1}}, r"op 'noise': std=0.1 is invalid \(expected a pair"),
        ({"color_jitter": {"hue": 0.7}}, r"hue=0.7 is invalid"),
    ],
)
def test_config_errors(ops: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Augment("bad", ops)


def test_rgb_op_on_eight_channels_is_refused() -> None:
    aug = Augment("simclr", {"hflip": {}, "color_jitter": {}})
    with pytest.raises(ConfigError, match=r"preset 'simclr'.*color_jitter.*8 channels"):
        aug(torch.rand(2, 8, 8, 8))
    assert Augment("off", {"color_jitter": {"p": 0.0}})(torch.rand(2, 8, 8, 8))[0].shape == (2, 8, 8, 8)


@settings(max_examples=25, deadline=None)
@given(
    c=st.sampled_from([1, 3, 4]),
    hw=st.integers(min_value=3, max_value=12),
    size=st.one_of(st.none(), st.integers(min_value=2, max_value=10)),
    seed=st.integers(min_value=0, max_value=2**31),
    scale=st.floats(min_value=1e-3, max_value=1e4),
)
def test_finite_in_finite_out(c: int, hw: int, size: int | None, seed: int, scale: float) -> None:
    ops = dict(GENERIC, **({"color_jitter": {}, "grayscale": {}, "solarize": {}} if c == 3 else {}))
    x = (torch.randn(3, c, hw, hw, generator=gen(seed)) * scale).float()
    views = Augment("p", ops, size=size)(x, generator=gen(seed))
    side = size or hw
    assert all(v.shape == (3, c, side, side) and torch.isfinite(v).all() for v in views)
    assert not math.isnan(views[0].sum().item())
