"""The linear probe as the field runs it (MAE / DINO practice), on features computed once.

The backbone is frozen and in eval mode, so its features do not change from one epoch to the next: they are
extracted once from un-augmented images (optionally plus a fixed number of augmented passes of the train split) and
kept on the device. They are standardised with the statistics of the training features, a BatchNorm without affine
parameters (MAE's probe) whose statistics are the whole training set's rather than a batch's, so the exported head
is exact and deterministic. Then one of two solvers fits the linear layer:

- ``sgd``: DINO's ``eval_linear`` idea. One head per (learning rate, weight decay) pair of a grid, all trained in the
  same pass over the cached features (one batched matmul serves every head), SGD with momentum and a cosine
  schedule. Every head is scored on the val split after each epoch; the best (head, epoch) on val is kept, and only
  that one is ever scored on the test split.
- ``lbfgs``: exact full-batch multinomial logistic regression (L-BFGS), one fit per weight decay, chosen on val:
  the reference for small sets.

The objective is cross-entropy (classification), MSE on standardised regression targets (regression), or their sum
(joint, ``regression_weight`` weighing the MSE), as in the other downstream tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ssl_lab.errors import ConfigError, DataError

SOLVERS = ("sgd", "lbfgs")
EVAL_ROWS = 8192  # rows per chunk when scoring every head on a split


@dataclass
class FeatureSet:
    """Frozen-backbone features of one split, with what there is to predict (targets in original units)."""

    x: Tensor
    y: Tensor | None = None
    targets: Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Objective:
    n_classes: int = 0
    target_mean: Tensor | None = None  # [T]; None: no regression targets
    target_std: Tensor | None = None
    regression_weight: float = 1.0

    @property
    def n_targets(self) -> int:
        return 0 if self.target_mean is None else len(self.target_mean)

    @property
    def n_out(self) -> int:
        return self.n_classes + self.n_targets


@dataclass
class ProbeFit:
    """The chosen head (standardisation + linear layer, on the CPU) and how it was chosen."""

    head: nn.Sequential
    choice: dict[str, Any]
    grid: list[dict[str, Any]]
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # the chosen head's curves per epoch


# ---- features ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, view: Any, loader: Iterable[dict], device: torch.device,
                     autocast: torch.dtype | None = None) -> FeatureSet:
    """Features of every batch of ``loader`` through ``view`` (the eval view, or a seeded augmentation), float32 on
    ``device``. The backbone is put in eval mode: a probe must not move BatchNorm statistics."""
    backbone.eval().to(device)
    xs, ys, ts = [], [], []
    for batch in loader:
        x = batch["x"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            xs.append(backbone(view(x)).float())
        if "y" in batch:
            ys.append(batch["y"].to(device))
        if "targets" in batch:
            ts.append(batch["targets"].to(device).float())
    if not xs:
        return FeatureSet(torch.zeros(0, getattr(backbone, "num_features", 0), device=device))
    return FeatureSet(torch.cat(xs), torch.cat(ys) if ys else None, torch.cat(ts) if ts else None)


def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
    """Several passes over the same split (un-augmented + augmented) as one training set."""
    def cat(values: list[Tensor | None]) -> Tensor | None:
        return None if any(v is None for v in values) else torch.cat(values)

    return FeatureSet(torch.cat([p.x for p in parts]), cat([p.y for p in parts]), cat([p.targets for p in parts]))


def standardiser(x: Tensor, eps: float = 1e-6) -> nn.BatchNorm1d:
    """BatchNorm1d without affine, in eval mode, holding the mean and (population) variance of ``x``."""
    bn = nn.BatchNorm1d(x.shape[1], affine=False, eps=eps).to(x.device)
    bn.running_mean.copy_(x.mean(0))
    bn.running_var.copy_(x.var(0, unbiased=False))
    return bn.eval()


# ---- loss and gradient, for H heads at once ----------------------------------------------------------------------
def _outputs(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """[N, H, O] outputs of H linear heads (w [D, H, O], b [H, O]) on the same rows x [N, D]: one matmul."""
    d, h, o = w.shape
    return (x @ w.reshape(d, h * o)).view(-1, h, o) + b


def _standard_targets(obj: Objective, targets: Tensor | None) -> Tensor | None:
    if not obj.n_targets:
        return None
    return (targets - obj.target_mean.to(targets)) / obj.target_std.to(targets)


def loss_and_grad(out: Tensor, y: Tensor | None, z: Tensor | None, obj: Objective) -> tuple[Tensor, Tensor]:
    """Mean loss over the rows per head [H], and its gradient with respect to ``out`` [N, H, O], in closed form
    (softmax minus one-hot for cross-entropy, the residual for MSE): no autograd graph over H heads per step."""
    n, h, _ = out.shape
    loss = out.new_zeros(h)
    grad = torch.zeros_like(out)
    c = obj.n_classes
    if c:
        logp = out[..., :c].log_softmax(-1)
        picked = logp.gather(-1, y.view(n, 1, 1).expand(n, h, 1)).squeeze(-1)
        loss = loss - picked.mean(0)
        g = logp.exp()
        g.scatter_add_(-1, y.view(n, 1, 1).expand(n, h, 1), -torch.ones(n, h, 1, dtype=out.dtype, device=out.device))
        grad[..., :c] = g / n
    if obj.n_targets:
        resid = out[..., c:] - z[:, None, :]
        loss = loss + obj.regression_weight * resid.pow(2).mean(dim=(0, 2))
        grad[..., c:] = obj.regression_weight * 2.0 * resid / (n * obj.n_targets)
    return loss, grad


def _param_grads(x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """d loss / d (w, b) from d loss / d out: w [D, H, O], b [H, O]."""
    n, h, o = grad_out.shape
    return (x.T @ grad_out.reshape(n, h * o)).view(x.shape[1], h, o), grad_out.sum(0)


@torch.no_grad()
def score_heads(feats: FeatureSet, w: Tensor, b: Tensor, obj: Objective) -> tuple[Tensor, Tensor | None]:
    """(mean loss [H], accuracy [H] or None) of every head on a split, in row chunks."""
    z = _standard_targets(obj, feats.targets)
    h = w.shape[1]
    loss, correct = w.new_zeros(h), w.new_zeros(h)
    for s in range(0, len(feats), EVAL_ROWS):
        out = _outputs(feats.x[s:s + EVAL_ROWS], w, b)
        yb = None if feats.y is None else feats.y[s:s + EVAL_ROWS]
        zb = None if z is None else z[s:s + EVAL_ROWS]
        loss += loss_and_grad(out, yb, zb, obj)[0] * out.shape[0]
        if obj.n_classes:
            correct += (out[..., : obj.n_classes].argmax(-1) == yb[:, None]).to(w.dtype).sum(0)
    n = max(len(feats), 1)
    return loss / n, (correct / n if obj.n_classes else None)


def _select(val_loss: Tensor, val_acc: Tensor | None) -> int:
    """The best head: classification by val accuracy, ties broken by the lower val loss; otherwise by val loss.
    A diverged head (non-finite loss) is never chosen while another is finite; on a full tie, the first one."""
    loss = torch.where(torch.isfinite(val_loss), val_loss, torch.full_like(val_loss, math.inf))
    if val_acc is None:
        return int(loss.argmin())
    acc = torch.where(torch.isfinite(val_loss), val_acc, torch.full_like(val_acc, -1.0))
    return int(torch.where(acc == acc.max(), loss, torch.full_like(loss, math.inf)).argmin())


def _head(bn: nn.BatchNorm1d, w: Tensor, b: Tensor) -> nn.Sequential:
    """Standardisation + nn.Linear holding head weights w [D, O], b [O]."""
    linear = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        linear.weight.copy_(w.T)
        linear.bias.copy_(b)
    return nn.Sequential(bn, linear).cpu().float().eval()


def _check(train: FeatureSet, val: FeatureSet, obj: Objective, n_configs: int) -> None:
    if len(train) < 2:
        raise DataError(f"linear probe: {len(train)} training feature row(s); at least 2 are needed.")
    if obj.n_out == 0:
        raise ConfigError("linear probe: nothing to predict (no classes and no regression targets).")
    if obj.n_classes and train.y is None:
        raise DataError("linear probe: classification needs labels, but the training features have none.")
    if obj.n_targets and train.targets is None:
        raise DataError("linear probe: regression needs targets, but the training features have none.")
    if len(val) == 0 and n_configs > 1:
        raise ConfigError(
            f"linear probe: the val split is empty, so none of the {n_configs} hyper-parameter settings can be chosen "
            "without looking at the test split; set dataset.val_fraction > 0, or give one learning rate and one "
            "weight decay (task.lrs=[0.1] task.weight_decays=[0])."
        )


def _grid_rows(configs: list[dict[str, float]], loss: Tensor, acc: Tensor | None) -> list[dict[str, Any]]:
    rows = []
    for i, c in enumerate(configs):
        row: dict[str, Any] = {**c, "val_loss": float(loss[i]) if torch.isfinite(loss[i]) else None}
        if acc is not None:
            row["val_accuracy"] = float(acc[i])
        rows.append(row)
    return rows


def _choose(configs: list[dict[str, float]], val: FeatureSet, w: Tensor, b: Tensor, obj: Objective,
            train_loss: Tensor) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Score every head on val (or, with one setting and no val, take it) and pick one."""
    loss, acc = score_heads(val, w, b, obj) if len(val) else (train_loss, None)
    k = _select(loss, acc)
    choice: dict[str, Any] = {**configs[k], "val_loss": float(loss[k]) if len(val) else None}
    if acc is not None:
        choice["val_accuracy"] = float(acc[k])
    return k, choice, _grid_rows(configs, loss, acc)


# ---- solvers ----------------------------------------------------------------------------------------------------
def fit_sgd_grid(train: FeatureSet, val: FeatureSet, obj: Objective, lrs: Sequence[float],
                 weight_decays: Sequence[float], epochs: int, batch_size: int, momentum: float = 0.9,
                 seed: int = 0) -> ProbeFit:
    """Train one head per (lr, weight decay) together, SGD with momentum and a cosine schedule to zero; the heads
    are compared on val after the last epoch (annealed, so converged), and the best one is kept. The val curve of
    every head is recorded, but no epoch is picked by it: with a small val split, the maximum over epochs x heads
    would mostly pick noise."""
    configs = [{"lr": float(lr), "weight_decay": float(wd)} for lr in lrs for wd in weight_decays]
    _check(train, val, obj, len(configs))
    if not isinstance(epochs, int) or epochs < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"linear probe: task.max_epochs={epochs!r} and task.batch_size={batch_size!r} must be "
                          "positive integers.")
    device = train.x.device
    bn = standardiser(train.x)
    with torch.no_grad():
        xs, vs = bn(train.x), FeatureSet(bn(val.x), val.y, val.targets)
    z = _standard_targets(obj, train.targets)
    h, (n, d) = len(configs), xs.shape
    lr = torch.tensor([c["lr"] for c in configs], device=device)
    wd = torch.tensor([c["weight_decay"] for c in configs], device=device).view(1, h, 1)
    gen = torch.Generator().manual_seed(int(seed))
    w = (torch.randn(d, 1, obj.n_out, generator=gen) * 0.01).to(device).repeat(1, h, 1)
    b = torch.zeros(h, obj.n_out, device=device)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    curves: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
    total, step = epochs * -(-n // batch_size), 0
    with torch.no_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            train_loss = w.new_zeros(h)
            for s in range(0, n, batch_size):
                rows = order[s:s + batch_size]
                xb = xs[rows]
                losses, g_out = loss_and_grad(_outputs(xb, w, b), None if train.y is None else train.y[rows],
                                              None if z is None else z[rows], obj)
                gw, gb = _param_grads(xb, g_out)
                rate = lr * (0.5 * (1 + math.cos(math.pi * step / total)))
                vw.mul_(momentum).add_(gw + wd * w)
                vb.mul_(momentum).add_(gb)
                w -= rate.view(1, h, 1) * vw
                b -= rate.view(h, 1) * vb
                train_loss += losses * len(rows)
                step += 1
            loss, acc = score_heads(vs, w, b, obj) if len(vs) else (None, None)
            curves.append((train_loss / n, loss, acc))
    k, choice, grid = _choose(configs, vs, w, b, obj, curves[-1][0])
    history = {name: {e: float(c[i][k]) for e, c in enumerate(curves) if c[i] is not None}
               for i, name in enumerate(("train/loss", "val/loss", "val/acc"))}
    choice = {"solver": "sgd", **choice, "epochs": epochs, "batch_size": batch_size, "momentum": momentum,
              "heads": h}
    return ProbeFit(_head(bn, w[:, k], b[k]), choice, grid, {c: v for c, v in history.items() if v})


def fit_lbfgs(train: FeatureSet, val: FeatureSet, obj: Objective, weight_decays: Sequence[float],
              max_iter: int = 1000, tol: float = 1e-6) -> ProbeFit:
    """Exact minimiser of mean loss + wd/2 * ||W||^2 (bias not penalised) per weight decay, by scipy's L-BFGS-B
    in float64 on the CPU (the solver scikit-learn uses); the best on val is kept. On standardised features and
    with wd = 1 / (C * n_train) this is scikit-learn's LogisticRegression(C)."""
    from scipy.optimize import minimize

    configs = [{"weight_decay": float(wd)} for wd in weight_decays]
    _check(train, val, obj, len(configs))
    bn = standardiser(train.x)
    with torch.no_grad():
        xs = bn(train.x).double().cpu()
        vs = FeatureSet(bn(val.x).double().cpu(), None if val.y is None else val.y.cpu(),
                        None if val.targets is None else val.targets.double().cpu())
    obj64 = Objective(obj.n_classes, None if obj.target_mean is None else obj.target_mean.double().cpu(),
                      None if obj.target_std is None else obj.target_std.double().cpu(), obj.regression_weight)
    y = None if train.y is None else train.y.cpu()
    z = _standard_targets(obj64, None if train.targets is None else train.targets.double().cpu())
    d, o = xs.shape[1], obj.n_out
    ws, bs, iters = [], [], []
    for c in configs:
        def fun(theta):
            t = torch.from_numpy(theta)
            w, b = t[: d * o].view(d, 1, o), t[d * o:].view(1, o)
            loss, g_out = loss_and_grad(_outputs(xs, w, b), y, z, obj64)
            gw, gb = _param_grads(xs, g_out)
            gw = gw + c["weight_decay"] * w
            value = float(loss[0]) + 0.5 * c["weight_decay"] * float(w.pow(2).sum())
            return value, torch.cat([gw.flatten(), gb.flatten()]).numpy()

        res = minimize(fun, torch.zeros(d * o + o, dtype=torch.float64).numpy(), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(max_iter), "gtol": tol})
        theta = torch.from_numpy(res.x)
        ws.append(theta[: d * o].view(d, o))
        bs.append(theta[d * o:])
        iters.append(int(res.nit))
    w, b = torch.stack(ws, dim=1), torch.stack(bs)
    train_loss = score_heads(FeatureSet(xs, y, None if train.targets is None else train.targets.double().cpu()),
                             w, b, obj64)[0]
    k, choice, grid = _choose(configs, vs, w, b, obj64, train_loss)
    for row, n_iter in zip(grid, iters):
        row["iterations"] = n_iter
    choice = {"solver": "lbfgs", **choice, "max_iter": int(max_iter), "iterations": iters[k]}
    return ProbeFit(_head(bn.cpu(), w[:, k], b[k]), choice, grid)


@torch.no_grad()
def predict(head: nn.Module, feats: FeatureSet, obj: Objective) -> dict[str, Tensor]:
    """What ``ssl_lab.tasks.outputs.collect`` gives for a trained model: probabilities and labels, regression
    predictions and targets in original units, on the CPU."""
    out = head.to(feats.x.device)(feats.x).float().cpu()
    preds: dict[str, Tensor] = {}
    if obj.n_classes:
        preds["probs"] = out[:, : obj.n_classes].softmax(1)
        preds["y"] = feats.y.cpu()
    if obj.n_targets:
        preds["pred"] = out[:, obj.n_classes:] * obj.target_std.cpu() + obj.target_mean.cpu()
        preds["targets"] = feats.targets.cpu()
    return preds


def fit_probe(train: FeatureSet, val: FeatureSet, obj: Objective, solver: str, lrs: Sequence[float],
              weight_decays: Sequence[float], epochs: int, batch_size: int, momentum: float = 0.9, seed: int = 0,
              max_iter: int = 1000) -> ProbeFit:
    if solver == "sgd":
        return fit_sgd_grid(train, val, obj, lrs, weight_decays, epochs, batch_size, momentum, seed)
    if solver == "lbfgs":
        return fit_lbfgs(train, val, obj, weight_decays, max_iter)
    raise ConfigError(f"task.solver={solver!r}; choose one of: {', '.join(SOLVERS)}.")
