"""2-D embeddings of features for plots (PCA, t-SNE, optional UMAP) and k-means agreement with the labels."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ssl_lab.errors import ConfigError, DataError

METHODS = ("pca", "tsne", "umap")


def _np2d(feats: Any) -> np.ndarray:
    x = feats.detach().float().cpu().numpy() if hasattr(feats, "detach") else np.asarray(feats, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"expected features of shape [N >= 2, D], got {x.shape}.")
    if not np.isfinite(x).all():
        raise DataError("features contain NaN or inf.")
    return x


def embed_2d(feats, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, 2] coordinates. t-SNE's perplexity is capped below N so small test sets work."""
    x = _np2d(feats)
    if x.shape[1] < 2:
        x = np.concatenate([x, np.zeros_like(x)], axis=1)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap  # noqa: PLC0415 (optional dependency)
        except ImportError:
            raise ConfigError("embedding method 'umap' needs the umap-learn package: pip install umap-learn "
                              "(or choose method=pca or tsne).") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ConfigError(f"unknown embedding method {method!r}; choose one of {', '.join(METHODS)}.")


def kmeans_scores(feats, labels, n_clusters: int, seed: int = 0) -> dict[str, float]:
    """Cluster the features with k-means and score the clusters against the labels: adjusted Rand index (0 for
    chance, 1 for identical partitions) and normalised mutual information."""
    x = _np2d(feats)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    y = y.reshape(-1)
    if len(y) != len(x):
        raise DataError(f"kmeans_scores: {len(y)} labels for {len(x)} feature rows.")
    if not 1 <= n_clusters <= len(x):
        raise ConfigError(f"kmeans_scores: n_clusters must be in [1, {len(x)}] (the sample count), got {n_clusters}.")
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    return {"ari": float(adjusted_rand_score(y, clusters)), "nmi": float(normalized_mutual_info_score(y, clusters))}


def plot_embedding(xy: np.ndarray, labels, class_names: Sequence[str] | None, title: str, path) -> Path:
    """Scatter of a 2-D embedding, one colour per class (labels=None: one colour)."""
    from ssl_lab.evaluation.plots import plt, save_figure as save

    xy = np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(f"plot_embedding: expected [N, 2] coordinates, got {xy.shape}.")
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.7)
    else:
        y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        y = y.reshape(-1)
        names = list(class_names) if class_names is not None else [str(c) for c in range(int(y.max()) + 1)]
        for c in np.unique(y):
            sel = y == c
            name = names[int(c)] if 0 <= int(c) < len(names) else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, label=name)
        ax.legend(markerscale=2, fontsize=8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return save(fig, path)
