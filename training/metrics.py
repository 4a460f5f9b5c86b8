"""GLUE metrics, hand-written so they are easy to check: accuracy, binary F1, Matthews
correlation, Pearson and Spearman correlation (average ranks for ties)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    _same_length(p, y)
    return float((p == y).mean())


def f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of the positive class (GLUE's MRPC/QQP convention); 0 when nothing is predicted."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    _same_length(p, y)
    tp = float((p & y).sum())
    denom = float(p.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation for binary labels; 0 when a row or column of the confusion matrix is empty."""
    p, y = np.asarray(preds).astype(bool), np.asarray(labels).astype(bool)
    _same_length(p, y)
    tp, tn = float((p & y).sum()), float((~p & ~y).sum())
    fp, fn = float((p & ~y).sum()), float((~p & y).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _same_length(a, b)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _same_length(a, b)
    return pearson(_ranks(a), _ranks(b))


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("no predictions to score")


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Every metric in ``names`` (keys of METRICS), rounded to 6 decimals."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {n: round(METRICS[n](preds, labels), 6) for n in names}
