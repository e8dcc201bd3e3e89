"""ssl_lab's losses against lightly's (an independent implementation, installed with the dev extra), on seeded random
embeddings: values, and where the two should agree, gradients. Convention differences are named where they occur."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss

from ssl_lab.losses import (barlow_twins_loss, byol_loss, dino_loss, mocov3_loss, nt_xent_loss, simsiam_loss,
                            vicreg_loss)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def pair(seed: int, n: int = 16, d: int = 32, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views' embeddings (a shared part plus noise), so the losses are far from their trivial values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    z1 = (base + 0.5 * torch.randn(n, d, generator=g)).requires_grad_(requires_grad)
    z2 = (base + 0.5 * torch.randn(n, d, generator=g)).requires_grad_(requires_grad)
    return z1, z2


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(("seed", "temperature"), [(0, 0.1), (1, 0.5), (2, 1.0)])
def test_nt_xent_equals_lightly_value_and_gradient(seed, temperature):
    # Same convention in both: mean over the 2N anchors, 2N - 1 candidates each.
    z1, z2 = pair(seed, requires_grad=True)
    ours = nt_xent_loss(z1, z2, temperature)
    theirs = NTXentLoss(temperature=temperature)(z1, z2)
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(grads(ours, z1, z2), grads(theirs, z1, z2)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(("seed", "temperature"), [(0, 0.2), (3, 1.0)])
def test_mocov3_equals_lightly_infonce_with_the_other_keys_as_negatives(seed, temperature):
    # lightly 1.6 has no MoCo v3 loss; its MoCo loss (NTXentLoss with a memory bank) scores one query against its
    # own key and the bank. MoCo v3's negatives for query i are the other N - 1 keys of the batch, so query i is
    # scored with a bank holding exactly those (lightly stores keys L2-normalised). MoCo v3 scales the mean
    # cross-entropy by 2 * temperature (the paper's code; ssl_lab documents it): the one convention difference.
    q, k = pair(seed)
    n, d = q.shape
    keys = F.normalize(k, dim=1)
    per_query = []
    for i in range(n):
        criterion = NTXentLoss(temperature=temperature, memory_bank_size=(n - 1, d))
        criterion.memory_bank.bank = torch.cat([keys[:i], keys[i + 1:]])
        per_query.append(criterion(q[i:i + 1], k[i:i + 1]))
    theirs = 2 * temperature * torch.stack(per_query).mean()
    torch.testing.assert_close(mocov3_loss(q, k, temperature), theirs, **TOL)


@pytest.mark.parametrize(("seed", "lambd"), [(0, 0.0051), (4, 0.05)])
def test_barlow_twins_equals_lightly_value_and_gradient(seed, lambd):
    # Both standardise each dimension with the biased batch variance and eps = 1e-5 inside the sqrt.
    z1, z2 = pair(seed, requires_grad=True)
    ours, terms = barlow_twins_loss(z1, z2, lambd=lambd)
    theirs = BarlowTwinsLoss(lambda_param=lambd)(z1, z2)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(terms["on_diag"] + lambd * terms["off_diag"], theirs, **TOL)
    for a, b in zip(grads(ours, z1, z2), grads(theirs, z1, z2)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(("seed", "weights"), [(0, (25.0, 25.0, 1.0)), (5, (1.0, 10.0, 3.0))])
def test_vicreg_equals_lightly_value_terms_and_gradient(seed, weights):
    # Both follow the authors' code: variance hinge averaged over the two views, covariance summed over them.
    sim, var, cov = weights
    # small embeddings (std 0.3) so the variance hinge is active and its term is not trivially 0
    z1, z2 = (0.3 * t for t in pair(seed))
    z1.requires_grad_(True), z2.requires_grad_(True)
    ours, terms = vicreg_loss(z1, z2, sim_weight=sim, var_weight=var, cov_weight=cov)
    theirs = VICRegLoss(lambda_param=sim, mu_param=var, nu_param=cov)(z1, z2)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert terms["variance"] > 0.1
    torch.testing.assert_close(terms["invariance"], invariance_loss(z1, z2), **TOL)
    torch.testing.assert_close(terms["variance"], 0.5 * (variance_loss(z1) + variance_loss(z2)), **TOL)
    torch.testing.assert_close(terms["covariance"], covariance_loss(z1) + covariance_loss(z2), **TOL)
    for a, b in zip(grads(ours, z1, z2), grads(theirs, z1, z2)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("seed", [0, 6])
def test_byol_and_simsiam_are_lightlys_negative_cosine(seed):
    # lightly's NegativeCosineSimilarity is -cos averaged over the batch: SimSiam's loss as it is, and BYOL's
    # 2 - 2 cos (the MSE of normalised vectors) after the factor and offset lightly's BYOL benchmark applies
    # in its comment ("L2(norm(x), norm(y)) = 2 - 2 * cossim(x, y)").
    p, z = pair(seed, requires_grad=True)
    neg_cos = NegativeCosineSimilarity()(p, z)
    torch.testing.assert_close(simsiam_loss(p, z), neg_cos, **TOL)
    torch.testing.assert_close(byol_loss(p, z), 2 + 2 * neg_cos, **TOL)
    # the prediction gets lightly's gradient; the target gets none (ssl_lab's stop-gradient, lightly's detach())
    grad_p, = grads(simsiam_loss(p, z), p)
    torch.testing.assert_close(grad_p, grads(NegativeCosineSimilarity()(p, z.detach()), p)[0], **TOL)
    for loss in (simsiam_loss(p, z), byol_loss(p, z)):
        assert torch.autograd.grad(loss, z, allow_unused=True)[0] is None


@pytest.mark.parametrize(("seed", "n_local", "temps"), [(0, 0, (0.1, 0.04)), (7, 4, (0.1, 0.07))])
def test_dino_equals_lightly_with_multi_crop(seed, n_local, temps):
    # Same pairing in both: student view i and teacher view i are the same global view and that pair is skipped;
    # the loss is the mean over the remaining pairs of the batch-mean cross-entropy.
    student_temp, teacher_temp = temps
    g = torch.Generator().manual_seed(seed)
    n, k = 8, 64
    teacher = [torch.randn(n, k, generator=g) for _ in range(2)]
    student = [(torch.randn(n, k, generator=g) * 2).requires_grad_(True) for _ in range(2 + n_local)]
    center = 0.3 * torch.randn(1, k, generator=g)
    ours = dino_loss(student, teacher, center, student_temp=student_temp, teacher_temp=teacher_temp)
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp,
                         student_temp=student_temp)
    criterion.center.copy_(center.view(1, 1, k))  # lightly keeps its centre as [1, 1, K]
    theirs = criterion(teacher, student, teacher_temp=teacher_temp)
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(grads(ours, *student), grads(theirs, *student)):
        torch.testing.assert_close(a, b, **TOL)
