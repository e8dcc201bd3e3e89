"""SSL losses as pure functions of two batches of embeddings (easy to unit-test and to reuse under DDP).

Both compute in float32 with autocast disabled: exp/log over a similarity matrix and batch standardisation are
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
