"""DDP correctness: two gloo processes on the CPU, each with half the batch, against one process with all of it.

Per rank: the method's loss on its shard, backward, then the gradient averaged over ranks (what DDP's all-reduce
does). Methods whose loss couples samples (SimCLR, MoCo v3, Barlow Twins, VICReg) gather the global batch, so
every rank's loss must equal the single-process loss; per-sample losses (BYOL, SimSiam, DINO, rotation) match on
average. In both cases the averaged gradients must equal the single-process gradients, and DINO's centre, a mean
over the global batch, must equal the single-process one. (MAE and blur prediction are per-sample losses too, but
their random masks and levels are drawn per rank, so no single-process run sees the same inputs.)

BatchNorm is replaced by Identity in the models here: its synchronised form (SyncBatchNorm, which Lightning
switches on with accelerator.sync_batchnorm) has no CPU kernel in torch, and per-rank BatchNorm statistics
would differ from the single-process ones by design.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_lab.augment import Augment
from ssl_lab.distributed import all_reduce_mean, gather
from ssl_lab.methods.barlow import BarlowTwins
from ssl_lab.methods.byol import BYOL
from ssl_lab.methods.dino import DINO
from ssl_lab.methods.mocov3 import MoCoV3
from ssl_lab.methods.rotation import Rotation
from ssl_lab.methods.simclr import SimCLR
from ssl_lab.methods.simsiam import SimSiam
from ssl_lab.methods.vicreg import VICReg

WORLD = 2
BATCH = 8  # global batch; 4 per rank
OPTIM = {"name": "adam", "lr": 1e-3}
HEAD = {"proj_hidden_dims": [24], "proj_output_dim": 12}
METHODS = {
    "simclr": (SimCLR, {}),
    "mocov3": (MoCoV3, {"pred_hidden_dims": [24]}),
    "barlow": (BarlowTwins, {}),
    "vicreg": (VICReg, {}),
    "byol": (BYOL, {"pred_hidden_dims": [24]}),
    "simsiam": (SimSiam, {"pred_hidden_dims": [8]}),
    "dino": (DINO, {"out_dim": 32, "head_norm": "bn", "freeze_last_layer": 0}),
    "rotation": (Rotation, {"head_hidden_dims": [24]}),
}
GLOBAL_LOSS = {"simclr", "mocov3", "barlow", "vicreg"}


class Encoder(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 16


def without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


def build(name: str) -> nn.Module:
    cls, kw = METHODS[name]
    torch.manual_seed(0)  # the same initial weights in every process, as DDP's broadcast would give
    head = {} if name == "rotation" else HEAD
    model = cls(name, Encoder(), Augment("none", {}), OPTIM, **head, **kw)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return without_batchnorm(model)


def global_views(name: str) -> list[torch.Tensor]:
    """Two 8 px views; DINO also gets two 4 px local crops, rotation its one view."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(BATCH, 1, 8, 8, generator=g) for _ in range(2)]
    if name == "dino":
        views += [torch.randn(BATCH, 1, 4, 4, generator=g) for _ in range(2)]
    return views[:1] if name == "rotation" else views


def loss_and_grads(model: nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = model.loss(views)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for name in METHODS:
            model = build(name)
            loss, grads = loss_and_grads(model, [v[shard] for v in global_views(name)])
            for g in grads.values():  # DDP: gradients averaged over ranks
                dist.all_reduce(g)
                g /= WORLD
            results[name] = {"loss": loss, "mean_loss": all_reduce_mean(loss), "grads": grads,
                             "buffers": dict(model.named_buffers())}
        # The collectives themselves: rank-ordered concatenation, gradient back to each rank's own slice.
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        g = gather(x)
        (g * torch.arange(1.0, 5.0).view(4, 1)).sum().backward()
        results["gather"] = {"value": g.detach(), "grad": x.grad}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gather_concatenates_in_rank_order_and_sums_gradients_back(ranks):
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["gather"]["value"],
                                   torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3]))
        # d/dx of sum(row weight * row): rows 1-2 belong to rank 0, rows 3-4 to rank 1; each rank's copy of the
        # loss sends its gradient, so the sum over the two ranks arrives (then DDP's mean halves it).
        weights = torch.arange(1.0, 5.0)[2 * rank:2 * rank + 2].view(2, 1) * WORLD
        torch.testing.assert_close(res["gather"]["grad"], weights.expand(2, 3))


@pytest.mark.parametrize("name", list(METHODS))
def test_ddp_loss_and_gradients_equal_the_single_process_ones(ranks, name):
    model = build(name)
    ref_loss, ref_grads = loss_and_grads(model, global_views(name))
    # Float round-off scales with the largest gradient (Barlow's last bias has an exactly-zero true gradient).
    atol = 1e-5 * max(g.abs().max().item() for g in ref_grads.values())
    for rank, res in enumerate(ranks):
        got = res[name]
        if name in GLOBAL_LOSS:
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6, msg=f"rank {rank} loss")
        torch.testing.assert_close(got["mean_loss"], ref_loss, rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == ref_grads.keys()
        for key, ref in ref_grads.items():
            torch.testing.assert_close(got["grads"][key], ref, rtol=1e-4, atol=atol,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank} {key}: {m}")
        if name == "dino":  # the centre moved towards the teacher's mean over the global batch
            assert got["buffers"]["center"].abs().sum() > 0
            torch.testing.assert_close(got["buffers"]["center"], model.center, rtol=1e-5, atol=1e-7)


def test_collectives_are_the_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather(x) is x
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x) and not mean.requires_grad
