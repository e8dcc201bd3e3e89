"""SSL losses as pure functions of two batches of embeddings (easy to unit-test and to reuse under DDP).

All compute in float32 with autocast disabled: exp/log over a similarity matrix and batch standardisation are
too lossy in bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(z1: Tensor, z2: Tensor, fn: str, min_batch: int) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{fn}: z1 and z2 must both be [N, D] with the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}; pass the two views' projections.")
    if z1.shape[0] < min_batch:
        raise ValueError(f"{fn}: needs a batch of at least {min_batch} samples, got shape {tuple(z1.shape)}; "
                         "increase the batch size.")


@contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR NT-Xent: each of the 2N views must pick its partner among the 2N-1 others (cosine / temperature).

    Mean over all 2N anchors, so the loss is symmetric in (z1, z2) and invariant to the scale of z.
    """
    _check_pair(z1, z2, "nt_xent_loss", 1)
    if not temperature > 0:
        raise ValueError(f"nt_xent_loss: temperature must be > 0, got {temperature}.")
    n = z1.shape[0]
    with _float32(z1.device):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / temperature
        eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        idx = torch.arange(2 * n, device=z.device)
        targets = (idx + n) % (2 * n)
        return F.cross_entropy(logits, targets)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, lambd: float = 0.0051, eps: float = 1e-5
) -> tuple[Tensor, dict[str, Tensor]]:
    """Barlow Twins: cross-correlation of batch-standardised views pushed to the identity.

    Standardisation uses the biased batch variance with ``eps`` inside the sqrt (as BatchNorm1d(affine=False)).
    Returns ``(on + lambd * off, {"on_diag": on, "off_diag": off})``.
    """
    _check_pair(z1, z2, "barlow_twins_loss", 2)
    n = z1.shape[0]
    with _float32(z1.device):
        a, b = z1.float(), z2.float()
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + eps)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + eps)
        c = a.T @ b / n
        diag = torch.diagonal(c)
        on = (diag - 1).pow(2).sum()
        off = c.pow(2).masked_fill(torch.eye(c.shape[0], dtype=torch.bool, device=c.device), 0.0).sum()
        return on + lambd * off, {"on_diag": on, "off_diag": off}


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL: ``2 - 2 cos(p, z)`` averaged over the batch (the MSE of the L2-normalised vectors).

    ``p`` is the online prediction, ``z`` the target projection of the other view; ``z`` is detached here, so the
    target never receives gradients even if the caller forgot ``no_grad``. One direction only: the method sums
    both (p1, z2) and (p2, z1).
    """
    _check_pair(p, z, "byol_loss", 1)
    with _float32(p.device):
        cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
        return (2.0 - 2.0 * cos).mean()


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam: negative cosine ``-cos(p, stopgrad(z))`` averaged over the batch, in [-1, 1].

    The stop-gradient on ``z`` is what keeps SimSiam from collapsing, so it lives here, not in the caller.
    One direction only: the method averages (p1, z2) and (p2, z1).
    """
    _check_pair(p, z, "simsiam_loss", 1)
    with _float32(p.device):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def vicreg_loss(
    z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg (Bardes et al. 2022): invariance + variance + covariance, returned unweighted as terms.

    - invariance: mean squared error between the views, over N x D.
    - variance: hinge ``mean_d relu(1 - sqrt(var_d + eps))`` with the unbiased batch variance (gamma = 1),
      averaged over the two views.
    - covariance: off-diagonal entries of each view's (unbiased) covariance, squared, summed, divided by D;
      summed over the two views.
    The view-averaging of the variance and the view-sum of the covariance follow the authors' reference code,
    which is what the default weights 25 / 25 / 1 were tuned with.
    Returns ``(sim_weight * inv + var_weight * var + cov_weight * cov, {"invariance", "variance", "covariance"})``.
    """
    _check_pair(z1, z2, "vicreg_loss", 2)
    n, d = z1.shape
    with _float32(z1.device):
        a, b = z1.float(), z2.float()
        invariance = F.mse_loss(a, b)
        a, b = a - a.mean(0), b - b.mean(0)
        hinge_a = F.relu(1.0 - torch.sqrt(a.var(0) + eps)).mean()
        hinge_b = F.relu(1.0 - torch.sqrt(b.var(0) + eps)).mean()
        variance = (hinge_a + hinge_b) / 2
        off = ~torch.eye(d, dtype=torch.bool, device=a.device)
        cov_a, cov_b = a.T @ a / (n - 1), b.T @ b / (n - 1)
        covariance = cov_a[off].pow(2).sum() / d + cov_b[off].pow(2).sum() / d
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
        return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}
