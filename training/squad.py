"""Extractive question answering (SQuAD v1.1): loading, sliding-window features, span decoding
and the official evaluation.

Used by training (features with start/end labels, evaluation of every sub-network) and by the
service at request time (features without labels, :func:`decode_spans`), so it imports
nothing heavy at module level beyond numpy.

* Windows follow the usual recipe for BERT on SQuAD (Devlin et al. 2019, as in Hugging Face's
  ``run_qa.py``): ``[CLS] question [SEP] context-window [SEP]``, the context cut into windows of
  at most ``max_length`` tokens that overlap by ``doc_stride`` tokens (the fast tokenizer's
  ``stride``). A window that does not contain the whole answer is labelled with the CLS index 0.
* Decoding scores every start/end pair among the ``n_best`` best starts and ends of each window
  (start <= end, at most ``max_answer_length`` tokens, both inside the context) and keeps the best
  over all windows of an example.
* Metrics implement the published SQuAD v1.1 definition (Rajpurkar et al. 2016): answers are
  normalised (lowercase, no punctuation, no articles, single spaces); exact match and token F1
  take the max over the reference answers; both are reported in percent.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Offset = tuple[int, int] | None  # character span of a context token in its context; None otherwise


# ---- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquadExample:
    """One question about one paragraph. ``answers`` are the reference answers
    (``{"text": str, "answer_start": int}``), several for dev, one for train, none for test."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[dict[str, Any], ...] = ()

    @property
    def answer_texts(self) -> list[str]:
        return [a["text"] for a in self.answers]


def load_squad(path: str | Path) -> list[SquadExample]:
    """Read a SQuAD v1.1 JSON file (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``).

    Raises FileNotFoundError for a missing file and ValueError naming the file and the
    article/paragraph/question index for anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SQuAD file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'data' list (SQuAD v1.1 format)")

    out: list[SquadExample] = []
    for a, article in enumerate(doc["data"]):
        where_a = f"{path}: data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{where_a}: expected an object with a 'paragraphs' list")
        title = str(article.get("title", ""))
        for p, para in enumerate(article["paragraphs"]):
            where_p = f"{where_a}.paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise ValueError(f"{where_p}: expected an object with a string 'context'")
            if not isinstance(para.get("qas"), list):
                raise ValueError(f"{where_p}: expected a 'qas' list")
            context = para["context"]
            for q, qa in enumerate(para["qas"]):
                where_q = f"{where_p}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise ValueError(f"{where_q}: expected an object, got {type(qa).__name__}")
                for key in ("id", "question"):
                    if not isinstance(qa.get(key), str):
                        raise ValueError(f"{where_q}: missing or non-string {key!r}: {qa.get(key)!r}")
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise ValueError(f"{where_q}: 'answers' must be a list, got {answers!r}")
                clean = []
                for i, ans in enumerate(answers):
                    if (
                        not isinstance(ans, dict)
                        or not isinstance(ans.get("text"), str)
                        or not isinstance(ans.get("answer_start"), int)
                        or isinstance(ans.get("answer_start"), bool)
                    ):
                        raise ValueError(
                            f"{where_q}.answers[{i}]: expected {{'text': str, 'answer_start': int}}, got {ans!r}"
                        )
                    if not 0 <= ans["answer_start"] <= len(context) - len(ans["text"]):
                        raise ValueError(
                            f"{where_q}.answers[{i}]: answer_start {ans['answer_start']} with text "
                            f"{ans['text']!r} lies outside the context ({len(context)} chars)"
                        )
                    clean.append({"text": ans["text"], "answer_start": ans["answer_start"]})
                out.append(SquadExample(qa["id"], title, qa["question"], context, tuple(clean)))
    return out


# ---- features ------------------------------------------------------------------------------


@dataclass
class QAFeatures:
    """Model inputs for a batch of (question, context) pairs, one row per window.

    Lists of lists of unpadded token ids (windows can differ in length); :meth:`padded` turns a
    selection into tensors. ``token_type_ids`` is None for tokenizers without token types
    (RoBERTa, MPNet). ``offsets[f][t]`` is the (start, end) character span of token t in its
    example's context, or None for question, special and padding tokens. ``start_positions`` /
    ``end_positions`` are set only when answers were given (0 = CLS: answer not in this window).
    """

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    example_index: list[int]
    offsets: list[list[Offset]]
    start_positions: list[int] | None = None
    end_positions: list[int] | None = None
    num_examples: int = 0
    _context_arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def padded(self, indices: Sequence[int] | None = None, pad_token_id: int = 0) -> dict[str, Any]:
        """Tensors for the given windows (all by default), right-padded to the longest of them:
        input_ids, attention_mask, token_type_ids (when the tokenizer has them) and
        start_positions / end_positions (when labelled)."""
        import torch

        idx = list(range(len(self))) if indices is None else list(indices)
        T = max((len(self.input_ids[i]) for i in idx), default=0)

        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long)

        out: dict[str, Any] = {
            "input_ids": pad([self.input_ids[i] for i in idx], pad_token_id),
            "attention_mask": pad([self.attention_mask[i] for i in idx], 0),
        }
        if self.token_type_ids is not None:
            out["token_type_ids"] = pad([self.token_type_ids[i] for i in idx], 0)
        if self.start_positions is not None and self.end_positions is not None:
            out["start_positions"] = torch.tensor([self.start_positions[i] for i in idx], dtype=torch.long)
            out["end_positions"] = torch.tensor([self.end_positions[i] for i in idx], dtype=torch.long)
        return out

    def context_arrays(self, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(is_context bool (T,), char starts (T,), char ends (T,)) of window f, cached."""
        cached = self._context_arrays.get(f)
        if cached is None:
            offs = self.offsets[f]
            mask = np.array([o is not None for o in offs], dtype=bool)
            starts = np.array([o[0] if o is not None else -1 for o in offs], dtype=np.int64)
            ends = np.array([o[1] if o is not None else -1 for o in offs], dtype=np.int64)
            cached = self._context_arrays[f] = (mask, starts, ends)
        return cached


def _first_answer(ans: Any, i: int) -> dict[str, Any] | None:
    """An example's training answer: a dict, or the first of a list (None when there is none)."""
    if ans is None:
        return None
    if isinstance(ans, Mapping):
        return dict(ans)
    if isinstance(ans, Sequence) and not isinstance(ans, str):
        return dict(ans[0]) if len(ans) else None
    raise TypeError(f"answers[{i}] must be a dict or a list of dicts, got {ans!r}")


def _truncate_questions(
    tokenizer: Any, questions: list[str], max_query_length: int
) -> tuple[list[str], list[int]]:
    """Cut questions to at most ``max_query_length`` tokens (at a token boundary); also return
    their token counts."""
    offs = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, lens = [], []
    for q, o in zip(questions, offs, strict=True):
        if len(o) > max_query_length:
            q = q[: o[max_query_length - 1][1]]
        out.append(q)
        lens.append(min(len(o), max_query_length))
    return out, lens


def build_features(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int = 384,
    doc_stride: int = 128,
    answers: Sequence[Any] | None = None,
    max_query_length: int = 64,
) -> QAFeatures:
    """Tokenise (question, context) pairs into overlapping windows of at most ``max_length`` tokens.

    ``tokenizer`` is a Hugging Face *fast* tokenizer (offsets are needed). ``doc_stride`` is the
    number of context tokens consecutive windows share (the tokenizer's ``stride``); it is reduced
    when a long question leaves too little room. Questions longer than ``max_query_length``
    tokens are cut. ``answers``, when given, holds per example a ``{"text", "answer_start"}``
    dict (or a list of them: the first is used) and yields start/end token labels.
    """
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"build_features needs a fast tokenizer (offsets), got {type(tokenizer).__name__}")
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    if max_length < n_special + 2:
        raise ValueError(f"max_length {max_length} is too small for a question and a context window")
    if doc_stride < 0:
        raise ValueError(f"doc_stride must be >= 0, got {doc_stride}")
    if not questions:
        return QAFeatures([], [], None, [], [], [] if answers is not None else None, None, 0)
    max_query_length = max(1, min(max_query_length, (max_length - n_special) // 2))

    # RoBERTa-style BPE tokenisers keep leading spaces as tokens; they only waste the window.
    qs, q_lens = _truncate_questions(tokenizer, [q.lstrip() for q in questions], max_query_length)
    room = max_length - n_special - max(q_lens)  # context tokens per window, at worst
    stride = min(doc_stride, max(0, room // 2))
    if stride < doc_stride:
        log.debug("doc_stride %d reduced to %d for a %d-token question", doc_stride, stride, max(q_lens))

    enc = tokenizer(
        qs,
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    sample_map: list[int] = list(enc["overflow_to_sample_mapping"])
    # BERT uses token types; RoBERTa and MPNet do not list them among their inputs
    has_types = "token_type_ids" in enc and "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    offsets: list[list[Offset]] = []
    starts: list[int] | None = [] if answers is not None else None
    ends: list[int] | None = [] if answers is not None else None
    for f, ex in enumerate(sample_map):
        seq_ids = enc.sequence_ids(f)
        offs: list[Offset] = [
            (int(o[0]), int(o[1])) if s == 1 else None
            for o, s in zip(enc["offset_mapping"][f], seq_ids, strict=True)
        ]
        offsets.append(offs)
        if answers is None:
            continue
        ans = _first_answer(answers[ex], ex)
        s_tok = e_tok = 0
        if ans is not None:
            s_char = int(ans["answer_start"])
            e_char = s_char + len(ans["text"])
            ctx = [t for t, o in enumerate(offs) if o is not None]
            if ctx and offs[ctx[0]][0] <= s_char and offs[ctx[-1]][1] >= e_char:
                # first token ending after the answer's start; last token starting before its end
                s_tok = next(t for t in ctx if offs[t][1] > s_char)
                e_tok = next(t for t in reversed(ctx) if offs[t][0] < e_char)
                if e_tok < s_tok:  # an empty or whitespace-only answer
                    s_tok = e_tok = 0
        starts.append(s_tok)
        ends.append(e_tok)

    return QAFeatures(
        input_ids=[list(x) for x in enc["input_ids"]],
        attention_mask=[list(x) for x in enc["attention_mask"]],
        token_type_ids=[list(x) for x in enc["token_type_ids"]] if has_types else None,
        example_index=sample_map,
        offsets=offsets,
        start_positions=starts,
        end_positions=ends,
        num_examples=len(questions),
    )


# ---- decoding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The decoded answer of one example: ``context[start_char:end_char] == text``. ``score`` is
    the softmax of the span's logit (start + end) over the example's n-best distinct spans;
    ``logit`` is that raw sum."""

    text: str
    start_char: int
    end_char: int
    score: float
    logit: float = float("-inf")


def _to_rows(logits: Any, n: int) -> list[np.ndarray]:
    """Per-window 1-D float arrays from a (F, T) tensor/array or a list of 1-D rows."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    if isinstance(logits, np.ndarray):
        if logits.ndim != 2:
            raise ValueError(f"logits must be (windows, tokens), got shape {logits.shape}")
        rows = list(logits.astype(np.float32, copy=False))
    else:
        rows = [
            np.asarray(r.detach().float().cpu() if hasattr(r, "detach") else r, np.float32) for r in logits
        ]
    if len(rows) != n:
        raise ValueError(f"{len(rows)} rows of logits for {n} feature windows")
    return rows


def decode_spans(
    start_logits: Any,
    end_logits: Any,
    features: QAFeatures,
    contexts: Sequence[str],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[Answer]:
    """The best answer span per example (``len(contexts)`` answers) over all of its windows.

    ``start_logits`` / ``end_logits``: (windows, tokens) tensors or arrays, or per-window rows
    (tokens past a window's length, i.e. padding, are ignored). An example whose windows hold
    no valid span gets ``Answer("", 0, 0, 0.0)``.
    """
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best and max_answer_length must be >= 1, got {n_best}, {max_answer_length}")
    n = len(features)
    starts_l, ends_l = _to_rows(start_logits, n), _to_rows(end_logits, n)
    # per example: (start_char, end_char) -> best logit over windows
    cands: list[dict[tuple[int, int], float]] = [{} for _ in contexts]
    for f in range(n):
        ex = features.example_index[f]
        if ex >= len(contexts):
            raise ValueError(f"feature {f} belongs to example {ex} but only {len(contexts)} contexts given")
        mask, c_start, c_end = features.context_arrays(f)
        T = len(mask)
        if not mask.any():
            continue
        s_log, e_log = starts_l[f][:T], ends_l[f][:T]
        if len(s_log) < T or len(e_log) < T:
            raise ValueError(f"window {f} has {T} tokens but only {len(s_log)}/{len(e_log)} logits")
        s_masked = np.where(mask, s_log, -np.inf)
        e_masked = np.where(mask, e_log, -np.inf)
        k = min(n_best, int(mask.sum()))
        top_s = np.argpartition(-s_masked, k - 1)[:k]
        top_e = np.argpartition(-e_masked, k - 1)[:k]
        # all (start, end) pairs of the top-k, kept when start <= end < start + max_answer_length
        S, E = np.meshgrid(top_s, top_e, indexing="ij")
        ok = (E >= S) & (E - S + 1 <= max_answer_length)
        S, E = S[ok], E[ok]
        scores = s_log[S] + e_log[E]
        if len(scores) > n_best:  # only this window's n best can be among the example's n best
            keep = np.argpartition(-scores, n_best - 1)[:n_best]
            S, E, scores = S[keep], E[keep], scores[keep]
        best = cands[ex]
        for span_s, span_e, score in zip(
            c_start[S].tolist(), c_end[E].tolist(), scores.tolist(), strict=True
        ):
            if score > best.get((span_s, span_e), -np.inf):
                best[(span_s, span_e)] = score

    out: list[Answer] = []
    for ex, best in enumerate(cands):
        if not best:
            out.append(Answer("", 0, 0, 0.0))
            continue
        top = sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:n_best]
        logits = np.array([v for _, v in top], dtype=np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        (s_char, e_char), logit = top[0]
        out.append(Answer(contexts[ex][s_char:e_char], s_char, e_char, float(probs[0]), logit))
    return out


# ---- official SQuAD v1.1 evaluation --------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace
    (the SQuAD v1.1 definition, applied in that order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 between normalised answers (bag of tokens, as in SQuAD v1.1)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _max_over(metric: Any, prediction: str, truths: Sequence[str]) -> float:
    return max((metric(prediction, t) for t in truths), default=0.0)


def squad_metrics(predictions: Mapping[str, str], examples: Sequence[SquadExample]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}`` over ``examples``, each question scored against its best
    reference answer. A question without a prediction scores 0 (as the official script does)."""
    if not examples:
        raise ValueError("squad_metrics needs at least one example")
    em = f1 = 0.0
    missing = 0
    for ex in examples:
        if ex.id not in predictions:
            missing += 1
            continue
        truths = ex.answer_texts
        if not truths:
            raise ValueError(f"example {ex.id!r} has no reference answer to score against")
        pred = predictions[ex.id]
        em += _max_over(exact_match, pred, truths)
        f1 += _max_over(f1_score, pred, truths)
    if missing:
        log.warning("%d of %d questions have no prediction and score 0", missing, len(examples))
    n = len(examples)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
