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


def mocov3_loss(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3 (Chen, Xie & He 2021): InfoNCE of each query against all keys, its own key the positive.

    ``q`` [N, D] are the online predictions of one view, ``k`` [N, D] the momentum encoder's projections of the
    other (detached here); row i of q pairs with row i of k, the other N-1 keys are negatives. Scaled by
    ``2 * temperature`` as in the paper, which keeps the gradient's size independent of the temperature. One
    direction only: the method sums (q1, k2) and (q2, k1).
    """
    _check_pair(q, k, "mocov3_loss", 1)
    if not temperature > 0:
        raise ValueError(f"mocov3_loss: temperature must be > 0, got {temperature}.")
    with _float32(q.device):
        logits = F.normalize(q.float(), dim=1) @ F.normalize(k.detach().float(), dim=1).T / temperature
        targets = torch.arange(q.shape[0], device=q.device)
        return 2.0 * temperature * F.cross_entropy(logits, targets)


def dino_loss(student_logits: list[Tensor], teacher_logits: list[Tensor], center: Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> Tensor:
    """DINO: cross-entropy from the centred, sharpened teacher to the student, over every pair of different views.

    Convention: ``teacher_logits`` holds the V_t global views, ``student_logits`` all V_s >= V_t views with the same
    global views first, so ``student_logits[i]`` and ``teacher_logits[i]`` are the same view and that pair is
    skipped. Teacher: ``softmax((t - center) / teacher_temp)``, detached here (the teacher never gets gradients);
    student: ``log_softmax(s / student_temp)``. Per pair: ``-sum_k P_t log P_s`` over the K prototypes, mean over
    the batch; the loss is the mean over the V_t * V_s - V_t pairs (as the authors' code). ``center`` is [K] or
    [1, K]; the caller updates it after this call.
    """
    if not teacher_logits or len(student_logits) < len(teacher_logits):
        raise ValueError(f"dino_loss: needs at least one teacher view and at least as many student views, got "
                         f"{len(teacher_logits)} teacher and {len(student_logits)} student views.")
    shape = teacher_logits[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*teacher_logits, *student_logits)):
        shapes = [tuple(t.shape) for t in (*teacher_logits, *student_logits)]
        raise ValueError(f"dino_loss: every view's logits must be [N, K] with the same shape, got {shapes}.")
    if center.numel() != shape[1]:
        raise ValueError(f"dino_loss: center has {center.numel()} entries for {shape[1]} prototypes.")
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"dino_loss: temperatures must be > 0, got student_temp={student_temp}, "
                         f"teacher_temp={teacher_temp}.")
    if len(student_logits) < 2:
        raise ValueError("dino_loss: one view leaves no pair of different views; pass at least two student views.")
    with _float32(center.device):
        c = center.detach().float().reshape(1, -1)
        targets = [F.softmax((t.detach().float() - c) / teacher_temp, dim=1) for t in teacher_logits]
        log_probs = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_logits]
        terms = [-(p_t * log_p).sum(dim=1).mean()
                 for i, p_t in enumerate(targets) for j, log_p in enumerate(log_probs) if i != j]
        return torch.stack(terms).mean()


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C]: the pixel targets MAE reconstructs, one row per ViT token.

    Patches are numbered row-major over the (H/patch, W/patch) grid, the order of timm's patch embedding, so row n
    is token n. Within a patch, element ``(dy * patch + dx) * C + c`` is pixel (dy, dx) of channel c: channels
    vary fastest, then columns, then rows.
    """
    if images.ndim != 4:
        raise ValueError(f"patchify: images must be [B, C, H, W], got shape {tuple(images.shape)}.")
    b, c, h, w = images.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patchify: a {h}x{w} image does not tile into {patch}x{patch} patches; "
                         "use a patch size that divides the image size.")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, dy, dx, C]
    return x.reshape(b, gh * gw, patch * patch * c)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """MAE: mean squared error per patch, averaged over the masked patches only (``mask`` 1 = masked, 0 = seen).

    ``pred`` and ``target`` are [B, N, D] (``patchify`` rows), ``mask`` is [B, N]. The visible patches are left out:
    copying them back teaches nothing. With ``norm_pix`` each target patch is standardised by its own mean and
    unbiased variance, ``(t - mean) / sqrt(var + eps)`` (the paper's better-representation variant); the caller
    needs at least one masked patch (an all-visible mask divides 0 by 0).
    """
    if pred.ndim != 3 or pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"mae_loss: pred and target must be [B, N, D] with mask [B, N], got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)} and {tuple(mask.shape)}.")
    if norm_pix and (pred.shape[2] < 2 or not eps > 0):
        raise ValueError(f"mae_loss: norm_pix=True needs at least 2 values per patch and eps > 0 (a flat patch has "
                         f"variance 0), got {pred.shape[2]} values and eps={eps}.")
    with _float32(pred.device):
        t = target.detach().float()
        if norm_pix:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + eps).sqrt()
        per_patch = (pred.float() - t).pow(2).mean(dim=-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum()


def pretext_classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Pretext tasks (which rotation, which blur level): mean cross-entropy of ``logits`` [N, K] against the
    transform ``labels`` [N] (integers in 0..K-1), and ``{"acc": fraction of argmax == label}``, detached, for
    logging (ties go to the lowest class, torch.argmax's rule). No range check on the labels: it would make the host
    wait for the device every step; cross_entropy itself rejects out-of-range labels.
    """
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0] or logits.shape[0] < 1:
        raise ValueError(f"pretext_classification_loss: logits must be [N, K] and labels [N] with N >= 1, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"pretext_classification_loss: labels must be integer class indices, got {labels.dtype}.")
    with _float32(logits.device):
        z = logits.float()
        loss = F.cross_entropy(z, labels.long())
        acc = (z.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"acc": acc}
