"""The continuous `rotate` op (one affine with crops, flips and quarter turns) and the rotation / blur presets."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import CONF, TINY, run_cli, tiny_data
from hydra.utils import instantiate
from omegaconf import OmegaConf

import ssl_lab.augment as augment_module
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import GEOMETRIC, OPS, Augment, affine_theta
from ssl_lab.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def turned(degrees: float, **kw) -> Augment:
    return Augment("r", {"rotate": {"degrees": [degrees, degrees], **kw}}, n_views=1)


def blob(side: int, row: float, col: float, width: float = 1.5) -> torch.Tensor:
    """[1, 1, side, side] Gaussian spot centred at pixel (row, col)."""
    r = torch.arange(side, dtype=torch.float32).view(side, 1)
    c = torch.arange(side, dtype=torch.float32).view(1, side)
    return torch.exp(-((r - row) ** 2 + (c - col) ** 2) / (2 * width**2)).view(1, 1, side, side)


def spot_angle(img: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of each image's intensity centroid about the centre; counter-clockwise as displayed (row 0
    on top), the sense of torch.rot90(k=1, dims=(-2, -1))."""
    side = img.shape[-1]
    centre = (side - 1) / 2
    coords = torch.arange(side, dtype=torch.float32) - centre
    w = img.sum(dim=1)  # [N, H, W]
    row = (w * coords.view(1, side, 1)).sum(dim=(1, 2)) / w.sum(dim=(1, 2))
    col = (w * coords.view(1, 1, side)).sum(dim=(1, 2)) / w.sum(dim=(1, 2))
    return torch.rad2deg(torch.atan2(-row, col))


def test_rotate_is_geometric_and_listed():
    assert "rotate" in GEOMETRIC and "rotate" in OPS
    assert Augment("r", {"rotate": None}).ops["rotate"] == {"p": 1.0, "degrees": (0.0, 360.0)}


@pytest.mark.parametrize("side", [8, 9])
@pytest.mark.parametrize("degrees,k", [(90, 1), (180, 2), (270, 3), (-90, 3), (360, 0)])
def test_quarter_turns_equal_torch_rot90(side, degrees, k):
    x = torch.rand(3, 2, side, side)
    (out,) = turned(degrees)(x, generator=gen())
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_angle_zero_keeps_the_exact_matrices():
    n = 64
    g = gen(1)
    fw, fh = torch.rand(n, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    cx, cy = torch.rand(n, generator=g) - 0.5, torch.rand(n, generator=g) - 0.5
    k = torch.randint(4, (n,), generator=g)
    fx, fy = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5
    base = affine_theta(fw, fh, cx, cy, k, fx, fy)
    assert torch.equal(affine_theta(fw, fh, cx, cy, k, fx, fy, torch.zeros(n)), base)
    # a quarter turn plus an angle is the same turn as the summed angle
    a = torch.rand(n, generator=g) * 2 * math.pi
    quarter = torch.zeros(n, dtype=torch.long)
    torch.testing.assert_close(affine_theta(fw, fh, cx, cy, k, fx, fy, a),
                               affine_theta(fw, fh, cx, cy, quarter, fx, fy, a + k * math.pi / 2))


def test_crop_flip_turn_and_rotate_are_one_resampling(monkeypatch):
    calls = []
    real = augment_module.warp
    monkeypatch.setattr(augment_module, "warp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ops = {"resized_crop": {"scale": [0.5, 1.0]}, "hflip": {}, "rot90": {}, "rotate": {}}
    views = Augment("g", ops)(torch.rand(4, 3, 16, 16), generator=gen())
    assert len(calls) == 1 and len(views) == 2  # both views, all four ops: one grid_sample


def test_angles_are_drawn_per_sample_within_the_range():
    x = blob(33, 16, 26).expand(256, 1, 33, 33)  # a spot right of centre: angle 0
    assert spot_angle(x[:1]).item() == pytest.approx(0.0, abs=1e-4)
    assert spot_angle(torch.rot90(x[:1], 1, dims=(-2, -1))).item() == pytest.approx(90.0, abs=1e-3)
    (out,) = Augment("r", {"rotate": {"degrees": [20, 70]}}, n_views=1)(x, generator=gen())
    angle = spot_angle(out)
    assert angle.min() > 20 - 1.5 and angle.max() < 70 + 1.5  # same sense as rot90, within the range
    assert angle.min() < 25 and angle.max() > 65 and angle.std() > 10  # spread over it, per sample
    (half,) = Augment("r", {"rotate": {"p": 0.5, "degrees": [20, 70]}}, n_views=1)(x, generator=gen())
    kept = (spot_angle(half).abs() < 0.5).float().mean().item()
    assert 0.35 < kept < 0.65  # p: the other samples are left as they are


def test_corners_turned_in_from_outside_are_not_a_dark_frame():
    const = torch.full((4, 3, 12, 12), 0.7)
    (out,) = turned(45)(const, generator=gen())
    torch.testing.assert_close(out, const)


@pytest.mark.parametrize("ops,match", [({"rotate": {"degrees": [90, 10]}}, r"op 'rotate': degrees=\[90, 10\]"),
                                       ({"rotate": {"degrees": 30}}, r"op 'rotate': degrees=30 is invalid"),
                                       ({"rotate": {"degrees": [0, 720]}}, r"hi <= 360"),
                                       ({"rotate": {"angle": 3}}, r"unknown param 'angle'; valid params: p, degrees")])
def test_rotate_config_errors(ops, match):
    with pytest.raises(ConfigError, match=match):
        Augment("bad", ops)


# -------------------------------------------------------------------------------------------------- the presets
def preset(name: str) -> Augment:
    return instantiate(OmegaConf.load(CONF / "augment" / f"{name}.yaml"), _convert_="all")


def sharpness(t: torch.Tensor) -> torch.Tensor:
    """Mean squared neighbour difference per sample: what blur removes."""
    return (t[..., 1:] - t[..., :-1]).pow(2).mean(dim=(1, 2, 3)) + (t[..., 1:, :] - t[..., :-1, :]).pow(2).mean(
        dim=(1, 2, 3))


def test_rotation_preset_views_differ_by_a_rotation():
    aug = preset("rotation")
    assert aug.n_views == 2 and set(aug.active) == {"rotate"} and not aug.rgb_only_ops
    symmetric = blob(32, 15.5, 15.5, width=4.0).expand(16, 8, 32, 32)  # round spot at the centre, 8 channels
    v1, v2 = aug(symmetric, generator=gen())
    # A turn leaves a round spot as it is inside the inscribed disc; the corners it turns in from outside the image
    # hold mirrored content (PADDING_MODE), which need not match.
    r = torch.arange(32) - 15.5
    disc = (r.view(32, 1) ** 2 + r.view(1, 32) ** 2).sqrt() < 15.5
    assert ((v1 - v2).abs() * disc).max() < 0.02
    off_centre = blob(32, 15.5, 25.0, width=2.0).expand(16, 1, 32, 32)  # 9.5 px right of centre, inside the disc
    v1, v2 = aug(off_centre, generator=gen())
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).median() > 0.3  # the spot moved...
    d1, d2 = v1 * disc, v2 * disc
    torch.testing.assert_close(d1.sum(dim=(1, 2, 3)), d2.sum(dim=(1, 2, 3)), rtol=0.02, atol=0)
    def radius(v):
        return torch.hypot((v * r.view(1, 1, 1, 32)).sum(dim=(1, 2, 3)),
                                       (v * r.view(1, 1, 32, 1)).sum(dim=(1, 2, 3))) / v.sum(dim=(1, 2, 3))
    torch.testing.assert_close(radius(d1), torch.full((16,), 9.5), atol=0.2, rtol=0)  # ...along a circle
    torch.testing.assert_close(radius(d2), torch.full((16,), 9.5), atol=0.2, rtol=0)


def test_blur_preset_views_are_blurred_copies():
    aug = preset("blur")
    assert aug.n_views == 2 and set(aug.active) == {"blur"} and not aug.rgb_only_ops
    x = torch.rand(32, 8, 32, 32, generator=gen(3))
    v1, v2 = aug(x, generator=gen())
    s = sharpness(x)
    assert (sharpness(v1) <= s + 1e-6).all() and (sharpness(v2) <= s + 1e-6).all()
    assert sharpness(v1).mean() < 0.7 * s.mean()
    assert not torch.allclose(v1, v2)  # the two views get their own sigma
    torch.testing.assert_close(v1.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)  # no geometry, no shift


@pytest.mark.slow
def test_simclr_pretrains_with_the_rotation_and_blur_presets(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("trainer.limit_train_batches")] + ["trainer.limit_train_batches=1"]
    out = run_cli(["-m", "method=simclr", "augment=rotation,blur", *tiny, *tiny_data("lens_sim", cache_dir),
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, name in enumerate(("rotation", "blur")):
        run_dir = next(sweep.glob(f"{i}_pretrain_simclr_*"))
        assert OmegaConf.load(run_dir / "config.yaml").augment.name == name
        assert load_backbone_file(run_dir / "backbone.pt")["meta"]["in_chans"] == 1
