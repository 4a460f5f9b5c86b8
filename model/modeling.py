"""The DynaBERT encoder and its task heads, in one file.

One set of parameters serves every (width, depth) sub-network (Hou et al., NeurIPS 2020).
Choosing a sub-network slices views of the shared weights and copies nothing. Every slice is
a leading block of rows of a row-major tensor, so it is contiguous and a sliced matmul runs
at dense speed:

* Q, K and V are fused per head: ``qkv_weight`` is (num_heads * 3 * head_size, hidden), laid
  out as (head, {q,k,v}, head_size). Keeping the first k heads keeps its first k*3*hs rows.
* The attention output and FFN output projections are stored transposed, (in, out), so
  keeping the first k heads / n neurons keeps their first rows too.

The layout (post-LayerNorm, GELU, learned absolute positions) matches BERT and RoBERTa;
MPNet adds a relative position bias shared by all layers. Attention runs through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DynaBertConfig


@dataclass(frozen=True)
class SubnetPlan:
    """What sub-network (width, depth) keeps: heads and neurons per layer, which layers, and the
    teacher layer each kept layer is distilled towards. Computed once per (width, depth)."""

    n_heads: int
    n_neurons: int
    kept: tuple[int, ...]
    teacher: tuple[int, ...]


UNPAD_MAX_REAL = 0.9  # the unpadded forward pays off once at least a tenth of a batch is padding


def _tracing() -> bool:
    """True while torch.jit.trace / torch.export / torch.compile record the forward."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@dataclass
class DynaBertOutput:
    logits: Tensor  # (B, C) classification, (B, 1) regression, (B, T, 2) qa
    hidden_states: tuple[Tensor, ...] | None = None  # embedding output, then each kept layer's output
    teacher_layers: tuple[int, ...] | None = None  # for each kept layer, the teacher layer it maps to


@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of a right-padded (B, T) batch are: ``index`` holds the flat
    positions (b*T + t) of the N tokens the mask keeps, in order, so row b's tokens are a run of
    ``lengths[b]`` starting at ``starts[b]``. The idea of running a transformer's dense layers on
    the unpadded tokens alone is ByteDance's Effective Transformer / ByteTransformer's."""

    index: Tensor  # (N,) long
    starts: Tensor  # (B,) long
    lengths: Tensor  # (B,) long
    B: int
    T: int

    @classmethod
    def of(cls, attention_mask: Tensor) -> Unpadded:
        B, T = attention_mask.shape
        keep = attention_mask.reshape(-1).bool()
        lengths = attention_mask.bool().sum(1)
        return cls(keep.nonzero().squeeze(1), torch.cumsum(lengths, 0) - lengths, lengths, B, T)

    def unpad(self, x: Tensor) -> Tensor:
        """(B*T, ...) -> (N, ...)."""
        return x.index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B*T, ...), zeros at the padding."""
        return x.new_zeros((self.B * self.T, *x.shape[1:])).index_copy_(0, self.index, x)


class Embeddings(nn.Module):
    def __init__(self, cfg: DynaBertConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, H)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, H) if cfg.type_vocab_size else None
        self.layer_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def position_ids(self, input_ids: Tensor) -> Tensor:
        if self.cfg.position_offset:  # RoBERTa/MPNet: pads keep pad_id, real tokens count from pad_id + 1
            mask = input_ids.ne(self.cfg.pad_token_id).int()
            return torch.cumsum(mask, dim=1) * mask + self.cfg.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.word_embeddings(input_ids)  # (B, T, H)
        if self.cfg.position_offset:
            x = x + self.position_embeddings(self.position_ids(input_ids))
        else:  # BERT: positions 0..T-1 are the table's first T rows, a view (no gather)
            x = x + self.position_embeddings.weight[: input_ids.shape[1]]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.layer_norm(x))  # (B, T, H)


class Layer(nn.Module):
    """One post-LN transformer layer whose heads and FFN neurons can be cut from the right."""

    def __init__(self, cfg: DynaBertConfig):
        super().__init__()
        self.cfg = cfg
        H, F_, A = cfg.hidden_size, cfg.ffn_size, cfg.attention_size  # A = heads * hs (= H unless exported)
        self.qkv_weight = nn.Parameter(torch.empty(3 * A, H))  # rows: (head, {q,k,v}, hs)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * A))
        self.attn_out_weight_t = nn.Parameter(torch.empty(A, H))  # (heads*hs in, H out)
        self.attn_out_bias = nn.Parameter(torch.zeros(H))
        self.attn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.ffn_in_weight = nn.Parameter(torch.empty(F_, H))  # (neurons, H)
        self.ffn_in_bias = nn.Parameter(torch.zeros(F_))
        self.ffn_out_weight_t = nn.Parameter(torch.empty(F_, H))  # (neurons in, H out)
        self.ffn_out_bias = nn.Parameter(torch.zeros(H))
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        # MPNet's relative position bias (buckets, heads). MPNet shares one table across layers;
        # we keep a copy per layer so that rewiring can permute each layer's heads on its own.
        nb = cfg.relative_attention_buckets
        self.rel_bias = nn.Parameter(torch.zeros(nb, cfg.num_heads)) if nb else None

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        n_heads: int,
        n_neurons: int,
        head_mask: Tensor | None = None,
        buckets: Tensor | None = None,
        rows: Unpadded | None = None,
    ) -> Tensor:
        """x (B, T, H) -> (B, T, H); or, given ``rows``, x (N, H), a batch's N unpadded tokens ->
        (N, H): the projections, LayerNorms and FFN then touch those N rows only, and attention
        alone scatters Q, K, V back to the padded (B, T) grid it needs and gathers its output."""
        B, T = (rows.B, rows.T) if rows is not None else x.shape[:2]
        hs = self.cfg.head_size
        a = n_heads * hs
        if buckets is not None:  # (T, T) bucket ids -> additive bias (1, k, T, T), pads still masked
            bias = self.rel_bias[buckets][:, :, :n_heads].permute(2, 0, 1).unsqueeze(0)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        qkv = F.linear(x, self.qkv_weight[: 3 * a], self.qkv_bias[: 3 * a])  # (B, T or N, k*3*hs)
        if rows is not None:
            qkv = rows.pad(qkv)  # (B*T, k*3*hs)
        qkv = qkv.view(B, T, n_heads, 3, hs).permute(3, 0, 2, 1, 4)  # (3, B, k, T, hs)
        q, k, v = qkv.unbind(0)  # each (B, k, T, hs)
        p = self.cfg.attention_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, k, T, hs)
        if head_mask is not None:  # (k,) multiplies each head's output; used for importance scores
            ctx = ctx * head_mask.view(1, n_heads, 1, 1)
        ctx = ctx.transpose(1, 2).reshape(B * T, a)  # (B*T, k*hs)
        if rows is not None:
            ctx = rows.unpad(ctx)  # (N, k*hs)
        x = self.attn_norm(self._residual(x, ctx, self.attn_out_weight_t[:a], self.attn_out_bias))
        h = F.gelu(F.linear(x, self.ffn_in_weight[:n_neurons], self.ffn_in_bias[:n_neurons]))  # (..., n)
        return self.ffn_norm(
            self._residual(x, h.reshape(-1, n_neurons), self.ffn_out_weight_t[:n_neurons], self.ffn_out_bias)
        )

    def _residual(self, x: Tensor, inp: Tensor, weight_t: Tensor, bias: Tensor) -> Tensor:
        """x + dropout(inp @ weight_t + bias) for x (B, T, H) or (N, H), inp (B*T or N, n),
        weight_t (n, H)."""
        if self.training and self.dropout.p > 0:
            return x + self.dropout(torch.addmm(bias, inp, weight_t).view_as(x))
        if inp.dtype != weight_t.dtype or _autocast_on(inp.device.type):
            # mixed precision (a teacher under bf16 autocast): in-place ops are not autocast, so
            # take the out-of-place GEMM, which autocast runs in bf16
            return x + torch.addmm(bias, inp, weight_t).view_as(x)
        # inference: start from x + bias and let the GEMM accumulate into it (beta = 1), which
        # saves the pass that copies the bias into a fresh output and the separate residual add
        return (x + bias).view(-1, x.shape[-1]).addmm_(inp, weight_t).view_as(x)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for one autocast does not know, such as
    "meta", which the tests use as an accelerator that cannot be read back)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def relative_position_bucket(
    relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bidirectional log-spaced buckets of (key - query) offsets, as MPNet/T5 define them:
    half the buckets per direction, exact for small offsets, logarithmic up to max_distance."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half  # keys to the right use the upper half
    n = relative_position.abs()
    exact = half // 2
    log_ratio = torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, large)


class DynaBertModel(nn.Module):
    """Encoder + task head. ``forward(..., width=w, depth=d)`` runs sub-network (w, d)."""

    def __init__(self, cfg: DynaBertConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        if cfg.task.type == "qa":
            self.qa_outputs = nn.Linear(H, 2)
        else:  # BERT pooler (RoBERTa's classification head): tanh(dense(h_CLS or mean h)), classifier
            self.pooler = nn.Linear(H, H)
            self.classifier = nn.Linear(H, cfg.task.num_outputs)
        self.dropout = nn.Dropout(cfg.dropout)
        self.apply(self._init_weights)
        self._plans: dict[tuple, SubnetPlan] = {}  # (width, depth) -> plan; ints only, never tensors

    def plan(self, width: float, depth: float) -> SubnetPlan:
        """The validated plan of sub-network (width, depth); raises ValueError for a bad value."""
        key = (type(width), width, type(depth), depth)  # types too: True == 1.0 but is no width
        try:
            return self._plans[key]
        except (KeyError, TypeError):  # TypeError: unhashable, so certainly not a valid number
            pass
        cfg = self.cfg
        plan = SubnetPlan(
            n_heads=cfg.num_kept_heads(width),
            n_neurons=cfg.num_kept_neurons(width),
            kept=cfg.kept_layers(depth),
            teacher=cfg.teacher_layers(depth),
        )
        if len(self._plans) < 1024:  # any float in (0, 1] is allowed: keep the cache bounded
            self._plans[key] = plan
        return plan

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, Layer):
            for p in (m.qkv_weight, m.attn_out_weight_t, m.ffn_in_weight, m.ffn_out_weight_t):
                nn.init.normal_(p, std=0.02)
        elif isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def position_buckets(self, T: int, device: torch.device) -> Tensor | None:
        if not self.cfg.relative_attention_buckets:
            return None
        pos = torch.arange(T, device=device)
        return relative_position_bucket(
            pos[None, :] - pos[:, None], self.cfg.relative_attention_buckets
        )  # (T, T)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        width: float = 1.0,
        depth: float = 1.0,
        output_hidden_states: bool = False,
        head_mask: Tensor | None = None,
        unpad: bool | None = None,
    ) -> DynaBertOutput:
        """Run sub-network (width, depth). ``head_mask`` is (num_layers, num_heads), used to score heads.

        ``unpad``: run the layers on the real tokens alone (:class:`Unpadded`), which makes a
        padded batch cost what its tokens need rather than rows x the longest row. None (the
        default) does so where it is exact and pays, which is serving: under
        ``torch.inference_mode()`` on the CPU, outside autocast and tracing, with padding in the
        batch (a tenth of it at least), no hidden states or head mask asked for, and (CLS
        pooling) every row starting at column 0. Training and evaluation (``no_grad``) keep the
        padded path. Unpadded, QA logits at padding are -inf rather than whatever the padded pass
        computed there."""
        cfg = self.cfg
        plan = self.plan(width, depth)
        n_heads, n_neurons = plan.n_heads, plan.n_neurons
        B, T = input_ids.shape
        if T > cfg.max_positions - cfg.position_offset:
            raise ValueError(
                f"sequence length {T} exceeds the model's {cfg.max_positions - cfg.position_offset}"
            )

        buckets = self.position_buckets(T, input_ids.device)
        # None lets SDPA take its fastest path when nothing is padded. Finding that out reads the
        # mask on the host: free on the CPU, but on an accelerator a wait for every kernel queued
        # before it, once per forward (16 a stage-3 training step), so there the mask always goes in.
        attn_mask = None
        on_host = attention_mask is not None and attention_mask.device.type == "cpu"
        if attention_mask is not None and (_tracing() or not on_host or not bool(attention_mask.all())):
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys that take part

        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        if unpad is None:
            unpad = (
                attn_mask is not None
                and on_host
                and not self.training
                and not _tracing()
                and head_mask is None
                and not output_hidden_states
                and not _autocast_on("cpu")
                and torch.is_inference_mode_enabled()
                and (self.cfg.pooling != "cls" or bool(attention_mask[:, 0].all()))
                # the gathers cost about what a tenth of the tokens do (the smallest sub-network
                # of MiniLM-L6, two SST-2 sentences 90% real: 3.40 ms padded, 3.58 unpadded)
                and int(attention_mask.sum()) <= UNPAD_MAX_REAL * B * T
            )
        rows = None
        if unpad and attention_mask is not None:
            if output_hidden_states or head_mask is not None:
                raise ValueError("unpad=True returns no hidden states and takes no head mask")
            rows = Unpadded.of(attention_mask)
            x = rows.unpad(x.reshape(B * T, -1))  # (N, H)
        hidden = [x] if output_hidden_states else None
        for i in plan.kept:
            hm = head_mask[i, :n_heads] if head_mask is not None else None
            x = self.layers[i](x, attn_mask, n_heads, n_neurons, hm, buckets, rows)
            if hidden is not None:
                hidden.append(x)

        if cfg.task.type == "qa":
            logits = self.qa_outputs(x)  # (B, T, 2), or (N, 2) unpadded
            if rows is not None:  # back on the (B, T) grid; padding gets -inf (no answer starts there)
                logits = logits.new_full((B * T, 2), float("-inf")).index_copy_(0, rows.index, logits)
                logits = logits.view(B, T, 2)
        else:
            pooled = torch.tanh(self.pooler(self.pool(x, attention_mask, rows)))  # (B, H)
            logits = self.classifier(self.dropout(pooled))  # (B, C)
        return DynaBertOutput(
            logits=logits,
            hidden_states=tuple(hidden) if hidden is not None else None,
            teacher_layers=plan.teacher if output_hidden_states else None,
        )

    def pool(self, x: Tensor, attention_mask: Tensor | None, rows: Unpadded | None = None) -> Tensor:
        """(B, T, H) -> (B, H): the first token, or the mean over the tokens the mask keeps; or,
        given ``rows``, the same from x (N, H), the unpadded tokens (CLS: each row's first real
        token, which is column 0 where the default takes the unpadded path)."""
        if rows is not None:
            if self.cfg.pooling == "cls":  # (clamped: an empty last row must not index past N)
                return x.index_select(0, rows.starts.clamp(max=max(x.shape[0] - 1, 0)))
            owner = torch.repeat_interleave(torch.arange(rows.B, device=x.device), rows.lengths)
            count = rows.lengths.clamp(min=1).unsqueeze(1).to(x.dtype)  # (B, 1)
            return x.new_zeros(rows.B, x.shape[1]).index_add_(0, owner, x) / count
        if self.cfg.pooling == "cls":
            return x[:, 0]
        if attention_mask is None:
            return x.mean(1)
        m = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)

    # ---- rewiring ------------------------------------------------------------------------

    @torch.no_grad()
    def reorder_heads(self, layer: int, order: Tensor) -> None:
        """Permute layer ``layer``'s heads so that new head j is old head order[j]."""
        cfg, lyr = self.cfg, self.layers[layer]
        hs, H, A = cfg.head_size, cfg.hidden_size, cfg.attention_size
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(cfg.num_heads)):
            raise ValueError(f"head order for layer {layer} is not a permutation of 0..{cfg.num_heads - 1}")
        lyr.qkv_weight.copy_(lyr.qkv_weight.view(cfg.num_heads, 3 * hs, H)[order].reshape(3 * A, H))
        lyr.qkv_bias.copy_(lyr.qkv_bias.view(cfg.num_heads, 3 * hs)[order].reshape(3 * A))
        lyr.attn_out_weight_t.copy_(lyr.attn_out_weight_t.view(cfg.num_heads, hs, H)[order].reshape(A, H))
        if lyr.rel_bias is not None:
            lyr.rel_bias.copy_(lyr.rel_bias[:, order])

    @torch.no_grad()
    def reorder_neurons(self, layer: int, order: Tensor) -> None:
        """Permute layer ``layer``'s FFN neurons so that new neuron j is old neuron order[j]."""
        lyr = self.layers[layer]
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(self.cfg.ffn_size)):
            raise ValueError(
                f"neuron order for layer {layer} is not a permutation of 0..{self.cfg.ffn_size - 1}"
            )
        lyr.ffn_in_weight.copy_(lyr.ffn_in_weight[order])
        lyr.ffn_in_bias.copy_(lyr.ffn_in_bias[order])
        lyr.ffn_out_weight_t.copy_(lyr.ffn_out_weight_t[order])

    def rewire(self, head_importance: Tensor, neuron_importance: Tensor) -> None:
        """Network rewiring: sort every layer's heads (L, nh) and neurons (L, d_ff) by importance,
        most important first, so that narrower widths keep the most important ones."""
        cfg = self.cfg
        if tuple(head_importance.shape) != (cfg.num_layers, cfg.num_heads):
            raise ValueError(
                f"head_importance must be {(cfg.num_layers, cfg.num_heads)}, got {tuple(head_importance.shape)}"
            )
        if tuple(neuron_importance.shape) != (cfg.num_layers, cfg.ffn_size):
            raise ValueError(
                f"neuron_importance must be {(cfg.num_layers, cfg.ffn_size)}, got {tuple(neuron_importance.shape)}"
            )
        for i in range(cfg.num_layers):
            self.reorder_heads(i, torch.argsort(head_importance[i], descending=True, stable=True))
            self.reorder_neurons(i, torch.argsort(neuron_importance[i], descending=True, stable=True))
