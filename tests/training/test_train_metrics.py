"""Metrics against values computed by hand on small cases."""

from __future__ import annotations

import math

import pytest

from training import metrics as M


def test_accuracy_and_f1_by_hand():
    preds, labels = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert M.accuracy(preds, labels) == pytest.approx(3 / 5)
    # tp = 2, fp = 1, fn = 1 -> precision 2/3, recall 2/3, F1 2/3
    assert M.f1(preds, labels) == pytest.approx(2 / 3)
    assert M.f1([0, 0], [0, 0]) == 0.0  # nothing predicted positive, nothing positive


def test_matthews_by_hand():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews(preds, labels) == pytest.approx(expected) == pytest.approx(1 / 3)
    assert M.matthews([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert M.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction has no correlation


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    # means 2.5 and 5; deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4): cov 11, var 5 and 26
    assert M.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert M.spearman(x, y) == pytest.approx(1.0)  # monotone
    # ties take the average rank: y ranks (1, 2.5, 2.5, 4)
    assert M.spearman([1, 2, 3, 4], [1, 5, 5, 7]) == pytest.approx(M.pearson([1, 2, 3, 4], [1, 2.5, 2.5, 4]))
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_compute_rejects_bad_input():
    assert M.compute(["accuracy", "f1"], [1, 0], [1, 1]) == {
        "accuracy": 0.5,
        "f1": pytest.approx(2 / 3, abs=1e-6),
    }
    with pytest.raises(ValueError, match="bleu"):
        M.compute(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="3 vs 2"):
        M.accuracy([1, 0, 1], [1, 0])
