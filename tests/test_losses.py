"""Losses against values worked out by hand, plus the properties the methods rely on."""

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_lab.losses import barlow_twins_loss, nt_xent_loss


def test_nt_xent_hand_computed():
    # Unit vectors: a0=(1,0), a1=(0,1), b0=(3,4)/5=(0.6,0.8), b1=(0,-2)/2=(0,-1); positives a0<->b0, a1<->b1.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    t = 0.5
    e = math.exp
    # Cosines: a0.a1=0, a0.b0=0.6, a0.b1=0, a1.b0=0.8, a1.b1=-1, b0.b1=-0.8.
    anchor_a0 = -0.6 / t + math.log(e(0 / t) + e(0.6 / t) + e(0 / t))
    anchor_a1 = 1.0 / t + math.log(e(0 / t) + e(0.8 / t) + e(-1.0 / t))
    anchor_b0 = -0.6 / t + math.log(e(0.6 / t) + e(0.8 / t) + e(-0.8 / t))
    anchor_b1 = 1.0 / t + math.log(e(0 / t) + e(-1.0 / t) + e(-0.8 / t))
    expected = (anchor_a0 + anchor_a1 + anchor_b0 + anchor_b1) / 4
    assert nt_xent_loss(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_single_pair_is_zero():
    # With N=1 the partner is the only candidate, so it is always picked: loss log(1) = 0.
    assert nt_xent_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 0.5]])).item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_properties():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    random_pairs = nt_xent_loss(z1, z2)
    assert nt_xent_loss(z1, z1.clone()) < random_pairs
    assert nt_xent_loss(z2, z1).item() == pytest.approx(random_pairs.item(), rel=1e-6)
    assert nt_xent_loss(3.7 * z1, 0.01 * z2).item() == pytest.approx(random_pairs.item(), rel=1e-5)
    # Lower temperature sharpens: aligned pairs get an even smaller loss.
    assert nt_xent_loss(z1, z1, temperature=0.05) < nt_xent_loss(z1, z1, temperature=0.5)


def test_barlow_hand_computed():
    # z1 columns standardise to h1=[1,-1,1,-1] (from 3*h1+1) and h2=[1,1,-1,-1] (from 0.5*h2+2).
    z1 = torch.tensor([[4.0, 2.5], [-2.0, 2.5], [4.0, 1.5], [-2.0, 1.5]])
    # z2 col 1 = 5*h1-7 -> h1; col 2 = [12,12,12,4]: mean 10, biased var (4+4+4+36)/4=12 -> [1,1,1,-3]/sqrt(3).
    z2 = torch.tensor([[-2.0, 12.0], [-12.0, 12.0], [-2.0, 12.0], [-12.0, 4.0]])
    s3 = math.sqrt(3)
    c11 = (1 * 1 + -1 * -1 + 1 * 1 + -1 * -1) / 4  # = 1
    c12 = (1 * 1 + -1 * 1 + 1 * 1 + -1 * -3) / (4 * s3)  # = 1/sqrt(3)
    c21 = (1 * 1 + 1 * -1 + -1 * 1 + -1 * -1) / 4  # = 0
    c22 = (1 * 1 + 1 * 1 + -1 * 1 + -1 * -3) / (4 * s3)  # = 1/sqrt(3)
    on = (c11 - 1) ** 2 + (c22 - 1) ** 2
    off = c12**2 + c21**2
    loss, terms = barlow_twins_loss(z1, z2, lambd=0.5, eps=0.0)
    assert terms["on_diag"].item() == pytest.approx(on, rel=1e-5)
    assert terms["off_diag"].item() == pytest.approx(off, rel=1e-5)
    assert loss.item() == pytest.approx(on + 0.5 * off, rel=1e-5)
    # Default eps=1e-5 changes the numbers only slightly.
    assert barlow_twins_loss(z1, z2, lambd=0.5)[0].item() == pytest.approx(on + 0.5 * off, rel=1e-3)


def test_barlow_zero_for_identical_decorrelated_views():
    # Columns of a 4x4 Hadamard matrix without the constant one: mean 0, variance 1, mutually orthogonal.
    h = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    z = 2.0 * h + 5.0
    loss, terms = barlow_twins_loss(z, z.clone())
    assert loss.item() < 1e-8
    assert terms["off_diag"].item() < 1e-10
    # Anti-correlated views are maximally penalised on the diagonal: (−1 − 1)^2 per feature.
    _, anti = barlow_twins_loss(z, -z, eps=0.0)
    assert anti["on_diag"].item() == pytest.approx(3 * 4.0, rel=1e-6)


def test_losses_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g).bfloat16(), torch.randn(8, 4, generator=g).bfloat16()
    ref_nt = nt_xent_loss(z1.float(), z2.float())
    ref_bt = barlow_twins_loss(z1.float(), z2.float())[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nt = nt_xent_loss(z1, z2)
        bt, terms = barlow_twins_loss(z1, z2)
    assert nt.dtype == bt.dtype == terms["on_diag"].dtype == torch.float32
    assert nt.item() == pytest.approx(ref_nt.item(), rel=1e-6)
    assert bt.item() == pytest.approx(ref_bt.item(), rel=1e-6)


def test_losses_backpropagate():
    z1 = torch.randn(6, 3, requires_grad=True)
    z2 = torch.randn(6, 3, requires_grad=True)
    (nt_xent_loss(z1, z2) + barlow_twins_loss(z1, z2)[0]).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        nt_xent_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.ones(2, 2), torch.ones(2, 2), temperature=0.0)


pairs = st.tuples(st.integers(2, 6), st.integers(1, 5)).flatmap(
    lambda shape: st.tuples(*[hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32))] * 2)
)


@settings(deadline=None, max_examples=25)
@given(pairs)
def test_finite_inputs_give_finite_losses(pair):
    z1, z2 = (torch.from_numpy(a) for a in pair)
    assert torch.isfinite(nt_xent_loss(z1, z2))
    loss, terms = barlow_twins_loss(z1, z2)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert terms["on_diag"] >= 0 and terms["off_diag"] >= 0
