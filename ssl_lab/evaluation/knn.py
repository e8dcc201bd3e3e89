"""Weighted k-nearest-neighbour classification on embeddings (the InstDisc / DINO monitor of SSL features).

Each test sample votes over its k most cosine-similar training samples, each neighbour weighted by exp(sim / T):
a small T lets one very close neighbour outvote several far ones. Test rows are processed in chunks so the
similarity matrix never exceeds CHUNK_ROWS x N_train.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import ListConfig
from torch import Tensor

from ssl_lab.errors import ConfigError, DataError

CHUNK_ROWS = 1024


def _check(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise DataError(f"knn: features must be 2-D [N, D]; got train {tuple(train_feats.shape)}, "
                        f"test {tuple(test_feats.shape)}.")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise DataError(f"knn: train features have dimension {train_feats.shape[1]} but test features "
                        f"{test_feats.shape[1]}; embed both with the same backbone.")
    if train_labels.ndim != 1 or len(train_labels) != len(train_feats):
        raise DataError(f"knn: train_labels must be 1-D with one label per train row; got shape "
                        f"{tuple(train_labels.shape)} for {len(train_feats)} rows.")
    if len(train_feats) == 0:
        raise DataError("knn: no training samples to vote with.")


def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 20,
                temperature: float | None = 0.07, num_classes: int | None = None) -> Tensor:
    """Predicted label per test row. `temperature=None` gives an unweighted majority vote (ties: lowest label);
    k larger than the training set is clipped to it."""
    _check(train_feats, train_labels, test_feats)
    if k < 1:
        raise ConfigError(f"knn: k must be >= 1, got {k}.")
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"knn: temperature must be > 0 (or None for a majority vote), got {temperature}.")
    train_labels = train_labels.long().to(train_feats.device)
    if (train_labels < 0).any():
        raise DataError("knn: train labels must be class indices >= 0.")
    n_classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(train_labels.max()) >= n_classes:
        raise DataError(f"knn: train label {int(train_labels.max())} is out of range for num_classes={n_classes}.")
    k = min(k, len(train_feats))
    bank = torch.nn.functional.normalize(train_feats.float(), dim=1)
    out = []
    for start in range(0, len(test_feats), CHUNK_ROWS):
        query = torch.nn.functional.normalize(test_feats[start:start + CHUNK_ROWS].float().to(bank.device), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        weights = torch.ones_like(sim) if temperature is None else (sim / temperature).exp()
        votes = torch.zeros(len(query), n_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes.argmax(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.long, device=train_feats.device)
    return torch.cat(out)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float | None = 0.07, num_classes: int | None = None) -> float:
    """Fraction of test rows whose k-NN prediction equals their label."""
    if len(test_labels) != len(test_feats):
        raise DataError(f"knn: {len(test_labels)} test labels for {len(test_feats)} test rows.")
    if len(test_feats) == 0:
        raise DataError("knn: no test samples to score.")
    pred = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature, num_classes=num_classes)
    return float((pred.cpu() == test_labels.long().cpu()).float().mean())


def knn_ks(value: Any) -> list[int]:
    """`task.knn_k` as a list: a single k (`task.knn_k=20`) or several (`task.knn_k=[20,200]`, the usual reports)."""
    ks = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"task.knn_k={value!r} must be a positive integer or a list of them (e.g. [20,200]).")
    return sorted(set(ks))


def knn_report(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
               ks: Sequence[int], temperature: float = 0.07, num_classes: int | None = None) -> dict[str, Any]:
    """Weighted kNN accuracy for each k, as the literature reports it: {"k20": acc, "k200": acc, ...}, plus the
    temperature and, where the training set is smaller than a k, the k actually used (`clipped`)."""
    out: dict[str, Any] = {"temperature": temperature, "n_train": int(len(train_feats))}
    clipped = {}
    for k in ks:
        out[f"k{k}"] = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=k, temperature=temperature,
                                    num_classes=num_classes)
        if k > len(train_feats):
            clipped[f"k{k}"] = int(len(train_feats))
    if clipped:
        out["clipped"] = clipped
    return out
