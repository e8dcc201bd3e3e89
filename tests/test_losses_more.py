"""BYOL, SimSiam, VICReg and MoCo v3 losses against values worked out by hand, and the properties methods need."""

import math

import pytest
import torch

from ssl_lab.losses import byol_loss, mocov3_loss, simsiam_loss, vicreg_loss

# p rows: (1,0) and (0,2); z rows: (1,1) and (0,-3). Cosines: 1/sqrt(2) and (0*0 + 2*-3)/(2*3) = -1.
P = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
Z = torch.tensor([[1.0, 1.0], [0.0, -3.0]])


def test_byol_hand_computed():
    expected = ((2 - 2 / math.sqrt(2)) + (2 - 2 * -1)) / 2  # = (6 - sqrt 2) / 2
    assert byol_loss(P, Z).item() == pytest.approx(expected, rel=1e-6)
    # Same direction at any scale: zero; opposite: the maximum 4.
    assert byol_loss(P, 5 * P).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(P, -P).item() == pytest.approx(4.0, rel=1e-6)


def test_simsiam_hand_computed():
    expected = -(1 / math.sqrt(2) + -1) / 2
    assert simsiam_loss(P, Z).item() == pytest.approx(expected, rel=1e-6)
    assert simsiam_loss(P, 3 * P).item() == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("fn", [byol_loss, simsiam_loss])
def test_no_gradient_flows_into_the_target(fn):
    p = P.clone().requires_grad_(True)
    z = Z.clone().requires_grad_(True)
    fn(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_vicreg_hand_computed():
    z1 = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    z2 = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    # invariance: differences (1, 2) and (1, -2): (1 + 4 + 1 + 4) / 4 = 2.5
    inv = 2.5
    # z1 centred: col 1 [-1, 1] (unbiased var 2, std 1.414: hinge 0), col 2 [0, 0] (std 0: hinge 1) -> mean 0.5
    # z2 centred: col 1 [-1, 1] (var 2), col 2 [-2, 2] (var 8): both hinges 0 -> mean 0. Averaged over views: 0.25
    var = (0.5 + 0.0) / 2
    # covariances (n - 1 = 1): z1 off-diagonal (-1*0 + 1*0) = 0; z2 off-diagonal (-1*-2 + 1*2) = 4, twice.
    cov = 0.0 / 2 + (4.0**2 + 4.0**2) / 2  # = 16
    loss, terms = vicreg_loss(z1, z2, eps=0.0)
    assert terms["invariance"].item() == pytest.approx(inv, rel=1e-6)
    assert terms["variance"].item() == pytest.approx(var, rel=1e-6)
    assert terms["covariance"].item() == pytest.approx(cov, rel=1e-6)
    assert loss.item() == pytest.approx(25 * inv + 25 * var + 1 * cov, rel=1e-6)  # = 84.75
    # The default eps=1e-4 lifts the collapsed column's std to sqrt(1e-4) = 0.01: hinge 0.99 -> (0.99 / 2) / 2.
    assert vicreg_loss(z1, z2)[1]["variance"].item() == pytest.approx(0.99 / 4, rel=1e-5)
    # Weights scale the terms and nothing else.
    loss2, _ = vicreg_loss(z1, z2, sim_weight=1.0, var_weight=2.0, cov_weight=0.5, eps=0.0)
    assert loss2.item() == pytest.approx(inv + 2 * var + 0.5 * cov, rel=1e-6)


def test_vicreg_zero_for_identical_spread_decorrelated_views():
    # Hadamard columns: mean 0, unbiased variance 4/3 (std > 1: no hinge), mutually orthogonal (no covariance).
    h = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    loss, terms = vicreg_loss(h + 3.0, h + 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in terms.values())


def test_vicreg_collapsed_views_pay_the_full_variance_hinge():
    z = torch.full((5, 4), 2.0)
    loss, terms = vicreg_loss(z, z.clone())
    assert terms["invariance"].item() == 0.0 and terms["covariance"].item() == 0.0
    assert terms["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-6)


def test_new_losses_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 4, generator=g).bfloat16(), torch.randn(8, 4, generator=g).bfloat16()
    refs = [byol_loss(a.float(), b.float()), simsiam_loss(a.float(), b.float()), vicreg_loss(a.float(), b.float())[0]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [byol_loss(a, b), simsiam_loss(a, b), vicreg_loss(a, b)[0]]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_vicreg_backpropagates_into_both_views():
    z1 = torch.randn(6, 3, requires_grad=True)
    z2 = torch.randn(6, 3, requires_grad=True)
    vicreg_loss(z1, z2)[0].backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        byol_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        simsiam_loss(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))


def test_mocov3_hand_computed():
    # Unit rows: q = (1,0), (0,1); k = (1,1)/sqrt 2, (0,-1). With T = 0.5 the logits are 2 * cosines:
    # row 1 [sqrt 2, 0] (target 0), row 2 [sqrt 2, -2] (target 1); the loss is 2T = 1 times the mean CE.
    ce1 = math.log(1 + math.exp(-math.sqrt(2)))
    ce2 = math.log(1 + math.exp(2 + math.sqrt(2)))
    assert mocov3_loss(P, Z, temperature=0.5).item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
    # 2T scaling: the same cosines at T = 0.25 give 0.5 times the CE of logits 4 * cosines.
    ce1, ce2 = math.log(1 + math.exp(-2 * math.sqrt(2))), math.log(1 + math.exp(4 + 2 * math.sqrt(2)))
    assert mocov3_loss(P, Z, temperature=0.25).item() == pytest.approx(0.5 * (ce1 + ce2) / 2, rel=1e-6)


def test_mocov3_keys_get_no_gradient_and_bad_temperature_is_refused():
    q = P.clone().requires_grad_(True)
    k = Z.clone().requires_grad_(True)
    mocov3_loss(q, k).backward()
    assert k.grad is None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        mocov3_loss(P, Z, temperature=0.0)
