"""Data augmentation by word replacement, in the manner of TinyBERT (Jiao et al., "TinyBERT:
Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020, section 3.3).

For each word of a text, with probability ``p`` the word is replaced by one of its ``top_k``
candidates; this is repeated to make ``n_samples`` new texts per example. The augmenter only
produces texts: their labels come from the teacher's logits at training time.

Candidates come from a pluggable :class:`CandidateSource`:

* :class:`MaskedLMCandidates`: the backbone's masked-LM head (BERT ``cls.predictions.*`` or
  RoBERTa/MPNet ``lm_head.*`` weights) predicts each single-token word with that word masked,
  as TinyBERT does;
* :class:`EmbeddingNeighbours`: nearest neighbours by cosine similarity in the backbone's own
  word-embedding matrix (whole-word vocabulary entries only, no special tokens or stop-words);
  the packaged sentence-transformers backbones have no MLM head, so this is their default.
  TinyBERT uses GloVe neighbours for words the MLM cannot predict; the backbone's own input
  embeddings play that role here with no extra download;
* :class:`WordNetSynonyms`: synonyms from the WordNet database files when Debian's ``wordnet``
  package is installed (``/usr/share/wordnet``); optional.

Everything is deterministic given the seed: example i is augmented with its own RNG seeded
from ``(seed, i)``, so results do not depend on batching or order.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

Span = tuple[int, int]  # character span of a word in its text

# A word: two or more ASCII letters, not glued to other word characters or an apostrophe
# ("don't", "it's" stay as they are).
_WORD = re.compile(r"(?<![\w'’])[A-Za-z]{2,}(?![\w'’])")

# Function words are never replaced nor offered as candidates (they carry syntax, not content).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how if in into is it its itself just me
    more most my myself no nor not now of off on once only or other our ours ourselves out over own
    same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves also may might must shall us ll ve re""".split()
)


def word_spans(text: str) -> list[Span]:
    """Character spans of the replaceable words of ``text`` (ASCII letters, 2+ long)."""
    return [m.span() for m in _WORD.finditer(text)]


@runtime_checkable
class CandidateSource(Protocol):
    """Gives replacement candidates for words of a text.

    ``candidates(text, spans)`` returns one list per span (best first, possibly empty), lowercase
    whole words different from the word itself. A source may also define ``prepare(texts)`` to
    precompute what it needs for a whole data set at once.
    """

    def candidates(self, text: str, spans: Sequence[Span]) -> list[list[str]]: ...


# ---- vocabulary helpers --------------------------------------------------------------------


def whole_word_vocab(tokenizer: Any) -> dict[str, int]:
    """Lowercase alphabetic words that are a single vocabulary entry at the start of a word,
    mapped to their token id (WordPiece: no ``##``; byte-level BPE / SentencePiece: the entry
    with the word-start marker), special tokens and stop-words excluded."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    vocab = tokenizer.get_vocab()
    bpe = any(t.startswith("Ġ") for t in vocab)
    spm = any(t.startswith("▁") for t in vocab)
    out: dict[str, int] = {}
    for tok, idx in vocab.items():
        if tok in special:
            continue
        if bpe or spm:
            if not tok.startswith("Ġ" if bpe else "▁"):
                continue
            word = tok[1:]
        else:
            word = tok
        if len(word) >= 2 and word.isascii() and word.isalpha() and word.islower() and word not in STOP_WORDS:
            out[word] = idx
    return out


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _read_tensor(weights: Path, suffixes: Iterable[str]) -> Tensor | None:
    """The first tensor whose name ends with one of ``suffixes`` (read alone, no full load)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118
        for suffix in suffixes:
            for name in names:
                if name == suffix or name.endswith("." + suffix):
                    return f.get_tensor(name)
    return None


# ---- (b) nearest neighbours in the word-embedding space ------------------------------------


class EmbeddingNeighbours:
    """Top-K cosine neighbours of a word in a word-embedding matrix, among whole-word entries.

    The neighbour table is computed lazily for the words actually met (``prepare`` does a whole
    data set in one pass), by batched matmuls against the normalised candidate matrix.
    """

    def __init__(self, tokenizer: Any, embeddings: Tensor, top_k: int = 15, batch_size: int = 1024):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (vocab, hidden), got shape {tuple(embeddings.shape)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.batch_size = top_k, batch_size
        self.word_ids = {w: i for w, i in whole_word_vocab(tokenizer).items() if i < embeddings.shape[0]}
        if not self.word_ids:
            raise ValueError("the tokenizer's vocabulary has no whole-word entries to draw candidates from")
        self.words = list(self.word_ids)
        ids = torch.tensor([self.word_ids[w] for w in self.words])
        self._emb = F.normalize(embeddings.detach().float(), dim=-1)  # (V, H)
        self._cand = self._emb[ids]  # (W, H), rows aligned with self.words
        self._table: dict[str, list[str]] = {}

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, top_k: int = 15, tokenizer: Any = None
    ) -> EmbeddingNeighbours:
        """From a Hugging Face folder or a DynaBERT checkpoint (model.safetensors + tokenizer)."""
        folder = Path(folder)
        emb = _read_tensor(folder / "model.safetensors", ["embeddings.word_embeddings.weight"])
        if emb is None:
            raise ValueError(f"{folder / 'model.safetensors'}: no embeddings.word_embeddings.weight tensor")
        if tokenizer is None:
            from model.hf import load_tokenizer

            tokenizer = load_tokenizer(folder)
        return cls(tokenizer, emb, top_k=top_k)

    def prepare(self, texts: Iterable[str]) -> None:
        """Compute the neighbours of every vocabulary word found in ``texts`` not computed yet."""
        todo = {
            w
            for t in texts
            for s, e in word_spans(t)
            if (w := t[s:e].lower()) in self.word_ids and w not in self._table
        }
        self._compute(sorted(todo))

    def _compute(self, words: list[str]) -> None:
        k = min(self.top_k + 1, len(self.words))
        with torch.no_grad():
            for i in range(0, len(words), self.batch_size):
                chunk = words[i : i + self.batch_size]
                q = self._emb[torch.tensor([self.word_ids[w] for w in chunk])]  # (b, H)
                top = (q @ self._cand.T).topk(k, dim=-1).indices  # (b, k)
                for w, row in zip(chunk, top.tolist(), strict=True):
                    self._table[w] = [self.words[j] for j in row if self.words[j] != w][: self.top_k]

    def neighbours(self, word: str) -> list[str]:
        w = word.lower()
        if w not in self.word_ids:
            return []
        if w not in self._table:
            self._compute([w])
        return self._table[w]

    def candidates(self, text: str, spans: Sequence[Span]) -> list[list[str]]:
        return [self.neighbours(text[s:e]) for s, e in spans]


# ---- (a) the backbone's masked-LM head -----------------------------------------------------

_MLM_NAMES = {  # ours -> (BERT name, RoBERTa/MPNet name)
    "dense.weight": ("cls.predictions.transform.dense.weight", "lm_head.dense.weight"),
    "dense.bias": ("cls.predictions.transform.dense.bias", "lm_head.dense.bias"),
    "norm.weight": ("cls.predictions.transform.LayerNorm.weight", "lm_head.layer_norm.weight"),
    "norm.bias": ("cls.predictions.transform.LayerNorm.bias", "lm_head.layer_norm.bias"),
}


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense, GELU, LayerNorm, then a decoder to the vocabulary
    (usually tied to the word embeddings) plus a bias."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Parameter(torch.zeros(vocab, hidden))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: Tensor) -> Tensor:  # (B, H) -> (B, V)
        return F.linear(self.norm(F.gelu(self.dense(h))), self.decoder, self.bias)


def has_mlm_head(folder: str | Path) -> bool:
    """Whether a Hugging Face folder's weights include a masked-LM head."""
    from safetensors import safe_open

    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118
    return any(bert in names or rob in names for bert, rob in [_MLM_NAMES["dense.weight"]])


class MaskedLMCandidates:
    """TinyBERT's candidates: mask one single-token word at a time and take the MLM head's top-K
    whole-word predictions. All masked copies of a text run as one batch."""

    def __init__(
        self, encoder: nn.Module, head: MLMHead, tokenizer: Any, top_k: int = 15, batch_size: int = 64
    ):
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token")
        self.encoder, self.head, self.tokenizer = encoder.eval(), head.eval(), tokenizer
        self.top_k, self.batch_size = top_k, batch_size
        word_ids = whole_word_vocab(tokenizer)
        self.id_to_word = {i: w for w, i in word_ids.items()}
        allowed = torch.zeros(head.bias.shape[0], dtype=torch.bool)
        allowed[[i for i in self.id_to_word if i < len(allowed)]] = True
        self._allowed = allowed
        self.max_length = int(getattr(encoder, "cfg").max_positions) - 2  # noqa: B009

    @classmethod
    def from_pretrained(cls, folder: str | Path, top_k: int = 15) -> MaskedLMCandidates:
        """From a Hugging Face folder whose weights include ``cls.predictions.*`` or ``lm_head.*``."""
        from model.config import TaskSpec
        from model.hf import load_hf_model, load_tokenizer

        folder = Path(folder)
        weights = folder / "model.safetensors"
        hf_cfg = json.loads((folder / "config.json").read_text())
        encoder = load_hf_model(folder, TaskSpec(type="qa", name="mlm"))
        head = MLMHead(hf_cfg["hidden_size"], hf_cfg["vocab_size"], hf_cfg.get("layer_norm_eps", 1e-12))
        sd: dict[str, Tensor] = {}
        for ours, names in _MLM_NAMES.items():
            t = _read_tensor(weights, names)
            if t is None:
                raise ValueError(f"{weights}: no masked-LM head tensor {names[0]!r} / {names[1]!r}")
            sd[ours] = t
        dec = _read_tensor(weights, ["cls.predictions.decoder.weight", "lm_head.decoder.weight"])
        sd["decoder"] = dec if dec is not None else encoder.embeddings.word_embeddings.weight.detach().clone()
        bias = _read_tensor(weights, ["cls.predictions.bias", "lm_head.bias", "cls.predictions.decoder.bias"])
        sd["bias"] = bias if bias is not None else torch.zeros(hf_cfg["vocab_size"])
        head.load_state_dict(sd)
        return cls(encoder, head, load_tokenizer(folder), top_k=top_k)

    @torch.no_grad()
    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Vocabulary logits (N, V) at ``positions`` (N,) of each row of ``input_ids`` (N, T)."""
        out = self.encoder(input_ids, attention_mask, output_hidden_states=True, width=1.0, depth=1.0)
        h = out.hidden_states[-1][torch.arange(len(positions)), positions]  # (N, H)
        return self.head(h)

    def candidates(self, text: str, spans: Sequence[Span]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in spans]
        enc = self.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=self.max_length)
        offsets = enc["offset_mapping"]
        ids = torch.tensor(enc["input_ids"])
        jobs: list[tuple[int, int]] = []  # (span index, token position) of single-token words
        for k, (s, e) in enumerate(spans):
            toks = [t for t, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
            if len(toks) == 1 and tuple(offsets[toks[0]]) == (s, e) and int(ids[toks[0]]) in self.id_to_word:
                jobs.append((k, toks[0]))
        for i in range(0, len(jobs), self.batch_size):
            chunk = jobs[i : i + self.batch_size]
            batch = ids.repeat(len(chunk), 1)  # (N, T), one masked copy per word
            pos = torch.tensor([t for _, t in chunk])
            batch[torch.arange(len(chunk)), pos] = self.tokenizer.mask_token_id
            logits = self.mlm_logits(batch, torch.ones_like(batch), pos)
            logits[:, ~self._allowed] = float("-inf")
            logits[torch.arange(len(chunk)), ids[pos]] = float("-inf")  # not the word itself
            top = logits.topk(self.top_k, dim=-1).indices.tolist()
            for (k, _), row in zip(chunk, top, strict=True):
                out[k] = [self.id_to_word[j] for j in row if j in self.id_to_word]
        return out


# ---- (c) WordNet synonyms ------------------------------------------------------------------

WORDNET_DIRS = (Path("/usr/share/wordnet"), Path("/usr/share/wordnet/dict"))


def wordnet_dir() -> Path | None:
    """The WordNet database folder (index.noun, data.noun, ...) when installed, else None."""
    for d in WORDNET_DIRS:
        if (d / "index.noun").is_file() and (d / "data.noun").is_file():
            return d
    return None


class WordNetSynonyms:
    """Synonyms (lemmas sharing a synset) from the WordNet 3 database files, read directly
    (index.<pos> gives a lemma's synset offsets; data.<pos> lists each synset's words).
    Only single-word, alphabetic synonyms are kept."""

    POS = ("noun", "verb", "adj", "adv")

    def __init__(self, folder: str | Path | None = None, top_k: int = 15, vocab: Iterable[str] | None = None):
        d = Path(folder) if folder is not None else wordnet_dir()
        if d is None or not (d / "index.noun").is_file():
            raise FileNotFoundError(
                f"WordNet database not found in {folder or [str(x) for x in WORDNET_DIRS]}; "
                "install it with `apt-get install wordnet`"
            )
        self.folder, self.top_k = d, top_k
        self.vocab = set(vocab) if vocab is not None else None
        self._index: dict[str, dict[str, list[int]]] = {}
        for pos in self.POS:
            idx: dict[str, list[int]] = {}
            path = d / f"index.{pos}"
            if not path.is_file():
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(" "):  # licence header
                        continue
                    parts = line.split()
                    # lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offsets...
                    n_syn, n_ptr = int(parts[2]), int(parts[3])
                    idx[parts[0]] = [int(o) for o in parts[4 + n_ptr + 2 : 4 + n_ptr + 2 + n_syn]]
            self._index[pos] = idx
        self._cache: dict[str, list[str]] = {}

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        with open(self.folder / f"data.{pos}", "rb") as f:
            f.seek(offset)
            parts = f.readline().decode("utf-8", "replace").split()
        # offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...
        n = int(parts[3], 16)
        return [parts[4 + 2 * i].lower() for i in range(n)]

    def synonyms(self, word: str) -> list[str]:
        w = word.lower()
        if w in self._cache:
            return self._cache[w]
        out: list[str] = []
        for pos in self.POS:
            for off in self._index.get(pos, {}).get(w, []):
                for syn in self._synset_words(pos, off):
                    syn = re.sub(r"\(.*\)$", "", syn)  # adjective markers like "(a)"
                    if (
                        syn != w
                        and syn.isalpha()
                        and syn.isascii()
                        and syn not in out
                        and syn not in STOP_WORDS
                        and (self.vocab is None or syn in self.vocab)
                    ):
                        out.append(syn)
        self._cache[w] = out[: self.top_k]
        return self._cache[w]

    def candidates(self, text: str, spans: Sequence[Span]) -> list[list[str]]:
        return [[] if text[s:e].lower() in STOP_WORDS else self.synonyms(text[s:e]) for s, e in spans]


class ChainedCandidates:
    """Per word, the candidates of the first source that has any: e.g. the MLM head for
    single-token words, then WordNet for the words the head cannot predict (TinyBERT falls back
    to GloVe neighbours there)."""

    def __init__(self, *sources: CandidateSource):
        if not sources:
            raise ValueError("ChainedCandidates needs at least one source")
        self.sources = sources

    def prepare(self, texts: Iterable[str]) -> None:
        texts = list(texts)
        for src in self.sources:
            prepare = getattr(src, "prepare", None)
            if prepare is not None:
                prepare(texts)

    def candidates(self, text: str, spans: Sequence[Span]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in spans]
        for src in self.sources:
            todo = [i for i, c in enumerate(out) if not c]
            if not todo:
                break
            for i, c in zip(todo, src.candidates(text, [spans[i] for i in todo]), strict=True):
                out[i] = c
        return out


def candidate_source(
    folder: str | Path,
    kind: Literal["auto", "mlm", "embedding", "wordnet"] = "auto",
    top_k: int = 15,
    wordnet_fallback: bool = False,
) -> CandidateSource:
    """The candidate source for a backbone folder: ``auto`` picks the MLM head when the weights
    have one, else embedding neighbours. ``wordnet_fallback`` adds WordNet synonyms for the
    words the first source has nothing for (ignored when WordNet is not installed)."""
    if kind == "auto":
        kind = "mlm" if has_mlm_head(folder) else "embedding"
    src: CandidateSource
    if kind == "mlm":
        src = MaskedLMCandidates.from_pretrained(folder, top_k=top_k)
    elif kind == "embedding":
        src = EmbeddingNeighbours.from_pretrained(folder, top_k=top_k)
    elif kind == "wordnet":
        return WordNetSynonyms(top_k=top_k)
    else:
        raise ValueError(f"unknown candidate source {kind!r}: expected auto, mlm, embedding or wordnet")
    if wordnet_fallback:
        if wordnet_dir() is None:
            log.warning("wordnet_fallback asked for but WordNet is not installed (apt-get install wordnet)")
        else:
            return ChainedCandidates(src, WordNetSynonyms(top_k=top_k))
    return src


# ---- the augmenter -------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """TinyBERT's settings by default: p_t = 0.4, N_a = 20 samples, K = 15 candidates."""

    p: float = 0.4  # probability of replacing each word that has candidates
    n_samples: int = 20  # new texts per example
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {self.p}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")


class Augmenter:
    """Makes ``n_samples`` variants of each text by random word replacement.

    Every variant differs from the original (if no word was drawn, one is replaced anyway); a
    text with no replaceable word yields no variant. Casing of the replaced word is kept.
    """

    def __init__(self, source: CandidateSource, config: AugmentConfig = AugmentConfig()):
        self.source, self.config = source, config

    def _rng(self, index: int, field: int) -> random.Random:
        return random.Random(f"{self.config.seed}:{index}:{field}")  # str seeds are hashed stably

    def augment_text(self, text: str, index: int = 0, field: int = 0) -> list[str]:
        """Variants of one text; ``index`` (the example's position in its data set) seeds them."""
        spans = word_spans(text)
        if not spans:
            return []
        cands = self.source.candidates(text, spans)
        usable = [
            (s, c)
            for s, c in zip(spans, cands, strict=True)
            if c and text[s[0] : s[1]].lower() not in STOP_WORDS
        ]
        if not usable:
            return []
        rng = self._rng(index, field)
        out = []
        for _ in range(self.config.n_samples):
            chosen = {i: rng.choice(c) for i, (_, c) in enumerate(usable) if rng.random() < self.config.p}
            if not chosen:
                i = rng.randrange(len(usable))
                chosen[i] = rng.choice(usable[i][1])
            pieces, last = [], 0
            for i, ((s, e), _) in enumerate(usable):
                if i in chosen:
                    pieces += [text[last:s], _match_case(chosen[i], text[s:e])]
                    last = e
            pieces.append(text[last:])
            out.append("".join(pieces))
        return out

    def augment(self, texts: Sequence[str], start_index: int = 0) -> list[list[str]]:
        """Variants per text; text i is seeded by ``start_index + i``."""
        prepare = getattr(self.source, "prepare", None)
        if prepare is not None:
            prepare(texts)
        return [self.augment_text(t, start_index + i) for i, t in enumerate(texts)]

    def augment_pairs(
        self, pairs: Sequence[Sequence[str]], start_index: int = 0
    ) -> list[list[tuple[str, ...]]]:
        """Variants of multi-field examples (sentence pairs): each field is varied independently
        and variant j combines the fields' j-th variants (a field with none stays as it is)."""
        prepare = getattr(self.source, "prepare", None)
        if prepare is not None:
            prepare([t for pair in pairs for t in pair])
        out = []
        for i, pair in enumerate(pairs):
            per_field = [self.augment_text(t, start_index + i, f) for f, t in enumerate(pair)]
            if not any(per_field):
                out.append([])
                continue
            out.append(
                [
                    tuple(v[j] if v else t for v, t in zip(per_field, pair, strict=True))
                    for j in range(self.config.n_samples)
                ]
            )
        return out

    def augment_questions(self, examples: Sequence[Any], start_index: int = 0) -> list[Any]:
        """SQuAD: new examples whose questions are varied while the context and the answer spans
        stay as they are (so answer offsets remain valid). Ids get a ``-aug<j>`` suffix."""
        from dataclasses import replace

        variants = self.augment([e.question for e in examples], start_index)
        return [
            replace(e, id=f"{e.id}-aug{j}", question=q)
            for e, qs in zip(examples, variants, strict=True)
            for j, q in enumerate(qs)
        ]
