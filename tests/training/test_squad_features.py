"""training/squad.py: loading SQuAD JSON and building sliding-window features, on real SQuAD
dev examples and the real MiniLM (BERT WordPiece) tokenizer; MPNet's when installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.hf import load_tokenizer
from training.squad import build_features, load_squad

DATA = Path(os.environ.get("DYNABERT_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
DEV = DATA / "squad" / "dev-v1.1.json"
needs_data = pytest.mark.skipif(not DEV.is_file(), reason=f"{DEV} not found")


@pytest.fixture(scope="module")
def dev50():
    return load_squad(DEV)[:50]


@pytest.fixture(scope="module")
def bert_tok(minilm_dir: Path):
    return load_tokenizer(minilm_dir)


def _answers(exs):
    return [list(e.answers) for e in exs]


@needs_data
def test_load_squad_reads_real_dev_file() -> None:
    exs = load_squad(DEV)
    assert len(exs) == 4961  # the README's count for this subset
    first = exs[0]
    assert first.title == "Super_Bowl_50"
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answer_texts[0] == "Denver Broncos"
    for e in exs[:200]:
        for a in e.answers:
            assert e.context[a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
    assert len({e.id for e in exs}) == len(exs)


def _write(tmp_path: Path, doc) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_load_squad_errors_name_file_and_location(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_squad(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_squad(_write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="'data' list"):
        load_squad(_write(tmp_path, {"version": "1.1"}))
    good_qa = {"id": "q0", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "Ann ran.", "qas": [good_qa, {"id": "q1"}]}]}]}
    with pytest.raises(ValueError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: .*'question'"):
        load_squad(_write(tmp_path, doc))
    bad_ans = dict(good_qa, answers=[{"text": "Ann", "answer_start": 99}])
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "Ann ran.", "qas": [bad_ans]}]}]}
    with pytest.raises(ValueError, match=r"qas\[0\]\.answers\[0\]: answer_start 99"):
        load_squad(_write(tmp_path, doc))
    doc = {"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[0\]: .*'context'"):
        load_squad(_write(tmp_path, doc))


def _check_windows(tok, exs, feats, max_length: int) -> None:
    """Every window fits; windows of an example cover every non-space context character; labels
    point at the answer in windows that hold it and at CLS (0) in windows that do not."""
    assert feats.num_examples == len(exs)
    assert sorted(set(feats.example_index)) == list(range(len(exs)))
    assert feats.example_index == sorted(feats.example_index)
    covered = [set() for _ in exs]
    found = [False] * len(exs)
    exact = labelled = 0
    for f, ex_i in enumerate(feats.example_index):
        ex = exs[ex_i]
        ids, offs = feats.input_ids[f], feats.offsets[f]
        assert len(ids) <= max_length and len(offs) == len(ids) == len(feats.attention_mask[f])
        assert offs[0] is None  # CLS / <s>
        assert ids[0] == tok.cls_token_id
        ctx = [t for t, o in enumerate(offs) if o is not None]
        assert ctx and ctx == list(range(ctx[0], ctx[-1] + 1))  # one contiguous block
        for t in ctx:
            covered[ex_i].update(range(*offs[t]))
        a = ex.answers[0]
        a_s, a_e = a["answer_start"], a["answer_start"] + len(a["text"])
        s, e = feats.start_positions[f], feats.end_positions[f]
        inside = offs[ctx[0]][0] <= a_s and offs[ctx[-1]][1] >= a_e
        if not inside:
            assert (s, e) == (0, 0)
            continue
        found[ex_i] = True
        labelled += 1
        assert ctx[0] <= s <= e <= ctx[-1]
        span = ex.context[offs[s][0] : offs[e][1]]
        assert a["text"] in span and len(span) - len(a["text"]) < 12
        token_aligned = any(o[0] == a_s for o in offs if o) and any(o[1] == a_e for o in offs if o)
        if token_aligned:
            assert span == a["text"]
            exact += 1
    for ex, cov in zip(exs, covered, strict=True):
        missing = [i for i, ch in enumerate(ex.context) if not ch.isspace() and i not in cov]
        assert not missing, f"{ex.id}: context chars {missing[:5]} in no window"
    assert all(found)
    assert exact >= 0.8 * labelled  # nearly every answer starts and ends on token boundaries


@needs_data
def test_bert_windows_cover_context_and_labels_match_answers(bert_tok, dev50) -> None:
    feats = build_features(
        bert_tok,
        [e.question for e in dev50],
        [e.context for e in dev50],
        max_length=96,
        doc_stride=32,
        answers=_answers(dev50),
    )
    assert len(feats) > 2 * len(dev50)  # short windows: most contexts need several
    _check_windows(bert_tok, dev50, feats, 96)
    # BERT: token types 0 for [CLS] question [SEP], 1 for the context window and its [SEP]
    for f in range(len(feats)):
        tt, offs = feats.token_type_ids[f], feats.offsets[f]
        first_ctx = next(t for t, o in enumerate(offs) if o is not None)
        assert set(tt[:first_ctx]) == {0} and set(tt[first_ctx:]) == {1}


@needs_data
def test_consecutive_windows_overlap_by_the_stride(bert_tok, dev50) -> None:
    feats = build_features(bert_tok, [dev50[0].question], [dev50[0].context], max_length=64, doc_stride=16)
    assert feats.start_positions is None and len(feats) >= 3
    for f in range(len(feats) - 1):
        a = [o for o in feats.offsets[f] if o]
        b = [o for o in feats.offsets[f + 1] if o]
        shared = [o for o in a if o in set(b)]
        assert len(shared) == 16, f"windows {f},{f + 1} share {len(shared)} tokens"


@needs_data
def test_full_length_windows_default_settings(bert_tok, dev50) -> None:
    feats = build_features(
        bert_tok, [e.question for e in dev50], [e.context for e in dev50], answers=_answers(dev50)
    )
    assert max(feats.lengths()) <= 384
    _check_windows(bert_tok, dev50, feats, 384)


def test_padded_tensors(bert_tok) -> None:
    feats = build_features(
        bert_tok,
        ["Who?", "What color is the sky over the sea?"],
        ["Ann.", "The sky is blue. " * 20],
        max_length=32,
        doc_stride=8,
        answers=[{"text": "Ann", "answer_start": 0}, {"text": "blue", "answer_start": 11}],
    )
    batch = feats.padded(pad_token_id=bert_tok.pad_token_id)
    T = max(feats.lengths())
    assert batch["input_ids"].shape == (len(feats), T) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum().item() == sum(feats.lengths())
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bert_tok.pad_token_id).all()
    assert batch["token_type_ids"].shape == (len(feats), T)
    assert batch["start_positions"].tolist() == feats.start_positions
    sub = feats.padded([0])
    assert sub["input_ids"].shape == (1, len(feats.input_ids[0]))
    assert bert_tok.decode(feats.input_ids[0][feats.start_positions[0] : feats.end_positions[0] + 1]) == "ann"


def test_long_question_and_short_window_do_not_fail(bert_tok) -> None:
    q = "why " * 200 + "?"
    feats = build_features(
        bert_tok, [q], ["The answer is forty two, said the computer."], max_length=48, doc_stride=32
    )
    assert len(feats) >= 1 and max(feats.lengths()) <= 48
    assert any(o is not None for o in feats.offsets[0])  # the context still gets room


def test_input_errors(bert_tok) -> None:
    with pytest.raises(ValueError, match="2 questions but 1 contexts"):
        build_features(bert_tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="max_length 3"):
        build_features(bert_tok, ["a"], ["c"], max_length=3)
    assert len(build_features(bert_tok, [], [])) == 0


@needs_data
def test_mpnet_tokenizer_without_token_types(dev50) -> None:
    from model.backbones import find_parts, mpnet_base_dir

    try:
        find_parts()
    except FileNotFoundError:
        pytest.skip("all-mpnet-base-v2 parts not installed")
    tok = load_tokenizer(mpnet_base_dir())
    exs = dev50[:20]
    feats = build_features(
        tok,
        [e.question for e in exs],
        [e.context for e in exs],
        max_length=96,
        doc_stride=32,
        answers=_answers(exs),
    )
    assert feats.token_type_ids is None and "token_type_ids" not in feats.padded()
    _check_windows(tok, exs, feats, 96)
