"""training/squad.py: span decoding from start/end logits across windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.hf import load_tokenizer
from training.squad import Answer, build_features, decode_spans

CONTEXT = (
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other "
    "river on Earth. Its basin covers about seven million square kilometres. The first European to "
    "travel its length was Francisco de Orellana in 1542. Today the river is crossed by no bridge "
    "along its entire course, and ferries link the towns on either bank."
)


@pytest.fixture(scope="module")
def tok(minilm_dir: Path):
    return load_tokenizer(minilm_dir)


def _token_span(feats, f: int, text: str, context: str) -> tuple[int, int]:
    s_char = context.index(text)
    e_char = s_char + len(text)
    offs = feats.offsets[f]
    s = next(t for t, o in enumerate(offs) if o and o[0] == s_char)
    e = next(t for t, o in enumerate(offs) if o and o[1] == e_char)
    return s, e


def _window_holding(feats, text: str, context: str) -> int:
    s_char = context.index(text)
    for f in range(len(feats)):
        ctx = [o for o in feats.offsets[f] if o]
        if ctx[0][0] <= s_char and ctx[-1][1] >= s_char + len(text) and f > 0:
            return f
    raise AssertionError("no later window holds the text")


def test_picks_the_planted_span_in_a_later_window(tok) -> None:
    feats = build_features(tok, ["Who first travelled the Amazon?"], [CONTEXT], max_length=48, doc_stride=16)
    assert len(feats) >= 3
    target = "Francisco de Orellana"
    f = _window_holding(feats, target, CONTEXT)
    s, e = _token_span(feats, f, target, CONTEXT)
    T = max(feats.lengths())
    rng = np.random.default_rng(0)
    start = rng.normal(size=(len(feats), T)).astype(np.float32)
    end = rng.normal(size=(len(feats), T)).astype(np.float32)
    start[f, s] += 8.0
    end[f, e] += 8.0
    (ans,) = decode_spans(torch.from_numpy(start), torch.from_numpy(end), feats, [CONTEXT])
    assert ans.text == target
    assert CONTEXT[ans.start_char : ans.end_char] == target
    assert 0.5 < ans.score <= 1.0
    assert ans.logit == pytest.approx(float(start[f, s] + end[f, e]), rel=1e-5)


def test_invalid_spans_are_never_chosen(tok) -> None:
    feats = build_features(tok, ["How big is the basin?"], [CONTEXT], max_length=64, doc_stride=16)
    T = max(feats.lengths())
    start = np.zeros((len(feats), T), np.float32)
    end = np.zeros((len(feats), T), np.float32)
    # huge logits on the question tokens and CLS: outside the context, must be ignored
    for f in range(len(feats)):
        for t, o in enumerate(feats.offsets[f]):
            if o is None:
                start[f, t] = end[f, t] = 100.0
    f = 0
    s, _ = _token_span(feats, f, "Amazon", CONTEXT)
    _, far_e = _token_span(feats, f, "Peru", CONTEXT)
    late, _ = _token_span(feats, f, "Colombia", CONTEXT)
    _, early = _token_span(feats, f, "The", CONTEXT)
    # the best start lies after the best end: (Colombia, The) scores 100 but end < start
    start[f, late], end[f, early] = 50.0, 50.0
    # the best valid pair: start at "Amazon", end at "Peru" (80)
    start[f, s], end[f, far_e] = 40.0, 40.0
    (ans,) = decode_spans(start, end, feats, [CONTEXT])
    assert ans.text == CONTEXT[CONTEXT.index("Amazon") : CONTEXT.index("Peru") + 4]
    # the same span with max_answer_length shorter than it: something else, but never end < start
    n_tokens = far_e - s + 1
    (short,) = decode_spans(start, end, feats, [CONTEXT], max_answer_length=n_tokens - 1)
    assert short.text != ans.text and short.start_char <= short.end_char
    assert len(tok.tokenize(short.text)) <= n_tokens - 1


def test_several_examples_rows_and_padding(tok) -> None:
    contexts = [CONTEXT, "Paris is the capital of France.", "No answer here at all."]
    questions = ["Which river?", "Capital of France?", "?"]
    feats = build_features(tok, questions, contexts, max_length=48, doc_stride=16)
    batch = feats.padded(pad_token_id=tok.pad_token_id)
    T = batch["input_ids"].shape[1]
    start = torch.zeros(len(feats), T)
    end = torch.zeros(len(feats), T)
    f1 = feats.example_index.index(1)
    s, e = _token_span(feats, f1, "Paris", contexts[1])
    start[f1, s], end[f1, e] = 5.0, 5.0
    # padded positions get large logits: beyond a window's length they must be ignored
    mask = batch["attention_mask"] == 0
    start[mask], end[mask] = 99.0, 99.0
    answers = decode_spans(start, end, feats, contexts)
    assert len(answers) == 3 and all(isinstance(a, Answer) for a in answers)
    assert answers[1].text == "Paris"
    for a, c in zip(answers, contexts, strict=True):
        assert c[a.start_char : a.end_char] == a.text
    # the same as a list of unpadded rows
    rows_s = [start[f, : len(feats.input_ids[f])].numpy() for f in range(len(feats))]
    rows_e = [end[f, : len(feats.input_ids[f])].numpy() for f in range(len(feats))]
    assert decode_spans(rows_s, rows_e, feats, contexts) == answers


def test_scores_are_a_distribution_over_the_n_best(tok) -> None:
    feats = build_features(tok, ["q"], ["alpha beta gamma delta"], max_length=32)
    T = len(feats.input_ids[0])
    flat = np.zeros((1, T), np.float32)
    (ans,) = decode_spans(flat, flat, feats, ["alpha beta gamma delta"], n_best=20, max_answer_length=30)
    # 4 single-token words -> 10 valid spans, all tied: the winner gets 1/10
    assert ans.score == pytest.approx(0.1)
    (ans1,) = decode_spans(flat, flat, feats, ["alpha beta gamma delta"], n_best=1)
    assert ans1.score == pytest.approx(1.0)


def test_decode_errors(tok) -> None:
    feats = build_features(tok, ["q"], ["some context"], max_length=32)
    T = len(feats.input_ids[0])
    with pytest.raises(ValueError, match="2 rows of logits for 1 feature windows"):
        decode_spans(np.zeros((2, T)), np.zeros((2, T)), feats, ["some context"])
    with pytest.raises(ValueError, match="n_best"):
        decode_spans(np.zeros((1, T)), np.zeros((1, T)), feats, ["some context"], n_best=0)


def test_real_tiny_qa_checkpoint_end_to_end(tiny_qa_checkpoint: Path) -> None:
    """Features -> a real (tiny, random) QA model -> decoded spans that lie in the context."""
    ckpt = load_checkpoint(tiny_qa_checkpoint)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    contexts = [CONTEXT, "Short context about cats and dogs."]
    feats = build_features(tok, ["Who?", "Which animals?"], contexts, max_length=64, doc_stride=16)
    batch = feats.padded(pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        logits = model(
            batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), width=0.5, depth=0.5
        ).logits  # (B, T, 2)
    answers = decode_spans(logits[..., 0], logits[..., 1], feats, contexts, max_answer_length=10)
    for a, c in zip(answers, contexts, strict=True):
        assert a.text and c[a.start_char : a.end_char] == a.text
        assert len(tok.tokenize(a.text)) <= 10
        assert 0.0 < a.score <= 1.0


def test_matches_exhaustive_search_on_random_logits(tok) -> None:
    """With n_best covering every token, the decoded span is the best valid pair over all windows."""
    contexts = [CONTEXT, "Paris is the capital of France and its largest city by far."]
    feats = build_features(tok, ["Which river?", "What is Paris?"], contexts, max_length=40, doc_stride=12)
    T = max(feats.lengths())
    rng = np.random.default_rng(3)
    start = rng.normal(size=(len(feats), T)).astype(np.float32)
    end = rng.normal(size=(len(feats), T)).astype(np.float32)
    max_len = 4
    got = decode_spans(start, end, feats, contexts, n_best=T, max_answer_length=max_len)
    for ex, c in enumerate(contexts):
        best, best_span = -np.inf, None
        for f in range(len(feats)):
            if feats.example_index[f] != ex:
                continue
            offs = feats.offsets[f]
            for s in range(len(offs)):
                for e in range(s, min(s + max_len, len(offs))):
                    if offs[s] and offs[e] and start[f, s] + end[f, e] > best:
                        best, best_span = start[f, s] + end[f, e], (offs[s][0], offs[e][1])
        assert (got[ex].start_char, got[ex].end_char) == best_span
        assert got[ex].logit == pytest.approx(float(best), rel=1e-5)
        assert got[ex].text == c[best_span[0] : best_span[1]]
