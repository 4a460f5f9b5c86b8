"""training/augment.py: TinyBERT-style augmentation with the real MiniLM backbone's embedding
neighbours, a tiny real BERT masked-LM checkpoint (head checked against transformers), and
WordNet when Debian's package is installed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from model.hf import load_tokenizer
from training.augment import (
    STOP_WORDS,
    AugmentConfig,
    Augmenter,
    CandidateSource,
    ChainedCandidates,
    EmbeddingNeighbours,
    MaskedLMCandidates,
    WordNetSynonyms,
    candidate_source,
    has_mlm_head,
    whole_word_vocab,
    word_spans,
    wordnet_dir,
)
from training.squad import SquadExample

TEXTS = [
    "a gripping , beautifully acted film about a lonely teacher .",
    "The plot never comes together, and the second half drags on.",
    "it 's a charming and often affecting journey .",
    "!!! ... ???",
]


@pytest.fixture(scope="module")
def neighbours(minilm_dir: Path) -> EmbeddingNeighbours:
    return EmbeddingNeighbours.from_pretrained(minilm_dir, top_k=10)


@pytest.fixture(scope="module")
def vocab(minilm_dir: Path) -> dict[str, int]:
    return whole_word_vocab(load_tokenizer(minilm_dir))


def _skeleton(text: str) -> str:
    """The text with every word blanked: what replacement must leave untouched."""
    return re.sub(r"[A-Za-z]+", "W", text)


def test_word_spans_skip_contractions_and_single_letters() -> None:
    text = "I don't like it's ending, but the film works."
    words = [text[s:e] for s, e in word_spans(text)]
    assert words == ["like", "ending", "but", "the", "film", "works"]


def test_whole_word_vocab_is_words_only(vocab: dict[str, int]) -> None:
    assert "film" in vocab and "movie" in vocab
    assert not any(w.startswith("##") or w.startswith("[") for w in vocab)
    assert not set(vocab) & STOP_WORDS
    assert all(w.isalpha() and w.islower() for w in vocab)


def test_embedding_neighbours_are_real_similar_words(neighbours: EmbeddingNeighbours, vocab) -> None:
    assert isinstance(neighbours, CandidateSource)
    film = neighbours.neighbours("film")
    assert len(film) == 10 and "film" not in film
    assert {"movie", "films"} & set(film)  # the MiniLM embedding space puts these close
    assert "excellent" in neighbours.neighbours("Good") or "great" in neighbours.neighbours("Good")
    assert all(w in vocab for w in film)
    assert neighbours.neighbours("the") == []  # stop-word: no candidates
    assert neighbours.neighbours("qwxzv") == []  # not a vocabulary word


def test_prepare_batches_match_lazy_lookup(minilm_dir: Path, neighbours: EmbeddingNeighbours) -> None:
    emb = neighbours._emb
    other = EmbeddingNeighbours(load_tokenizer(minilm_dir), emb, top_k=10, batch_size=3)
    other.prepare(TEXTS)
    assert "gripping" in other._table and "teacher" in other._table
    for w in ["gripping", "teacher", "journey", "plot"]:
        assert other._table[w] == neighbours.neighbours(w)


def test_augmenter_n_samples_deterministic_and_well_formed(neighbours: EmbeddingNeighbours, vocab) -> None:
    aug = Augmenter(neighbours, AugmentConfig(p=0.4, n_samples=6, seed=7))
    out = aug.augment(TEXTS)
    assert [len(v) for v in out] == [6, 6, 6, 0]  # no replaceable word in the last text
    assert out == Augmenter(neighbours, AugmentConfig(p=0.4, n_samples=6, seed=7)).augment(TEXTS)
    assert out != Augmenter(neighbours, AugmentConfig(p=0.4, n_samples=6, seed=8)).augment(TEXTS)
    # independent of batching: text i is seeded by its index
    assert aug.augment(TEXTS[2:], start_index=2) == out[2:]
    for text, variants in zip(TEXTS, out, strict=True):
        orig = [text[s:e] for s, e in word_spans(text)]
        for v in variants:
            assert v != text
            assert _skeleton(v) == _skeleton(text)  # spacing and punctuation untouched
            new = [v[s:e] for s, e in word_spans(v)]
            assert len(new) == len(orig)
            for o, n in zip(orig, new, strict=True):
                if o != n:
                    assert o.lower() not in STOP_WORDS  # stop-words are never replaced
                    assert n.lower() in neighbours.neighbours(o)  # a real candidate of that word
                    assert n.lower() in vocab
                    assert n[0].isupper() == o[0].isupper()  # casing kept


def test_replacement_rate_follows_p(neighbours: EmbeddingNeighbours) -> None:
    text = "the lonely teacher walked through the quiet village towards the old church"
    eligible = [text[s:e] for s, e in word_spans(text) if neighbours.neighbours(text[s:e])]

    def rate(p: float) -> float:
        variants = Augmenter(neighbours, AugmentConfig(p=p, n_samples=200, seed=0)).augment_text(text)
        changed = sum(a != b for v in variants for a, b in zip(text.split(), v.split(), strict=True))
        return changed / (len(variants) * len(eligible))

    assert 0.3 < rate(0.4) < 0.5
    assert rate(1.0) == 1.0


def test_augment_pairs(neighbours: EmbeddingNeighbours) -> None:
    pairs = [("The cat sat on the mat.", "A dog slept in the garden."), ("!!!", "The river flows north.")]
    out = Augmenter(neighbours, AugmentConfig(n_samples=3, seed=1)).augment_pairs(pairs)
    assert [len(v) for v in out] == [3, 3]
    for a, b in out[0]:
        assert _skeleton(a) == _skeleton(pairs[0][0]) and _skeleton(b) == _skeleton(pairs[0][1])
    assert all(v[0] == "!!!" and v[1] != pairs[1][1] for v in out[1])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="p must be in"):
        AugmentConfig(p=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        AugmentConfig(n_samples=0)


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory, minilm_dir: Path) -> Path:
    """A tiny real BERT masked-LM checkpoint (random weights) with the MiniLM tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # a non-zero output bias, so the test sees whether it is loaded
        model.cls.predictions.bias.normal_()
    out = tmp_path_factory.mktemp("mlm") / "tiny-bert-mlm"
    model.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / f).is_file():
            shutil.copy(minilm_dir / f, out / f)
    return out


def test_mlm_head_detection_and_auto_choice(tiny_mlm_dir: Path, minilm_dir: Path) -> None:
    assert has_mlm_head(tiny_mlm_dir)
    assert not has_mlm_head(minilm_dir)  # the packaged backbone has no MLM head
    assert isinstance(candidate_source(tiny_mlm_dir), MaskedLMCandidates)
    assert isinstance(candidate_source(minilm_dir), EmbeddingNeighbours)
    with pytest.raises(ValueError, match="unknown candidate source 'glove'"):
        candidate_source(minilm_dir, kind="glove")  # type: ignore[arg-type]


def test_mlm_logits_equal_transformers(tiny_mlm_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = MaskedLMCandidates.from_pretrained(tiny_mlm_dir, top_k=5)
    ref = transformers.BertForMaskedLM.from_pretrained(str(tiny_mlm_dir), attn_implementation="eager").eval()
    tok = src.tokenizer
    ids = torch.tensor([tok("a lonely teacher walks home")["input_ids"]] * 2)
    pos = torch.tensor([2, 3])
    ids[0, 2] = ids[1, 3] = tok.mask_token_id
    with torch.inference_mode():
        want = ref(input_ids=ids).logits[torch.arange(2), pos]
        got = src.mlm_logits(ids, torch.ones_like(ids), pos)
    assert (got - want).abs().max().item() < 1e-4


def test_mlm_candidates_are_the_heads_top_words(tiny_mlm_dir: Path) -> None:
    src = MaskedLMCandidates.from_pretrained(tiny_mlm_dir, top_k=5)
    text = "a lonely teacher walks home"
    spans = word_spans(text)
    cands = src.candidates(text, spans)
    assert len(cands) == len(spans)
    vocab = whole_word_vocab(src.tokenizer)
    for (s, e), c in zip(spans, cands, strict=True):
        word = text[s:e]
        if word in vocab:
            assert len(c) == 5 and word not in c and all(w in vocab for w in c)
    # the first candidate of "teacher" is the argmax of the head with "teacher" masked
    tok = src.tokenizer
    ids = torch.tensor([tok(text)["input_ids"]])
    t = tok(text).word_ids().index(2)
    ids[0, t] = tok.mask_token_id
    logits = src.mlm_logits(ids, torch.ones_like(ids), torch.tensor([t]))[0]
    allowed = torch.tensor([vocab[w] for w in vocab if w != "teacher"])
    assert cands[2][0] == src.id_to_word[int(allowed[logits[allowed].argmax()])]
    out = Augmenter(src, AugmentConfig(n_samples=4, seed=0)).augment([text])
    assert len(out[0]) == 4 and all(v != text for v in out[0])


@pytest.mark.skipif(wordnet_dir() is None, reason="Debian's wordnet package not installed")
def test_wordnet_synonyms() -> None:
    wn = WordNetSynonyms(top_k=10)
    assert {"film", "picture"} <= set(wn.synonyms("movie"))
    assert {"auto", "automobile"} <= set(wn.synonyms("Car"))
    assert wn.synonyms("the") == [] and wn.synonyms("qwxzv") == []
    out = Augmenter(wn, AugmentConfig(n_samples=3, seed=0)).augment(["I bought a car and watched a movie."])
    assert len(out[0]) == 3


def test_wordnet_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet"):
        WordNetSynonyms(tmp_path)


def test_augment_questions_keeps_context_and_answers(neighbours: EmbeddingNeighbours) -> None:
    ex = SquadExample(
        "q1",
        "t",
        "Which teacher wrote the famous novel?",
        "Ann Smith wrote it.",
        ({"text": "Ann Smith", "answer_start": 0},),
    )
    out = Augmenter(neighbours, AugmentConfig(n_samples=3, seed=0)).augment_questions([ex])
    assert [e.id for e in out] == ["q1-aug0", "q1-aug1", "q1-aug2"]
    for e in out:
        assert e.context == ex.context and e.answers == ex.answers and e.title == ex.title
        assert e.question != ex.question and _skeleton(e.question) == _skeleton(ex.question)


@pytest.mark.skipif(wordnet_dir() is None, reason="Debian's wordnet package not installed")
def test_chained_sources_fill_gaps_in_order(tiny_mlm_dir: Path) -> None:
    text = "an extraordinarily marvellous automobile"  # multi-token words the MLM head cannot predict
    mlm = MaskedLMCandidates.from_pretrained(tiny_mlm_dir, top_k=5)
    wn = WordNetSynonyms(top_k=5)
    spans = word_spans(text)
    first, second = mlm.candidates(text, spans), wn.candidates(text, spans)
    chained = ChainedCandidates(mlm, wn).candidates(text, spans)
    assert chained == [a if a else b for a, b in zip(first, second, strict=True)]
    assert any(not a and b for a, b in zip(first, second, strict=True))  # WordNet filled a gap
    src = candidate_source(tiny_mlm_dir, wordnet_fallback=True)
    assert isinstance(src, ChainedCandidates) and isinstance(src.sources[0], MaskedLMCandidates)
