"""Properties that must hold for every input, checked on random ones (hypothesis): the shipped augmentation presets
and every SSL loss, at any batch size, channel count, image size and value scale."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch.testing import assert_close

from conftest import CONF
from ssl_lab.augment import OPS, RGB_ONLY, Augment, affine_theta, warp
from ssl_lab.losses import (barlow_twins_loss, byol_loss, dino_loss, mae_loss, mocov3_loss, nt_xent_loss,
                            pretext_classification_loss, simsiam_loss, vicreg_loss)

FEW = settings(max_examples=25, deadline=None)
PRESETS = sorted(p.stem for p in (CONF / "augment").glob("*.yaml"))


@functools.lru_cache(maxsize=None)  # composing a preset costs more than a forward pass; set_stats resets its state
def _preset(name: str, size: int | None = None, drop: tuple[str, ...] = ()) -> Augment:
    cfg = OmegaConf.load(CONF / "augment" / f"{name}.yaml")
    for op in drop:
        cfg.ops.pop(op, None)
    return instantiate(cfg, size=size, _convert_="all")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: on a busy machine thread hand-offs cost 20x the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _channels(aug: Augment) -> list[int]:
    return [3] if aug.rgb_only_ops else [1, 2, 3, 8]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def _images(draw, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw batch, per-channel mean, std in the units the batch is read in): uint8, or float at any scale."""
    b, c = draw(st.integers(1, 3)), draw(st.sampled_from(channels))
    h, w = draw(st.integers(6, 20)), draw(st.integers(6, 20))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        x = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
        unit = x.float() / 255
    else:
        scale, offset = 10 ** draw(st.floats(-3, 3)), draw(st.floats(-1e3, 1e3))
        x = unit = torch.randn(b, c, h, w, generator=g) * scale + offset
    std = unit.transpose(0, 1).reshape(c, -1).std(dim=1).clamp(min=1e-6)
    return x, unit.mean(dim=(0, 2, 3)), std


# ------------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("name", PRESETS)
@FEW
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_every_preset_gives_finite_views_of_the_requested_shape(name, data, seed):
    aug = _preset(name, size=data.draw(st.one_of(st.none(), st.integers(2, 24)), label="size"))
    x, mean, std = data.draw(_images(_channels(aug)), label="batch")
    aug.set_stats(mean, std)
    views = aug(x, generator=_gen(seed))
    b, c, h, w = x.shape
    side = aug.size or min(h, w)
    assert len(views) == aug.n_views
    for v in views:
        assert v.shape == (b, c, side, side) and v.dtype == torch.float32
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", PRESETS)
@FEW
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_the_same_seed_gives_the_same_views(name, data, seed):
    aug = _preset(name)
    x, mean, std = data.draw(_images(_channels(aug)))
    aug.set_stats(mean, std)
    first, again = aug(x, generator=_gen(seed)), aug(x, generator=_gen(seed))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@FEW
@given(data=st.data(), all_off=st.booleans())
def test_no_op_view_of_a_view_sized_image_is_the_normalised_image(data, all_off):
    """No ops, or every op at p=0, and the image already the view size: the view is exactly (x - mean) / std."""
    x, mean, std = data.draw(_images([1, 2, 3, 8]))
    side = min(x.shape[-2:])
    x = x[..., :side, :side]
    aug = Augment("off", {op: {"p": 0.0} for op in OPS} if all_off else None, n_views=2)
    aug.set_stats(mean, std)
    unit = x.float() / 255 if x.dtype == torch.uint8 else x
    expected = (unit - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    for v in aug(x, generator=_gen(0)):
        assert_close(v, expected, rtol=0, atol=0)


@FEW
@given(b=st.integers(1, 4), c=st.sampled_from([1, 2, 3, 8]), side=st.integers(2, 17), seed=st.integers(0, 2**16))
def test_flips_and_quarter_turns_move_pixels_exactly(b, c, side, seed):
    """A full-image box with a flip or a k*90 degree turn lands on pixel centres: it is torch.flip / torch.rot90,
    per sample, and a flip applied twice is the identity."""
    g = _gen(seed)
    x = torch.randn(b, c, side, side, generator=g)
    k = torch.randint(0, 4, (b,), generator=g)
    flip_x, flip_y = torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g) < 0.5
    one, zero, no, none = torch.ones(b), torch.zeros(b), torch.zeros(b, dtype=torch.bool), torch.zeros(b).long()
    turned = warp(x, affine_theta(one, one, zero, zero, k, no, no), side)
    h_flipped = warp(x, affine_theta(one, one, zero, zero, none, flip_x, no), side)
    v_flipped = warp(x, affine_theta(one, one, zero, zero, none, no, flip_y), side)
    for i in range(b):
        assert_close(turned[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)), atol=1e-5, rtol=1e-5)
        assert_close(h_flipped[i], x[i].flip(-1) if flip_x[i] else x[i], atol=1e-5, rtol=1e-5)
        assert_close(v_flipped[i], x[i].flip(-2) if flip_y[i] else x[i], atol=1e-5, rtol=1e-5)
    twice = warp(h_flipped, affine_theta(one, one, zero, zero, none, flip_x, no), side)
    assert_close(twice, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
@FEW
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_a_constant_image_stays_constant_per_channel(name, data, seed):
    """Every op but noise maps a flat channel to a flat channel: crops, flips and turns resample it (the padding
    reflects, so no border value comes in), blur averages it, colour and intensity ops act per pixel."""
    aug = _preset(name, drop=("noise",))
    b, c = data.draw(st.integers(1, 3)), data.draw(st.sampled_from(_channels(aug)))
    h, w = data.draw(st.integers(6, 20)), data.draw(st.integers(6, 20))
    rgb = RGB_ONLY & set(aug.active)
    level = data.draw(st.lists(st.floats(0, 1) if rgb else st.floats(-1e3, 1e3), min_size=b * c, max_size=b * c))
    x = torch.tensor(level, dtype=torch.float32).view(b, c, 1, 1).expand(b, c, h, w).contiguous()
    aug.set_stats(torch.zeros(c), torch.full((c,), 10 ** data.draw(st.floats(-2, 2))))
    for v in aug(x, generator=_gen(seed)):
        spread = v.amax(dim=(-2, -1)) - v.amin(dim=(-2, -1))
        assert (spread <= 1e-4 * (1 + v.abs().amax(dim=(-2, -1)))).all()


# ------------------------------------------------------------------------------------------------------- losses
@st.composite
def _pair(draw, min_batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [N, D] embeddings at a scale from 1e-3 to 1e3; some degenerate (zeros, every row the same)."""
    n, d = draw(st.integers(min_batch, 12)), draw(st.integers(2, 16))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    scale = 10 ** draw(st.floats(-3, 3))
    z1, z2 = torch.randn(n, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale
    kind = draw(st.sampled_from(["random", "random", "zeros", "same_rows"]))
    if kind == "zeros":
        z1 = torch.zeros_like(z1)
    elif kind == "same_rows":
        z2 = z2[:1].expand_as(z2).clone()
    return z1, z2


@st.composite
def _random_pair(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A non-degenerate pair, positive per-row factors (1e-3 .. 1e3) and a permutation of the batch."""
    n, d = draw(st.integers(2, 12)), draw(st.integers(2, 16))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    scale = 10 ** draw(st.floats(-3, 3))
    z1, z2 = torch.randn(n, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale
    factors = 10 ** (torch.rand(2, n, 1, generator=g) * 6 - 3)
    return z1, z2, factors, torch.randperm(n, generator=g)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert_close(a, b, rtol=1e-4, atol=1e-5)


@FEW
@given(_pair())
def test_every_loss_is_a_finite_scalar(pair):
    z1, z2 = pair
    losses = [nt_xent_loss(z1, z2), mocov3_loss(z1, z2), byol_loss(z1, z2), simsiam_loss(z1, z2)]
    for value, terms in (barlow_twins_loss(z1, z2), vicreg_loss(z1, z2)):
        losses += [value, *terms.values()]
    center = z1.mean(0)
    losses.append(dino_loss([z1, z2, z1.flip(0)], [z1, z2], center))
    n, d = z1.shape
    mask = (torch.arange(n) % 2 == 0).float().expand(2, n)
    losses.append(mae_loss(torch.stack([z1, z2]), torch.stack([z2, z1]), mask))
    losses.append(pretext_classification_loss(z1, torch.arange(n) % d)[0])
    for value in losses:
        assert value.ndim == 0 and torch.isfinite(value), value


@FEW
@given(_random_pair())
def test_contrastive_losses_ignore_scale_and_batch_order(case):
    """NT-Xent and MoCo v3 compare directions (they L2-normalise), and their mean over anchors has no order."""
    z1, z2, factors, perm = case
    for loss in (nt_xent_loss, mocov3_loss):
        base = loss(z1, z2)
        _close(loss(z1 * factors[0], z2 * factors[1]), base)
        _close(loss(z1[perm], z2[perm]), base)
    _close(nt_xent_loss(z2, z1), nt_xent_loss(z1, z2))  # every view is an anchor: symmetric


@FEW
@given(_random_pair())
def test_barlow_twins_ignores_sample_order_and_feature_shifts_and_is_symmetric(case):
    z1, z2, _, perm = case
    base, terms = barlow_twins_loss(z1, z2)
    _close(barlow_twins_loss(z1[perm], z2[perm])[0], base)
    _close(barlow_twins_loss(z2, z1)[0], base)  # C(z2, z1) is C(z1, z2) transposed
    shift = z1.abs().amax() * torch.linspace(-1, 1, z1.shape[1])  # batch standardisation removes a per-feature shift
    _close(barlow_twins_loss(z1 + shift, z2 - shift)[0], base)
    assert terms["on_diag"] >= 0 and terms["off_diag"] >= 0


@FEW
@given(_random_pair())
def test_vicreg_terms(case):
    z1, z2, _, perm = case
    base, terms = vicreg_loss(z1, z2)
    assert vicreg_loss(z1, z1.clone())[1]["invariance"] == 0
    _close(vicreg_loss(z1[perm], z2[perm])[0], base)
    _close(vicreg_loss(z2, z1)[0], base)
    assert min(terms.values()) >= 0
    wide = (z1 - z1.mean(0)) / z1.std(0) * 2  # every feature's std is 2 > 1: the variance hinge is off
    assert vicreg_loss(wide, wide)[1]["variance"] == 0


@FEW
@given(_random_pair())
def test_byol_and_simsiam_are_minimal_when_the_prediction_points_at_the_target(case):
    p, z, factors, _ = case
    aligned = z * factors[0]
    assert byol_loss(aligned, z) <= 1e-5 and byol_loss(aligned, z) <= byol_loss(p, z) + 1e-6
    assert math.isclose(float(byol_loss(-aligned, z)), 4.0, abs_tol=1e-5)
    assert 0.0 <= byol_loss(p, z) <= 4.0
    assert math.isclose(float(simsiam_loss(aligned, z)), -1.0, abs_tol=1e-6)
    assert -1.0 - 1e-6 <= simsiam_loss(p, z) <= 1.0 + 1e-6
    _close(byol_loss(p * factors[0], z * factors[1]), byol_loss(p, z))


@FEW
@given(_random_pair(), st.floats(-50, 50))
def test_dino_ignores_a_constant_added_to_the_logits(case, shift):
    """Softmax is shift-invariant: a per-sample constant added to every view's logits (and to the centre) is a
    no-op for both the teacher and the student distributions."""
    s1, s2, factors, _ = case
    students, teachers, center = [s1, s2, s1 * 0.5], [s1, s2], s2.mean(0)
    base = dino_loss(students, teachers, center)
    per_row = factors[0] * shift / 1e3
    moved = dino_loss([s + per_row for s in students], [t + per_row + shift for t in teachers], center + shift)
    _close(moved, base)
