"""Global-batch collectives for losses under DDP; each is the identity in a single process.

Why gather with gradients: a contrastive loss (SimCLR, MoCo v3) needs every rank's embeddings as negatives, and
Barlow Twins / VICReg need batch statistics over the global batch. Each rank gathers the whole batch and
computes the single-process loss on it, so every rank holds the same loss. The backward sums the gradient that
each rank's copy of the loss sends to a rank's slice; DDP then averages over ranks, which gives exactly the
single-process gradient of the global loss (tested with two gloo processes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank = dist.get_rank()
        return grad[rank * ctx.n:(rank + 1) * ctx.n]


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` [N, ...] from every rank in rank order ([world * N, ...]); gradients flow back to each
    rank's own slice. Every rank must pass the same N (training loaders drop the last, short batch)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over ranks, without gradients (e.g. DINO's centre of the teacher outputs)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
