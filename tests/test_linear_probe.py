"""The cached-feature linear probe: exact gradients, heads that do not talk to each other, the choice made on val
only, and agreement with scikit-learn's logistic regression on real image features (scikit-learn's digits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from ssl_lab.backbones import build_backbone
from ssl_lab.errors import ConfigError
from ssl_lab.evaluation.linear_probe import (FeatureSet, Objective, _select, fit_probe, fit_sgd_grid, loss_and_grad,
                                             predict, standardiser)
from ssl_lab.evaluation.probe import logistic_probe

GRID = dict(lrs=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], weight_decays=[0.0, 1e-4, 1e-3, 1e-2])


def _blobs(n: int = 240, d: int = 16, c: int = 3, seed: int = 0, targets: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, d, generator=g) * 3.0 + 5.0 + F.one_hot(y, c).float() @ torch.randn(c, d, generator=g) * 2
    t = (x[:, :targets] * 2.0 + 7.0 + torch.randn(n, targets, generator=g) * 0.1) if targets else None
    return FeatureSet(x, y, t)


def _rows(fs: FeatureSet, idx) -> FeatureSet:
    return FeatureSet(fs.x[idx], fs.y[idx], None if fs.targets is None else fs.targets[idx])


@pytest.mark.parametrize("n_classes,n_targets", [(3, 0), (0, 2), (3, 2)])
def test_closed_form_gradient_equals_autograd(n_classes, n_targets):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(7, 4, n_classes + n_targets, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, max(n_classes, 1), (7,), generator=g)
    z = torch.randn(7, n_targets, generator=g, dtype=torch.float64)
    obj = Objective(n_classes, torch.zeros(n_targets) if n_targets else None,
                    torch.ones(n_targets) if n_targets else None, regression_weight=0.7)
    loss, grad = loss_and_grad(out, y, z, obj)
    reg = [0.7 * F.mse_loss(out[:, h, n_classes:], z) for h in range(4)] if n_targets else [0.0] * 4
    per_head = torch.stack([(F.cross_entropy(out[:, h, :n_classes], y) if n_classes else out.new_zeros(())) + reg[h]
                            for h in range(4)])
    torch.testing.assert_close(loss, per_head.detach())
    (auto,) = torch.autograd.grad(per_head.sum(), out)
    torch.testing.assert_close(grad, auto)


def test_standardiser_is_a_batchnorm_without_affine_holding_the_training_statistics():
    x = _blobs().x
    bn = standardiser(x)
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and not bn.training
    np.testing.assert_allclose(bn(x).numpy(), StandardScaler().fit_transform(x.numpy()), atol=1e-4)


def test_lbfgs_is_scikit_learns_logistic_regression():
    data = _blobs(n=300, d=12, c=4)
    train, val = _rows(data, slice(0, 240)), _rows(data, slice(240, 300))
    c_value = 0.5
    fit = fit_probe(train, val, Objective(4), "lbfgs", [0.1], [1.0 / (c_value * len(train))], 1, 1, max_iter=5000)
    scaler = StandardScaler().fit(train.x.numpy().astype(np.float64))
    ref = LogisticRegression(C=c_value, tol=1e-10, max_iter=10000).fit(scaler.transform(train.x.numpy()),
                                                                       train.y.numpy())
    linear = fit.head[1]
    np.testing.assert_allclose(linear.weight.detach().numpy(), ref.coef_, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(linear.bias.detach().numpy(), ref.intercept_, atol=2e-3)
    probs = predict(fit.head, val, Objective(4))["probs"].numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(scaler.transform(val.x.numpy())), atol=1e-3)


def test_heads_of_a_grid_train_as_if_alone():
    data = _blobs()
    train, val = _rows(data, slice(0, 180)), _rows(data, slice(180, 240))
    together = fit_sgd_grid(train, val, Objective(3), [0.05, 0.5], [0.0, 1e-2], epochs=5, batch_size=32)
    for row in together.grid:
        alone = fit_sgd_grid(train, val, Objective(3), [row["lr"]], [row["weight_decay"]], epochs=5, batch_size=32)
        assert alone.grid[0]["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_the_choice_is_the_best_val_head_and_a_diverged_head_is_never_chosen():
    data = _blobs(c=3)
    data.x[::2] += torch.randn(120, 16, generator=torch.Generator().manual_seed(2)) * 8  # settings differ on val
    train, val = _rows(data, slice(0, 180)), _rows(data, slice(180, 240))
    fit = fit_sgd_grid(train, val, Objective(3), [1e-3, 0.1, 1.0], [0.0], epochs=10, batch_size=16)
    accs = [r["val_accuracy"] if r["val_loss"] is not None else -1 for r in fit.grid]
    best = max(accs)
    tied = [r for r, a in zip(fit.grid, accs) if a == best]
    assert fit.choice["val_accuracy"] == best
    assert fit.choice["val_loss"] == min(r["val_loss"] for r in tied)
    # a head whose loss is not finite (it diverged) is never chosen, whatever its accuracy
    assert _select(torch.tensor([0.5, float("nan"), float("inf")]), torch.tensor([0.8, 0.9, 0.9])) == 0
    assert set(fit.history) == {"train/loss", "val/loss", "val/acc"} and len(fit.history["val/acc"]) == 10


def test_regression_and_joint_objectives_predict_in_original_units():
    data = _blobs(targets=2)
    train, val, test = _rows(data, slice(0, 160)), _rows(data, slice(160, 200)), _rows(data, slice(200, 240))
    mean, std = train.targets.mean(0), train.targets.std(0)
    for n_classes in (0, 3):
        obj = Objective(n_classes, mean, std)
        fit = fit_probe(train, val, obj, "sgd", [0.03, 0.3], [0.0], 30, 32)
        preds = predict(fit.head, test, obj)
        err = (preds["pred"] - test.targets).abs().mean() / test.targets.std()
        assert err < 0.1, err  # the targets are linear in the features: a good fit, in the targets' own units
        assert ("probs" in preds) == bool(n_classes)


def test_a_grid_without_val_is_refused_rather_than_chosen_on_test():
    data = _blobs()
    with pytest.raises(ConfigError, match="val split is empty"):
        fit_probe(data, FeatureSet(data.x[:0], data.y[:0]), Objective(3), "sgd", [0.1, 1.0], [0.0], 2, 32)
    single = fit_probe(data, FeatureSet(data.x[:0], data.y[:0]), Objective(3), "sgd", [0.1], [0.0], 2, 32)
    assert single.choice["lr"] == 0.1 and single.choice["val_loss"] is None


def test_probe_matches_logistic_regression_on_real_digit_features():
    """Protocol check on real images: a random-init ResNet-15's features of scikit-learn's digits (32 px). The
    probe fits on the train split minus its val share and chooses on val; scikit-learn fits all of train."""
    torch.manual_seed(0)
    digits = load_digits()
    x = F.interpolate(torch.from_numpy(digits.images.astype(np.float32) / 16)[:, None], size=32, mode="bilinear")
    backbone = build_backbone("resnet15", in_chans=1, image_size=32, small_stem=False).eval()
    with torch.no_grad():
        feats = torch.cat([backbone((x[i:i + 256] - 0.3) / 0.4) for i in range(0, len(x), 256)])
    y = torch.from_numpy(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=digits.target)
    fit_idx, val_idx = train_test_split(train, test_size=0.2, random_state=0, stratify=digits.target[train])
    reference = logistic_probe(feats[train].numpy(), y[train].numpy(), feats[test].numpy(), y[test].numpy())
    for solver in ("sgd", "lbfgs"):
        fit = fit_probe(FeatureSet(feats[fit_idx], y[fit_idx]), FeatureSet(feats[val_idx], y[val_idx]),
                        Objective(10), solver, epochs=100, batch_size=256, **GRID)
        acc = float((predict(fit.head, FeatureSet(feats[test], y[test]), Objective(10))["probs"].argmax(1)
                     == y[test]).float().mean())
        assert acc >= reference["accuracy"] - 0.01, (solver, acc, reference["accuracy"])
