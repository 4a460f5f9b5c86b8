"""Task data behind one small interface, so the training stages never branch on the task:

* :class:`GlueData` (classification / regression) over :mod:`training.data`;
* :class:`QAData` (SQuAD v1.1) over :mod:`training.squad` (imported lazily).

Both yield batches ``{"input_ids", "attention_mask", "token_type_ids" (or None), "labels"}``
(labels (B,) for GLUE, (B, 2) start/end token positions for QA) and score a sub-network on dev.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from model.config import TaskSpec
from model.modeling import DynaBertModel
from training import data as D
from training import metrics as M

log = logging.getLogger(__name__)

Batch = dict[str, Tensor | None]


class TaskData(Protocol):
    name: str
    spec: TaskSpec
    num_train: int
    num_dev: int

    def train_batches(
        self, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[Batch]: ...

    def num_train_batches(self, batch_size: int) -> int: ...

    def originals(self) -> TaskData:
        """The data without augmented training examples (for training on the labels alone)."""
        ...

    def dev_batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]: ...

    def evaluate(
        self, model: DynaBertModel, width: float, depth: float, batch_size: int, device: Any
    ) -> dict[str, float]: ...


def to_device(batch: Batch, device: Any) -> Batch:
    return {k: (v.to(device) if v is not None else None) for k, v in batch.items()}


class GlueData:
    """A GLUE task: tokenised train and dev splits (through the token cache)."""

    def __init__(
        self,
        task: str,
        tokenizer: Any,
        data_dir: str | Path,
        max_length: int,
        *,
        train_examples: int | None = None,
        dev_examples: int | None = None,
        seed: int = 0,
        cache_dir: Path | None = None,
    ):
        self.name, self.spec = task, D.task_spec(task)
        self.pad_id = tokenizer.pad_token_id or 0
        kw = dict(cache_dir=cache_dir, seed=seed)
        self.train = (
            D.load_encoded(data_dir, task, "train", tokenizer, max_length, limit=train_examples, **kw)
            if train_examples != 0
            else D.Encoded([], [], np.zeros(0, dtype=np.int64))
        )
        self.dev = D.load_encoded(data_dir, task, "dev", tokenizer, max_length, limit=dev_examples, **kw)
        self.num_train, self.num_dev = len(self.train), len(self.dev)
        log.info(
            "%s: %d train / %d dev examples (max length %d)", task, self.num_train, self.num_dev, max_length
        )

    def add_train_texts(self, examples: list[D.Example], tokenizer: Any, max_length: int) -> None:
        """Append extra (augmented) training examples, marked as such: the distillation stages
        learn them from the teacher's logits, not from the label of the text they came from."""
        extra = D.encode(examples, tokenizer, max_length, self.spec.type == "regression")
        before = self.train.augmented if self.train.augmented is not None else np.zeros(len(self.train), bool)
        self.train = D.Encoded(
            self.train.input_ids + extra.input_ids,
            self.train.token_type_ids + extra.token_type_ids,
            np.concatenate([self.train.labels, extra.labels]),
            np.concatenate([before, np.ones(len(extra), bool)]),
        )
        self.num_train = len(self.train)

    def originals(self) -> GlueData:
        """This data without its augmented training texts (for training on the labels alone)."""
        if self.train.augmented is None:
            return self
        view = copy.copy(self)
        view.train = self.train.subset(np.flatnonzero(~self.train.augmented).tolist())
        view.train.augmented = None
        view.num_train = len(view.train)
        return view

    def train_batches(self, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        return D.iterate(self.train, batch_size, shuffle=True, seed=seed, pad_id=self.pad_id, shard=shard)

    def num_train_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_train / batch_size)

    def dev_batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        dev = self.dev
        if limit is not None and limit < len(dev):
            dev = dev.subset(sorted(random.Random(0).sample(range(len(dev)), limit)))
        return D.iterate(dev, batch_size, shuffle=False, pad_id=self.pad_id)

    @torch.no_grad()
    def predict(
        self, model: DynaBertModel, width: float, depth: float, batch_size: int, device: Any
    ) -> np.ndarray:
        """Logits (N, C) in dataset order; batches sorted by length for little padding."""
        model.eval()
        out = np.zeros((len(self.dev), model.cfg.task.num_outputs), dtype=np.float32)
        for idx in D.bucketed_batches(self.dev.lengths(), batch_size, shuffle=False):
            b = to_device(D.collate(self.dev, idx, self.pad_id), device)
            logits = model(
                b["input_ids"], b["attention_mask"], b["token_type_ids"], width=width, depth=depth
            ).logits
            out[idx] = logits.float().cpu().numpy()
        return out

    def evaluate(
        self, model: DynaBertModel, width: float, depth: float, batch_size: int, device: Any
    ) -> dict[str, float]:
        logits = self.predict(model, width, depth, batch_size, device)
        preds = logits[:, 0] if self.spec.type == "regression" else logits.argmax(-1)
        return M.compute(D.task_metrics(self.name), preds, self.dev.labels)


class QAData:
    """SQuAD v1.1: sliding-window features for train (labelled) and dev (labelled with the first
    reference answer, for importance; scored with the official EM/F1 over all references)."""

    def __init__(
        self,
        tokenizer: Any,
        data_dir: str | Path,
        max_length: int,
        doc_stride: int,
        *,
        train_examples: int | None = None,
        dev_examples: int | None = None,
        seed: int = 0,
        cache_dir: Path | None = None,
    ):
        from training import squad

        self.squad = squad
        self.name, self.spec = "squad", D.SQUAD_SPEC
        self.pad_id = tokenizer.pad_token_id or 0
        folder = Path(data_dir) / "squad"
        train = squad.load_squad(folder / "train-v1.1.json") if train_examples != 0 else []
        dev = squad.load_squad(folder / "dev-v1.1.json")
        if train_examples is not None and train_examples < len(train):
            train = random.Random(seed).sample(train, train_examples)
        if dev_examples is not None and dev_examples < len(dev):
            dev = sorted(random.Random(seed).sample(dev, dev_examples), key=lambda e: e.id)
        self.dev_examples = dev
        self.train_f = self._features(tokenizer, train, max_length, doc_stride, cache_dir, "train", seed)
        self.dev_f = self._features(tokenizer, dev, max_length, doc_stride, cache_dir, "dev", seed)
        self.num_train, self.num_dev = len(train), len(dev)
        log.info(
            "squad: %d train questions (%d windows) / %d dev questions (%d windows), max length %d",
            len(train),
            len(self.train_f),
            len(dev),
            len(self.dev_f),
            max_length,
        )

    def _features(self, tokenizer: Any, examples: list, max_length: int, stride: int, cache_dir, split, seed):
        sq = self.squad
        cache_file = None
        if cache_dir is not None:
            key = json.dumps(
                [split, [e.id for e in examples], max_length, stride, D._tokenizer_key(tokenizer)]
            )
            import hashlib

            cache_file = (
                Path(cache_dir) / f"squad-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
            )
            if cache_file.is_file():  # JSON, never a pickle
                d = json.loads(cache_file.read_text())
                d["offsets"] = [[tuple(o) if o is not None else None for o in row] for row in d["offsets"]]
                return sq.QAFeatures(**d)
        f = sq.build_features(
            tokenizer,
            [e.question for e in examples],
            [e.context for e in examples],
            max_length,
            stride,
            answers=[list(e.answers) for e in examples],
        )
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            d = {
                k: getattr(f, k)
                for k in (
                    "input_ids",
                    "attention_mask",
                    "token_type_ids",
                    "example_index",
                    "offsets",
                    "start_positions",
                    "end_positions",
                    "num_examples",
                )
            }
            tmp = D.tmp_beside(cache_file)  # (several ranks may write it at once)
            tmp.write_text(json.dumps(d))
            tmp.replace(cache_file)
        return f

    def _batches(self, feats: Any, order: list[list[int]]) -> Iterator[Batch]:
        for idx in order:
            p = feats.padded(idx, self.pad_token)
            yield {
                "input_ids": p["input_ids"],
                "attention_mask": p["attention_mask"],
                "token_type_ids": p.get("token_type_ids"),
                "labels": torch.stack([p["start_positions"], p["end_positions"]], dim=1),
            }

    @property
    def pad_token(self) -> int:
        return self.pad_id

    def train_batches(self, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        lengths = np.asarray(self.train_f.lengths())
        order = D.bucketed_batches(lengths, batch_size, shuffle=True, seed=seed)
        return self._batches(self.train_f, order[shard[0] :: shard[1]])

    def num_train_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.train_f) / batch_size)

    def originals(self) -> QAData:
        return self  # SQuAD is not augmented

    def dev_batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        n = len(self.dev_f) if limit is None else min(limit, len(self.dev_f))
        return self._batches(
            self.dev_f, [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        )

    @torch.no_grad()
    def evaluate(
        self, model: DynaBertModel, width: float, depth: float, batch_size: int, device: Any
    ) -> dict[str, float]:
        """Official SQuAD v1.1 exact match and F1, as fractions in [0, 1] like every other metric."""
        model.eval()
        feats = self.dev_f
        starts: list[np.ndarray | None] = [None] * len(feats)
        ends: list[np.ndarray | None] = [None] * len(feats)
        order = D.bucketed_batches(np.asarray(feats.lengths()), batch_size, shuffle=False)
        for idx in order:
            p = feats.padded(idx, self.pad_id)
            tt = p.get("token_type_ids")
            logits = (
                model(
                    p["input_ids"].to(device),
                    p["attention_mask"].to(device),
                    tt.to(device) if tt is not None else None,
                    width=width,
                    depth=depth,
                )
                .logits.float()
                .cpu()
                .numpy()
            )  # (B, T, 2)
            for r, i in enumerate(idx):
                starts[i], ends[i] = logits[r, :, 0], logits[r, :, 1]
        contexts = [e.context for e in self.dev_examples]
        answers = self.squad.decode_spans(starts, ends, feats, contexts)
        preds = {e.id: a.text for e, a in zip(self.dev_examples, answers, strict=True)}
        m = self.squad.squad_metrics(preds, self.dev_examples)
        return {"f1": round(m["f1"] / 100, 6), "exact_match": round(m["exact_match"] / 100, 6)}


def load_task_data(
    task: str,
    tokenizer: Any,
    data_dir: str | Path,
    recipe: Any,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    train: bool = True,
) -> TaskData:
    """The task's data sized by the recipe (``train=False``: dev only, for evaluation)."""
    n_train = recipe.train_examples if train else 0
    if task == "squad":
        return QAData(
            tokenizer,
            data_dir,
            recipe.max_length_qa,
            recipe.doc_stride,
            train_examples=n_train,
            dev_examples=recipe.dev_examples,
            seed=seed,
            cache_dir=cache_dir,
        )
    return GlueData(
        task,
        tokenizer,
        data_dir,
        recipe.max_length,
        train_examples=n_train,
        dev_examples=recipe.dev_examples,
        seed=seed,
        cache_dir=cache_dir,
    )
