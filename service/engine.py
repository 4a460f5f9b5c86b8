"""A loaded model: checkpoint, tokenizer, its sub-network table, and the pre/post-processing of
classification and extractive QA. No web framework here; the app wraps it.

In-process inference time (what the HTTP overhead is measured against)::

    from service.engine import Engine
    eng = Engine.load("models/sst2-minilm-l6")
    eng.classify_local(["a gripping film"], width=1.0, depth=1.0)   # tokenise + forward + softmax

``classify_local`` does exactly what one request does inside the server minus HTTP, JSON,
policy and queue, so ``p50(end-to-end) - p50(classify_local)`` is the serving overhead. The
server also reports its own split in every response's ``Server-Timing`` (queue, infer, total).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import Checkpoint, load_checkpoint
from service.policy import Subnet

log = logging.getLogger(__name__)

SubnetKey = tuple[float, float]
PIECE_ROWS = 64  # rows per forward pass at most: a long QA context runs in pieces (bounds memory)


@dataclass(frozen=True)
class Row:
    """One model input row: token ids (and token types) of a text, a pair, or a QA window."""

    input_ids: list[int]
    token_type_ids: list[int] | None


@dataclass(frozen=True)
class Encoded:
    rows: list[Row]
    tokens: int  # longest row
    truncated: int  # inputs cut to the model's maximum

    @property
    def mean_tokens(self) -> int:
        """The rows' mean length, rounded up: what each costs in an unpadded forward pass."""
        return -(-sum(len(r.input_ids) for r in self.rows) // len(self.rows))

    def cost_tokens(self, packed: bool) -> int:
        """Tokens per row the forward pass costs: the mean when ``packed`` (the CPU's forward runs
        on the real tokens alone: model/modeling.py's ``Unpadded``), else the longest row."""
        return self.mean_tokens if packed else self.tokens


class Engine:
    def __init__(self, name: str, ckpt: Checkpoint, device: str = "cpu") -> None:
        if ckpt.tokenizer is None:
            raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer files (tokenizer.json)")
        self.name, self.ckpt, self.device = name, ckpt, torch.device(device)
        self.model: torch.nn.Module | None = ckpt.model.to(self.device).eval()
        self.cfg = ckpt.config
        self.task = self.cfg.task
        self.tokenizer = ckpt.tokenizer
        self.tokenizer.model_max_length = 10**9  # we truncate ourselves (and say so)
        limit = self.cfg.max_positions - self.cfg.position_offset
        self.max_length = min(int(ckpt.max_seq_length), limit)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.uses_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", []) and bool(
            self.cfg.type_vocab_size
        )
        # The request path tokenises through the `tokenizers` object under the transformers
        # wrapper (a copy without truncation or padding): the same ids, a third less time per call.
        self._fast = _plain_copy(getattr(self.tokenizer, "backend_tokenizer", None))
        self.eval_rows = {(float(r["width"]), float(r["depth"])): r for r in (ckpt.eval or [])}
        self.subnets = [self._subnet(w, d) for w, d in self.cfg.subnetworks()]

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, device: str = "cpu") -> Engine:
        path = Path(path)
        return cls(name or path.resolve().name, load_checkpoint(path, device="cpu"), device)

    def _subnet(self, w: float, d: float) -> Subnet:
        row = self.eval_rows.get((w, d), {})
        value = row.get("value")
        if value is None and isinstance(row.get("metrics"), dict):
            value = row["metrics"].get(row.get("metric") or self.task.metric)
        return Subnet(
            width=w,
            depth=d,
            params=int(row.get("params") or self.cfg.params(w, d)),
            flops=int(row.get("flops") or self.cfg.flops(w, d)),
            metric=float(value) if isinstance(value, int | float) else None,
        )

    @property
    def metric_name(self) -> str:
        names = {r.get("metric") for r in self.eval_rows.values() if r.get("metric")}
        return names.pop() if len(names) == 1 else self.task.metric

    # ---- inference (runs in the scheduler's worker thread) ---------------------------------

    def run(self, key: SubnetKey, rows: Sequence[Row], chunk: int = PIECE_ROWS) -> list[np.ndarray]:
        """Forward a batch of rows through sub-network ``key`` in this process; one logits array
        per row ((C,) classification/regression, (T_row, 2) QA, padding removed). Batches over
        ``chunk`` rows (a long QA context) run in pieces to bound memory. (With an inference
        worker process, the server's runner sends the same pieces there: service/app.py.)"""
        model = self.model
        if model is None:
            raise RuntimeError(f"model {self.name!r}: its weights live in its inference worker process")
        return [
            x
            for piece in pieces(rows, chunk)
            for x in self.unpack(forward(model, key, *self.pack(piece)), piece)
        ]

    def drop_weights(self) -> None:
        """Free this process's copy of the weights when the forward pass runs in an inference
        worker process (service/worker.py): the server keeps the tokenizer, config and eval table."""
        self.model = None
        self.ckpt.model = None  # type: ignore[assignment]  # (ckpt.config is self.cfg from here on)

    def pack(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows padded to one (B, T) batch: token ids, attention mask, token types (or None)."""
        T = max(len(r.input_ids) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        types = np.zeros((len(rows), T), dtype=np.int64) if self.uses_types else None
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = r.input_ids
            mask[i, :n] = 1
            if types is not None and r.token_type_ids is not None:
                types[i, :n] = r.token_type_ids
        return ids, mask, types

    def unpack(self, out: np.ndarray, rows: Sequence[Row]) -> list[np.ndarray]:
        """A batch's logits, one array per row (QA: cut to the row's own tokens)."""
        if self.task.type == "qa":
            return [out[i, : len(r.input_ids)] for i, r in enumerate(rows)]
        return list(out)

    # ---- classification / regression -------------------------------------------------------

    def encode_texts(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        """Tokenise texts (or text pairs); inputs over the model's maximum are truncated."""
        tok = self.tokenizer
        ids: list[list[int]]
        types: list[list[int]] | None
        if self._fast is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which only QA
            # reads (encode_qa goes through transformers): a fifth less time for one sentence
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
            encs = encode(list(texts) if pairs is None else list(zip(texts, pairs, strict=True)))
            ids = [e.ids for e in encs]
            types = [e.type_ids for e in encs] if self.uses_types else None
        else:
            enc = tok(list(texts), list(pairs) if pairs is not None else None, truncation=False)
            ids = enc["input_ids"]
            types = enc.get("token_type_ids") if self.uses_types else None
        long_rows = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if long_rows:  # re-encode just those, cut to the maximum (longest_first for pairs)
            again = tok(
                [texts[i] for i in long_rows],
                [pairs[i] for i in long_rows] if pairs is not None else None,
                truncation=True,
                max_length=self.max_length,
            )
            for j, i in enumerate(long_rows):
                ids[i] = again["input_ids"][j]
                if types is not None:
                    types[i] = again["token_type_ids"][j]
        rows = [Row(list(x), list(types[i]) if types is not None else None) for i, x in enumerate(ids)]
        return Encoded(rows, max(len(r.input_ids) for r in rows), len(long_rows))

    def postprocess_classify(self, logits: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        if self.task.type == "regression":
            return [{"value": float(x[0])} for x in logits]
        labels = self.task.labels
        x = np.stack(logits)  # one softmax over the batch, not a handful of numpy calls per row
        p = np.exp(x - x.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return [
            {"label": labels[k], "probability": row[k], "scores": dict(zip(labels, row, strict=True))}
            for k, row in zip(p.argmax(axis=1).tolist(), p.tolist(), strict=True)
        ]

    def classify_local(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        width: float = 1.0,
        depth: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Tokenise + forward + postprocess in this thread: the in-process cost of one request."""
        enc = self.encode_texts(texts, pairs)
        return self.postprocess_classify(self.run((float(width), float(depth)), enc.rows))

    # ---- extractive QA ---------------------------------------------------------------------

    def encode_qa(
        self, questions: Sequence[str], contexts: Sequence[str], doc_stride: int
    ) -> tuple[Encoded, Any]:
        """Windows of (question, context) (training/squad.py's build_features); returns the rows
        and the features object that decoding needs."""
        from training.squad import build_features

        feats = build_features(
            self.tokenizer, questions, contexts, max_length=self.max_length, doc_stride=doc_stride
        )
        types = feats.token_type_ids if self.uses_types else None
        rows = [Row(ids, types[i] if types is not None else None) for i, ids in enumerate(feats.input_ids)]
        return Encoded(rows, max(len(r.input_ids) for r in rows), 0), feats

    def postprocess_qa(
        self, logits: Sequence[np.ndarray], feats: Any, contexts: Sequence[str], max_answer_tokens: int
    ) -> list[dict[str, Any]]:
        from training.squad import decode_spans

        answers = decode_spans(
            [x[:, 0] for x in logits],
            [x[:, 1] for x in logits],
            feats,
            contexts,
            max_answer_length=max_answer_tokens,
        )
        return [
            {"answer": a.text, "start": a.start_char, "end": a.end_char, "score": a.score} for a in answers
        ]


def _plain_copy(backend: Any) -> Any:
    """A copy of a `tokenizers.Tokenizer` that neither truncates nor pads (None for None)."""
    if backend is None:
        return None
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_truncation()
    fast.no_padding()
    return fast


def pieces(rows: Sequence[Row], chunk: int = PIECE_ROWS) -> list[Sequence[Row]]:
    """A batch cut into forward passes of at most ``chunk`` rows (a long QA context makes many)."""
    return [rows[i : i + chunk] for i in range(0, len(rows), chunk)]


def forward(
    model: torch.nn.Module, key: SubnetKey, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None
) -> np.ndarray:
    """One padded batch through sub-network ``key`` of ``model``: float32 logits, (B, C) or
    (B, T, 2). Shared by the in-process engine and the inference worker process."""
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(
            torch.from_numpy(ids).to(dev),
            torch.from_numpy(mask).to(dev),
            torch.from_numpy(types).to(dev) if types is not None else None,
            width=key[0],
            depth=key[1],
        ).logits
        return out.float().cpu().numpy()
