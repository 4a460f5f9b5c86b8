"""training/squad.py: the official SQuAD v1.1 normalisation, exact match and F1, against values
computed by hand."""

from __future__ import annotations

import pytest

from training.squad import SquadExample, exact_match, f1_score, normalize_answer, squad_metrics


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The Denver Broncos", "denver broncos"),
        ("  denver\tbroncos.\n", "denver broncos"),
        ("An apple a day", "apple day"),
        ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("A.B.C.", "abc"),
        ("the U.S.-led effort", "usled effort"),  # punctuation is deleted, not split on
        ("Don't!", "dont"),
        ("THE  END", "end"),
        ("a the an", ""),
        ("1,000", "1000"),
    ],
)
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_exact_match() -> None:
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_hand_computed() -> None:
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert f1_score("the cat sat on the mat", "cat on a mat") == pytest.approx(6 / 7)
    # multiset overlap: pred x x y, gold x y y -> common {x, y} = 2, P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("Denver Broncos", "denver broncos!") == 1.0
    assert f1_score("nothing shared", "denver") == 0.0
    assert f1_score("", "denver") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to empty: v1.1 gives F1 0 (and EM 1)


def test_squad_metrics_max_over_references_and_missing() -> None:
    exs = [
        SquadExample(
            "q1",
            "t",
            "?",
            "c",
            ({"text": "Denver Broncos", "answer_start": 0}, {"text": "Broncos", "answer_start": 0}),
        ),
        SquadExample(
            "q2", "t", "?", "c", ({"text": "in 1542", "answer_start": 0}, {"text": "1542", "answer_start": 0})
        ),
        SquadExample("q3", "t", "?", "c", ({"text": "seven million square kilometres", "answer_start": 0},)),
        SquadExample("q4", "t", "?", "c", ({"text": "Peru", "answer_start": 0},)),
    ]
    preds = {
        "q1": "broncos",  # exact match with the second reference
        "q2": "1542 AD",  # F1 vs "1542": P = 1/2, R = 1 -> 2/3; vs "in 1542": P = 1/2, R = 1/2 -> 1/2
        "q3": "seven million",  # P = 1, R = 2/4 -> 2/3
        # q4 missing -> 0
    }
    m = squad_metrics(preds, exs)
    assert m["exact_match"] == pytest.approx(100 * 1 / 4)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 0) / 4)
    assert set(m) == {"exact_match", "f1"}


def test_squad_metrics_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        squad_metrics({}, [])
    with pytest.raises(ValueError, match="'q9' has no reference"):
        squad_metrics({"q9": "x"}, [SquadExample("q9", "t", "?", "c", ())])
