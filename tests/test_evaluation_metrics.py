"""Classification / regression metrics and the logistic probe, checked against values worked out by hand."""
from __future__ import annotations

import json

import pytest
import torch

from ssl_lab.errors import DataError
from ssl_lab.evaluation.metrics import classification_metrics, regression_metrics, to_probs
from ssl_lab.evaluation.probe import logistic_probe

# 6 samples, 3 classes. Confusion matrix (rows true, columns predicted):
#   true 0: [1, 1, 0]   true 1: [0, 2, 0]   true 2: [1, 0, 1]
# class 0: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
# class 1: TP 2, FP 1, FN 0 -> P 2/3, R 1,   F1 2*(2/3)/(5/3) = 4/5
# class 2: TP 1, FP 0, FN 1 -> P 1,   R 1/2, F1 2/3
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 2, 0])
NAMES = ["a", "b", "c"]


def _logits(preds: torch.Tensor, k: int = 3) -> torch.Tensor:
    return 3.0 * torch.nn.functional.one_hot(preds, k).float()  # not probabilities: must be softmaxed


def test_three_class_confusion_precision_recall_f1_by_hand():
    m = classification_metrics(_logits(PREDS), LABELS, NAMES)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    expected = {"a": (1 / 2, 1 / 2, 1 / 2, 2), "b": (2 / 3, 1.0, 4 / 5, 2), "c": (1.0, 1 / 2, 2 / 3, 2)}
    for name, (p, r, f1, support) in expected.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1))
        assert got["support"] == support
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    json.dumps(m, allow_nan=False)  # plain python, ready for metrics.json


def test_multiclass_auc_is_one_vs_rest_macro_by_hand():
    # Softmax of 3*one-hot gives the predicted class a high score and the two others an equal low one.
    # One-vs-rest, counting each (positive, negative) pair as 1 if ordered right and 1/2 if tied, over 2 x 4 pairs:
    # class a: positives {0 high, 1 low}, negatives {2,3,4 low, 5 high}: 3 + 0.5 + 1.5 + 0 = 5   -> 5/8
    # class b: positives {2,3 high}, negatives {0,4,5 low, 1 high}: each 3 + 0.5             -> 7/8
    # class c: positives {4 high, 5 low}, negatives {0..3 low}: 4 + 4 * 0.5                   -> 6/8
    m = classification_metrics(_logits(PREDS), LABELS, NAMES)
    assert [m["per_class"][n]["auc"] for n in NAMES] == pytest.approx([5 / 8, 7 / 8, 6 / 8])
    assert m["auc"] == pytest.approx((5 / 8 + 7 / 8 + 6 / 8) / 3)


def test_binary_auc_counts_correctly_ordered_pairs():
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    # positives 0.35, 0.8, 0.9 against negatives 0.1, 0.4, 0.7: 1 + 3 + 3 = 7 of 9 pairs in the right order
    probs = torch.stack([1 - p1, p1], dim=1)
    m = classification_metrics(probs, labels, ["neg", "pos"])
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["per_class"]["neg"]["auc"] == pytest.approx(7 / 9)
    # argmax at 0.5: predictions 0 0 0 1 1 1 -> 4 of 6 right
    assert m["accuracy"] == pytest.approx(4 / 6)
    # the same numbers when the scores are logits instead of probabilities (softmax is monotone in p1)
    logits = torch.stack([torch.zeros(6), torch.logit(p1)], dim=1)
    assert classification_metrics(logits, labels, ["neg", "pos"])["auc"] == pytest.approx(7 / 9)


def test_probabilities_pass_through_and_logits_are_softmaxed():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    torch.testing.assert_close(to_probs(probs), probs)
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    torch.testing.assert_close(to_probs(logits), logits.softmax(dim=1))


def test_auc_averages_over_the_classes_present():
    # class c never occurs: it has no one-vs-rest AUC. Scores for a: 0.7 0.2 | 0.5 0.1 (positives | negatives):
    # 2 + 1 = 3 of 4 pairs -> 3/4. Scores for b: 0.2 0.3 | 0.4 0.8 (negatives | positives): 4 of 4 -> 1.
    a, b = torch.tensor([0.7, 0.2, 0.5, 0.1]), torch.tensor([0.2, 0.3, 0.4, 0.8])
    probs = torch.stack([a, b, 1 - a - b], dim=1)
    m = classification_metrics(probs, torch.tensor([0, 0, 1, 1]), NAMES)
    assert m["per_class"]["a"]["auc"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"]["auc"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["auc"] is None
    assert m["auc"] == pytest.approx((3 / 4 + 1) / 2)


def test_auc_is_none_when_only_one_class_is_present():
    m = classification_metrics(_logits(torch.tensor([0, 1])), torch.tensor([0, 0]), NAMES)
    assert m["auc"] is None
    assert m["accuracy"] == pytest.approx(0.5)


def test_bad_classification_inputs_are_named():
    with pytest.raises(DataError, match="3 columns but 2 class names"):
        classification_metrics(_logits(PREDS), LABELS, ["a", "b"])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\]"):
        classification_metrics(_logits(PREDS), torch.tensor([0, 0, 1, 1, 2, 3]), NAMES)
    with pytest.raises(DataError, match="NaN"):
        classification_metrics(torch.full((6, 3), float("nan")), LABELS, NAMES)


def test_regression_metrics_by_hand():
    # target x: true 1 2 4, pred 1 3 3 -> errors 0 1 -1: MSE 2/3, MAE 2/3;
    #   mean 7/3, SS_tot (16 + 1 + 25)/9 = 42/9, SS_res 2 -> R2 = 1 - 18/42 = 4/7
    # target y: true 1 2 3, pred 0 0 0 -> MSE 14/3, MAE 2, SS_tot 2, SS_res 14 -> R2 = -6
    true = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 3.0]])
    pred = torch.tensor([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    m = regression_metrics(pred, true, ["x", "y"])
    assert m["x"] == pytest.approx({"mse": 2 / 3, "mae": 2 / 3, "r2": 4 / 7})
    assert m["y"] == pytest.approx({"mse": 14 / 3, "mae": 2.0, "r2": -6.0})
    json.dumps(m, allow_nan=False)


def test_regression_r2_undefined_for_constant_target_and_shapes_checked():
    m = regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), ["m"])  # 1-D = one target
    assert m["m"] == {"mse": pytest.approx(0.5), "mae": pytest.approx(0.5), "r2": None}
    with pytest.raises(DataError, match="2 target columns but 1 target names"):
        regression_metrics(torch.zeros(3, 2), torch.zeros(3, 2), ["m"])
    with pytest.raises(DataError, match="same \\[N, T\\] shape"):
        regression_metrics(torch.zeros(3, 2), torch.zeros(4, 2), ["a", "b"])


def test_logistic_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    y_train, y_test = torch.arange(3).repeat(20), torch.arange(3).repeat(10)
    x_train = centres[y_train] + 0.3 * torch.randn(60, 3, generator=g)
    x_test = centres[y_test] + 0.3 * torch.randn(30, 3, generator=g)
    res = logistic_probe(x_train, y_train, x_test, y_test)
    assert res == {"accuracy": 1.0, "f1_macro": 1.0, "n_train": 60, "n_test": 30}
    # labels unrelated to the features: the probe cannot do better than chance on a balanced test set
    shuffled = logistic_probe(x_train, y_train, x_test, y_test[torch.randperm(30, generator=g)])
    assert shuffled["accuracy"] < 0.7


def test_logistic_probe_refuses_a_single_class():
    with pytest.raises(DataError, match="single class"):
        logistic_probe(torch.randn(4, 2), torch.zeros(4), torch.randn(2, 2), torch.zeros(2))
