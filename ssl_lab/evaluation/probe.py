"""Logistic-regression probe on frozen features: a cheap, training-free-of-the-encoder measure of linear
separability (features standardised first, so the default L2 penalty treats every dimension alike)."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl_lab.errors import DataError


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def logistic_probe(train_feats, train_labels, test_feats, test_labels, max_iter: int = 1000) -> dict[str, Any]:
    """Fit on train features, score on test: {accuracy, f1_macro, n_train, n_test}."""
    xtr, ytr, xte, yte = _np(train_feats), _np(train_labels).reshape(-1), _np(test_feats), _np(test_labels).reshape(-1)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise DataError(f"logistic_probe: features must be [N, D] with the same D; got {xtr.shape} and {xte.shape}.")
    if len(ytr) != len(xtr) or len(yte) != len(xte) or len(xte) == 0:
        raise DataError("logistic_probe: need one label per feature row and at least one test row.")
    if len(np.unique(ytr)) < 2:
        raise DataError("logistic_probe: the training labels hold a single class; a classifier needs at least two "
                        "(raise dataset.label_fraction or check the labels).")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    model.fit(xtr.astype(np.float64), ytr)
    pred = model.predict(xte.astype(np.float64))
    return {"accuracy": float(accuracy_score(yte, pred)),
            "f1_macro": float(f1_score(yte, pred, average="macro", zero_division=0)),
            "n_train": int(len(xtr)), "n_test": int(len(xte))}
