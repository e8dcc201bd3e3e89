"""k-NN voting, 2-D embeddings, k-means scores and the plots (real PNG files)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from ssl_lab.errors import ConfigError, DataError
from ssl_lab.evaluation import knn
from ssl_lab.evaluation.embed import embed_2d, kmeans_scores, plot_embedding
from ssl_lab.evaluation.knn import knn_accuracy, knn_predict
from ssl_lab.evaluation.plots import (plot_confusion, plot_curves, plot_pred_vs_true, plot_roc,
                                      read_epoch_curves)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def blobs(n_per: int = 20, seed: int = 0, dim: int = 4, spread: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:2] * 5 + torch.tensor([1.0] * dim)  # two well separated directions
    y = torch.arange(2).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_two_clusters_obvious_answer():
    train = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [0.1, 1.0], [-0.1, 1.0], [0.0, 0.9]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = torch.tensor([[5.0, 0.2], [0.3, 7.0], [1.0, 0.0]])  # scale does not matter: cosine similarity
    assert knn_predict(train, labels, test, k=3).tolist() == [0, 1, 0]
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), k=3) == pytest.approx(2 / 3)


def test_temperature_weighting_overrules_the_majority():
    # The query (1, 0) has one class-0 neighbour at cosine similarity 1 and two class-1 neighbours at 60 degrees
    # (similarity 1/2). Majority of k=3: class 1 (2 votes to 1).
    # T = 0.1: class 0 gets exp(1/0.1) = e^10 ~ 22026, class 1 gets 2 exp(0.5/0.1) = 2 e^5 ~ 297 -> class 0.
    # T = 10:  class 0 gets exp(0.1) ~ 1.105,           class 1 gets 2 exp(0.05) ~ 2.103        -> class 1.
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    train = torch.tensor([[3.0, 0.0], [c, s], [c, -s]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, k=3, temperature=None).item() == 1
    assert knn_predict(train, labels, query, k=3, temperature=0.1).item() == 0
    assert knn_predict(train, labels, query, k=3, temperature=10.0).item() == 1
    # k larger than the training set is clipped; k=1 is the nearest neighbour alone
    assert knn_predict(train, labels, query, k=50, temperature=None).item() == 1
    assert knn_predict(train, labels, query, k=1).item() == 0


def test_knn_chunking_gives_the_same_answer(monkeypatch):
    x, y = blobs(30, dim=8, spread=2.0)
    full = knn_predict(x[::2], y[::2], x[1::2], k=5)
    monkeypatch.setattr(knn, "CHUNK_ROWS", 4)
    torch.testing.assert_close(knn_predict(x[::2], y[::2], x[1::2], k=5), full)
    assert knn_predict(x[::2], y[::2], x[1::2], k=5, num_classes=4).max() <= 1  # extra empty classes never win


def test_knn_bad_inputs_are_named():
    with pytest.raises(DataError, match="dimension 2 but test features 3"):
        knn_predict(torch.zeros(4, 2), torch.zeros(4), torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        knn_predict(torch.ones(4, 2), torch.zeros(4), torch.ones(1, 2), temperature=0)
    with pytest.raises(DataError, match="out of range for num_classes=2"):
        knn_predict(torch.ones(3, 2), torch.tensor([0, 1, 2]), torch.ones(1, 2), num_classes=2)


def test_pca_embedding_shape_and_main_axis():
    t = torch.linspace(-1, 1, 30)[:, None]
    feats = torch.cat([t, t, torch.zeros(30, 3)], dim=1) + 1e-3 * torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    xy = embed_2d(feats, "pca", seed=0)
    assert xy.shape == (30, 2)
    assert np.abs(xy[:, 0]).max() > 100 * np.abs(xy[:, 1]).max()  # the data lie on a line: all on axis 1
    assert embed_2d(feats, "tsne", seed=0).shape == (30, 2)


def test_umap_without_umap_learn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed (it is optional)
    with pytest.raises(ConfigError, match="needs the umap-learn package: pip install umap-learn"):
        embed_2d(torch.randn(10, 3), "umap")
    with pytest.raises(ConfigError, match="unknown embedding method 'lle'"):
        embed_2d(torch.randn(10, 3), "lle")


def test_kmeans_recovers_well_separated_blobs():
    x, y = blobs(25)
    scores = kmeans_scores(x, y, n_clusters=2, seed=0)
    assert scores == pytest.approx({"ari": 1.0, "nmi": 1.0})
    # labels unrelated to the geometry: agreement near chance
    g = torch.Generator().manual_seed(1)
    noise = kmeans_scores(torch.randn(60, 4, generator=g), torch.arange(2).repeat(30), n_clusters=2, seed=0)
    assert noise["ari"] < 0.2
    with pytest.raises(ConfigError, match="n_clusters"):
        kmeans_scores(x, y, n_clusters=0)


def test_plots_write_png_files(tmp_path):
    x, y = blobs(20)
    assert_png(plot_embedding(embed_2d(x, "pca"), y, ["lens", "no lens"], "pca", tmp_path / "emb.png"))
    assert_png(plot_confusion([[5, 1], [2, 7]], ["a", "b"], tmp_path / "cm.png"))
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    assert_png(plot_roc(torch.stack([1 - p1, p1], 1), torch.tensor([0, 0, 1, 1, 0, 1]), ["n", "p"], tmp_path / "roc.png"))
    assert_png(plot_roc(torch.randn(12, 3), torch.arange(3).repeat(4), ["a", "b", "c"], tmp_path / "roc3.png"))
    true = torch.randn(30, 2)
    assert_png(plot_pred_vs_true(true + 0.1, true, ["mass", "ellipticity"], tmp_path / "pvt.png"))
    with pytest.raises(DataError, match="does not match 3 class names"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "bad.png")


def _write_csv(path, rows):
    cols = ["epoch", "step", "train/loss_step", "train/loss_epoch", "val/loss", "val/acc", "lr-Adam"]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_curves_concatenate_versions_and_plot(tmp_path):
    v0 = tmp_path / "logs/version_0/metrics.csv"
    v1 = tmp_path / "logs/version_1/metrics.csv"
    _write_csv(v0, [
        {"epoch": 0, "step": 0, "train/loss_step": 3.0, "lr-Adam": 0.1},
        {"epoch": 0, "step": 1, "train/loss_step": 2.0},
        {"epoch": 0, "step": 1, "val/loss": 2.5, "val/acc": 0.4},
        {"epoch": 0, "step": 1, "train/loss_epoch": 2.5},
        {"epoch": 1, "step": 3, "val/loss": 9.0, "val/acc": 0.1},  # the stopped run's epoch 1, redone after resume
    ])
    _write_csv(v1, [
        {"epoch": 1, "step": 3, "val/loss": 1.5, "val/acc": 0.6},
        {"epoch": 1, "step": 3, "train/loss_epoch": 1.8},
        {"epoch": 2, "step": 5, "val/loss": 1.0, "val/acc": 0.8},
    ])
    curves = read_epoch_curves([v1, v0])  # read in version order whatever the order given
    assert curves["val/loss"] == {0: 2.5, 1: 1.5, 2: 1.0}  # version_1 replaces epoch 1
    assert curves["train/loss_epoch"] == {0: 2.5, 1: 1.8}
    assert "train/loss_step" not in curves  # the epoch column exists
    assert_png(plot_curves([v0, v1], tmp_path / "curves.png"))
    with pytest.raises(DataError, match="does not exist"):
        plot_curves([tmp_path / "missing.csv"], tmp_path / "x.png")
