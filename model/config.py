"""Frozen configuration for a DynaBERT model and the width/depth rules of its sub-networks.

The rules follow Hou et al., "DynaBERT: Dynamic BERT with Adaptive Width and Depth"
(NeurIPS 2020) as written in DESIGN.md section 2:

* width m_w keeps the leftmost round(m_w * num_heads) heads and round(m_w * ffn_size)
  FFN neurons of every layer (hidden size, embeddings, LayerNorms and heads never shrink);
* depth m_d keeps layers floor(i / m_d) for i < round(m_d * num_layers).

Rounding is half-up (0.75 * 6 layers = 4.5 -> 5), not Python's banker's rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ARCHITECTURES = ("bert", "roberta", "mpnet")
TASK_TYPES = ("classification", "regression", "qa")
DEFAULT_WIDTHS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_DEPTHS = (1.0, 0.75, 0.5)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class TaskSpec:
    """What the head predicts and how inputs are read."""

    type: Literal["classification", "regression", "qa"] = "classification"
    name: str = ""  # e.g. "sst2", "squad"
    labels: tuple[str, ...] = ()  # class names for classification
    text_fields: tuple[str, ...] = ("text",)  # one field, or two for sentence pairs / (question, context)
    metric: str = "accuracy"  # the headline dev metric used to rank sub-networks

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task type must be one of {TASK_TYPES}, got {self.type!r}")
        if self.type == "classification" and len(self.labels) < 2:
            raise ValueError(f"a classification task needs at least 2 labels, got {self.labels!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "text_fields", tuple(self.text_fields))

    @property
    def num_outputs(self) -> int:
        if self.type == "classification":
            return len(self.labels)
        return 1 if self.type == "regression" else 2  # qa: start and end logits per token


@dataclass(frozen=True)
class DynaBertConfig:
    """Architecture of the full (teacher-sized) network plus its trained sub-network grid."""

    architecture: Literal["bert", "roberta", "mpnet"] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2  # 0 means no token-type embeddings (MPNet)
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    relative_attention_buckets: int = 0  # MPNet's shared relative position bias; 0 = none
    head_dim: int = 0  # 0 = hidden_size // num_heads; set by `dynabert export` when it drops heads
    # what the classification head reads: the first token ("cls", BERT's pooler) or the mean of the
    # non-padding tokens ("mean", how sentence-transformers backbones such as all-MiniLM-L6-v2 were
    # trained, so their last layer already holds a mean-pooled sentence representation)
    pooling: Literal["cls", "mean"] = "cls"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    widths: tuple[float, ...] = DEFAULT_WIDTHS
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    task: TaskSpec = field(default_factory=lambda: TaskSpec(labels=("0", "1")))

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.num_heads < 1 or self.head_dim < 0:
            raise ValueError(f"num_heads {self.num_heads} and head_dim {self.head_dim} must be positive")
        if not self.head_dim and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        for w in self.widths:
            self.num_kept_heads(w)
        for d in self.depths:
            self.kept_layers(d)

    # ---- sub-network rules -------------------------------------------------------------

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def attention_size(self) -> int:
        """num_heads * head_size: the width of Q, K, V (the hidden size unless heads were exported away)."""
        return self.num_heads * self.head_size

    @property
    def position_offset(self) -> int:
        """RoBERTa and MPNet number positions from pad_token_id + 1."""
        return self.pad_token_id + 1 if self.architecture in ("roberta", "mpnet") else 0

    def num_kept_heads(self, width: float) -> int:
        if isinstance(width, bool) or not (isinstance(width, int | float) and 0.0 < width <= 1.0):
            raise ValueError(f"width must be in (0, 1], got {width!r}")
        n = _round_half_up(width * self.num_heads)
        if n < 1:
            raise ValueError(f"width {width} keeps no attention head of {self.num_heads}")
        return n

    def num_kept_neurons(self, width: float) -> int:
        self.num_kept_heads(width)
        return max(1, _round_half_up(width * self.ffn_size))

    def kept_layers(self, depth: float) -> tuple[int, ...]:
        if isinstance(depth, bool) or not (isinstance(depth, int | float) and 0.0 < depth <= 1.0):
            raise ValueError(f"depth must be in (0, 1], got {depth!r}")
        n = _round_half_up(depth * self.num_layers)
        if n < 1:
            raise ValueError(f"depth {depth} keeps no layer of {self.num_layers}")
        kept: list[int] = []
        for i in range(n):
            j = min(int(math.floor(i / depth + 1e-6)), self.num_layers - 1)
            if not kept or j > kept[-1]:
                kept.append(j)
        return tuple(kept)

    def teacher_layers(self, depth: float) -> tuple[int, ...]:
        """For each kept layer, the teacher layer whose output it is distilled towards:
        the one just before the next kept layer, the last kept layer to the final output."""
        kept = self.kept_layers(depth)
        return tuple([nxt - 1 for nxt in kept[1:]] + [self.num_layers - 1])

    def subnetworks(self) -> list[tuple[float, float]]:
        """The trained grid, largest first: [(width, depth), ...]."""
        return [(w, d) for w in self.widths for d in self.depths]

    def params(self, width: float = 1.0, depth: float = 1.0, *, include_embeddings: bool = True) -> int:
        """Parameters used by a sub-network (embeddings and heads included by default)."""
        H, hs = self.hidden_size, self.head_size
        a = self.num_kept_heads(width) * hs
        f = self.num_kept_neurons(width)
        per_layer = (3 * a * H + 3 * a) + (a * H + H) + (H * f + f) + (f * H + H) + 4 * H
        per_layer += self.relative_attention_buckets * self.num_kept_heads(width)
        total = per_layer * len(self.kept_layers(depth))
        if include_embeddings:
            total += (self.vocab_size + self.max_positions + self.type_vocab_size) * H + 2 * H
        n_out = self.task.num_outputs
        total += (H * n_out + n_out) if self.task.type == "qa" else (H * H + H + H * n_out + n_out)
        return total

    def flops(self, width: float = 1.0, depth: float = 1.0, seq_len: int = 128) -> int:
        """Forward FLOPs (2 per multiply-add) of the encoder layers for one sequence."""
        T, H, hs = seq_len, self.hidden_size, self.head_size
        a = self.num_kept_heads(width) * hs
        f = self.num_kept_neurons(width)
        per_layer = 2 * T * H * 3 * a + 2 * 2 * T * T * a + 2 * T * a * H + 2 * 2 * T * H * f
        return per_layer * len(self.kept_layers(depth))

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        d["task"]["labels"], d["task"]["text_fields"] = list(self.task.labels), list(self.task.text_fields)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DynaBertConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}")
        d = dict(d)
        task = d.pop("task", {})
        task_known = {f.name for f in fields(TaskSpec)}
        if set(task) - task_known:
            raise ValueError(f"unknown task field(s) {sorted(set(task) - task_known)}")
        return cls(**d, task=TaskSpec(**task))
