"""GLUE-format data: the task registry, TSV loaders, tokenise-once caching and batching.

Every GLUE task is read from its usual folder layout (``SST-2/train.tsv``, ``MNLI/dev_matched.tsv``,
...). Columns are found by header name, so the original GLUE download and the project's shared
copy (whose RTE has ``sentence1 sentence2 label idx``) both load unchanged. A missing file, a
missing column or a malformed row raises :class:`DataError` naming the file and the line.

Tokenised features are cached once per (file, tokenizer, max length) as safetensors (flat token
ids + offsets; never a pickle), and batches are padded dynamically inside length buckets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor

from model.config import TaskSpec

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class DataError(ValueError):
    """A missing or malformed data file; the message names the file (and line)."""


def default_data_dir() -> Path:
    """``DYNABERT_DATA_DIR``, else ``../shared/data`` relative to the repository root."""
    return Path(os.environ.get("DYNABERT_DATA_DIR", REPO.parent / "shared" / "data"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNABERT_CACHE_DIR", Path.home() / ".cache" / "dynabert"))


# ---- task registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    """Where a task's files live and how to read their columns."""

    spec: TaskSpec
    folder: str
    train_file: str
    dev_file: str
    text_columns: tuple[str, ...]  # header names (or column indices as strings when headerless)
    label_column: str
    label_names: tuple[str, ...] = ()  # accepted spellings of the labels, in label-id order
    header: bool = True
    metrics: tuple[str, ...] = ("accuracy",)


def _cls(name: str, labels: tuple[str, ...], fields: tuple[str, ...], metric: str = "accuracy") -> TaskSpec:
    return TaskSpec(type="classification", name=name, labels=labels, text_fields=fields, metric=metric)


TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        _cls("sst2", ("negative", "positive"), ("sentence",)),
        "SST-2",
        "train.tsv",
        "dev.tsv",
        ("sentence",),
        "label",
    ),
    "cola": GlueTask(
        _cls("cola", ("unacceptable", "acceptable"), ("sentence",), "matthews"),
        "CoLA",
        "train.tsv",
        "dev.tsv",
        ("3",),
        "1",
        header=False,
        metrics=("matthews", "accuracy"),
    ),
    "mrpc": GlueTask(
        _cls("mrpc", ("not_paraphrase", "paraphrase"), ("sentence1", "sentence2"), "f1"),
        "MRPC",
        "train.tsv",
        "dev.tsv",
        ("#1 String", "#2 String"),
        "Quality",
        metrics=("f1", "accuracy"),
    ),
    "rte": GlueTask(
        _cls("rte", ("entailment", "not_entailment"), ("sentence1", "sentence2")),
        "RTE",
        "train.tsv",
        "dev.tsv",
        ("sentence1", "sentence2"),
        "label",
        label_names=("entailment", "not_entailment"),
    ),
    "qnli": GlueTask(
        _cls("qnli", ("entailment", "not_entailment"), ("question", "sentence")),
        "QNLI",
        "train.tsv",
        "dev.tsv",
        ("question", "sentence"),
        "label",
        label_names=("entailment", "not_entailment"),
    ),
    "mnli": GlueTask(
        _cls("mnli", ("contradiction", "entailment", "neutral"), ("premise", "hypothesis")),
        "MNLI",
        "train.tsv",
        "dev_matched.tsv",
        ("sentence1", "sentence2"),
        "gold_label",
        label_names=("contradiction", "entailment", "neutral"),
    ),
    "qqp": GlueTask(
        _cls("qqp", ("not_duplicate", "duplicate"), ("question1", "question2"), "f1"),
        "QQP",
        "train.tsv",
        "dev.tsv",
        ("question1", "question2"),
        "is_duplicate",
        metrics=("f1", "accuracy"),
    ),
    "stsb": GlueTask(
        TaskSpec(type="regression", name="stsb", text_fields=("sentence1", "sentence2"), metric="pearson"),
        "STS-B",
        "train.tsv",
        "dev.tsv",
        ("sentence1", "sentence2"),
        "score",
        metrics=("pearson", "spearman"),
    ),
}

SQUAD_SPEC = TaskSpec(type="qa", name="squad", text_fields=("question", "context"), metric="f1")
TASK_NAMES = (*TASKS, "squad")


def task_spec(name: str) -> TaskSpec:
    if name == "squad":
        return SQUAD_SPEC
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    return TASKS[name].spec


def task_metrics(name: str) -> tuple[str, ...]:
    return ("f1", "exact_match") if name == "squad" else TASKS[name].metrics


# ---- reading TSV files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one sentence, or a pair
    label: float | int


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    t = TASKS[task]
    name = {"train": t.train_file, "dev": t.dev_file}.get(split, f"{split}.tsv")
    return Path(data_dir) / t.folder / name


def read_examples(path: str | Path, task: str, limit: int | None = None) -> list[Example]:
    """Read one GLUE TSV file into examples. Quotes are not special (GLUE files are not CSV)."""
    t = TASKS[task]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing data file for task {task!r} (set --data-dir or DYNABERT_DATA_DIR)")
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops MRPC's byte-order mark
        lines = iter(enumerate(f, start=1))
        if t.header:
            try:
                _, first = next(lines)
            except StopIteration:
                raise DataError(f"{path}: empty file, expected a header line") from None
            header = first.rstrip("\r\n").split("\t")
            cols = {name: i for i, name in enumerate(header)}
            wanted = (*t.text_columns, t.label_column)
            absent = [c for c in wanted if c not in cols]
            if absent:
                raise DataError(f"{path}:1: header lacks column(s) {absent}; found {header}")
            text_idx = [cols[c] for c in t.text_columns]
            label_idx = cols[t.label_column]
        else:
            text_idx = [int(c) for c in t.text_columns]
            label_idx = int(t.label_column)
        need = max(*text_idx, label_idx) + 1
        for lineno, line in lines:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < need:
                raise DataError(
                    f"{path}:{lineno}: expected at least {need} tab-separated fields, got {len(parts)}"
                )
            examples.append(
                Example(tuple(parts[i] for i in text_idx), _parse_label(parts[label_idx], t, path, lineno))
            )
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _parse_label(raw: str, t: GlueTask, path: Path, lineno: int) -> float | int:
    raw = raw.strip()
    if t.spec.type == "regression":
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{path}:{lineno}: label {raw!r} is not a number") from None
    if raw in t.label_names:
        return t.label_names.index(raw)
    try:
        label = int(raw)
    except ValueError:
        label = -1
    if not 0 <= label < len(t.spec.labels):
        accepted = [*map(str, range(len(t.spec.labels))), *t.label_names]
        raise DataError(f"{path}:{lineno}: unknown label {raw!r}; expected one of {accepted}")
    return label


def load_split(
    data_dir: str | Path, task: str, split: str, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """A split's examples; ``limit`` takes a seeded random subset (for quick recipes)."""
    examples = read_examples(split_path(data_dir, task, split), task)
    if limit is not None and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    return examples


# ---- tokenise once, cache, batch --------------------------------------------------------------


@dataclass
class Encoded:
    """Tokenised examples: variable-length rows kept unpadded until batching."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray  # (N,) int64 or float32
    # (N,) bool: True for an augmented text, whose label is only the one of the text it was made
    # from (a replaced word can flip it: "good" -> "bad"); None when nothing is augmented
    augmented: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    def subset(self, idx: Sequence[int]) -> Encoded:
        return Encoded(
            [self.input_ids[i] for i in idx],
            [self.token_type_ids[i] for i in idx],
            self.labels[idx],
            None if self.augmented is None else self.augmented[idx],
        )


def _tokenizer_key(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000]) + str(len(tokenizer))
    return hashlib.sha256((type(tokenizer).__name__ + vocab).encode()).hexdigest()[:16]


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    regression: bool = False,
    cache_file: Path | None = None,
) -> Encoded:
    """Tokenise with truncation (no padding); reuse ``cache_file`` (safetensors) when present."""
    if cache_file is not None and cache_file.is_file():
        return _load_encoded(cache_file)
    columns = list(zip(*(e.texts for e in examples), strict=True))
    enc = tokenizer(*columns, truncation=True, max_length=max_length, return_token_type_ids=True)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    out = Encoded(
        [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        [np.asarray(x, dtype=np.int64) for x in types],
        np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64),
    )
    if cache_file is not None:
        _save_encoded(out, cache_file)
    return out


def tmp_beside(path: Path) -> Path:
    """A temporary name next to ``path`` that no other writer uses: the ranks of a torchrun job
    encode and cache the same data at once, and with one shared ``.tmp`` name one rank's rename
    took the file from under the other's (ENOENT; test_train_ddp failed so in CI). Each writer
    renames its own file into place; the contents are the same, so whichever lands last is right."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def _save_encoded(e: Encoded, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum(e.lengths())]).astype(np.int64)
    tmp = tmp_beside(path)
    save_file(
        {
            "input_ids": np.concatenate(e.input_ids),
            "token_type_ids": np.concatenate(e.token_type_ids),
            "offsets": offsets,
            "labels": e.labels,
        },
        str(tmp),
    )
    tmp.replace(path)


def _load_encoded(path: Path) -> Encoded:
    d = load_file(str(path))
    off = d["offsets"]
    ids = [d["input_ids"][a:b] for a, b in zip(off[:-1], off[1:], strict=True)]
    types = [d["token_type_ids"][a:b] for a, b in zip(off[:-1], off[1:], strict=True)]
    return Encoded(ids, types, d["labels"])


def load_encoded(
    data_dir: str | Path,
    task: str,
    split: str,
    tokenizer: Any,
    max_length: int,
    *,
    limit: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Encoded:
    """Load, subsample and tokenise a split, through the token cache."""
    path = split_path(data_dir, task, split)
    cache_file = None
    if cache_dir is not None and path.is_file():
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_tokenizer_key(tokenizer)}|{max_length}|{limit}|{seed}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"{task}-{split}-{digest}.safetensors"
        if cache_file.is_file():
            log.info("token cache hit: %s", cache_file)
            return _load_encoded(cache_file)
    examples = load_split(data_dir, task, split, limit=limit, seed=seed)
    return encode(examples, tokenizer, max_length, TASKS[task].spec.type == "regression", cache_file)


def collate(enc: Encoded, idx: Sequence[int], pad_id: int = 0) -> dict[str, Tensor]:
    """Pad the rows ``idx`` to their longest (dynamic padding)."""
    T = max(len(enc.input_ids[i]) for i in idx)
    ids = np.full((len(idx), T), pad_id, dtype=np.int64)
    types = np.zeros((len(idx), T), dtype=np.int64)
    mask = np.zeros((len(idx), T), dtype=np.int64)
    for r, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[r, :n], types[r, :n], mask[r, :n] = enc.input_ids[i], enc.token_type_ids[i], 1
    batch = {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(types),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(enc.labels[list(idx)]),
        "index": torch.as_tensor(list(idx), dtype=torch.long),  # rows of the split, for per-example caches
    }
    if enc.augmented is not None:
        batch["augmented"] = torch.from_numpy(enc.augmented[list(idx)])
    return batch


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, bucket_batches: int = 50
) -> list[list[int]]:
    """Batches of similar length: shuffle, sort within windows of ``bucket_batches`` batches,
    cut into batches, shuffle the batches. Without shuffle: sorted by length (for evaluation)."""
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    window = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, n, window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def iterate(
    enc: Encoded,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    pad_id: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, Tensor]]:
    """Yield padded batches; ``shard=(rank, world)`` keeps every world-th batch for DDP."""
    rank, world = shard
    for b, idx in enumerate(bucketed_batches(enc.lengths(), batch_size, shuffle=shuffle, seed=seed)):
        if b % world == rank:
            yield collate(enc, idx, pad_id)
