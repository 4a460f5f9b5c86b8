"""Rewiring: permuting heads and neurons keeps the full network's function; rewire(importance)
puts the most important heads and neurons first, so width 0.25 keeps exactly those."""

from __future__ import annotations

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel

TASK = TaskSpec(type="classification", labels=("a", "b", "c"))


def tiny(**kw) -> DynaBertConfig:
    base = dict(
        vocab_size=100,
        hidden_size=32,
        num_layers=3,
        num_heads=8,
        ffn_size=48,
        max_positions=64,
        dropout=0.0,
        attention_dropout=0.0,
        task=TASK,
    )
    base.update(kw)
    return DynaBertConfig(**base)


def _model(cfg: DynaBertConfig, seed: int = 0) -> DynaBertModel:
    torch.manual_seed(seed)
    model = DynaBertModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and relative bias, so a wrong permutation shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "rel_bias" in name:
                p.normal_(std=0.5)
    return model


def _run(model: DynaBertModel, ids: torch.Tensor, mask: torch.Tensor):
    with torch.inference_mode():
        return model(ids, mask, width=1.0, depth=1.0, output_hidden_states=True)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_permutations_keep_the_full_network(arch: str, seed: int) -> None:
    extra = {
        "architecture": "mpnet",
        "type_vocab_size": 0,
        "relative_attention_buckets": 32,
        "pad_token_id": 1,
    }
    cfg = tiny(**(extra if arch == "mpnet" else {}))
    model = _model(cfg, seed)
    ids = torch.randint(5, cfg.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    before = _run(model, ids, mask)
    narrow_before = model(ids, mask, width=0.25).logits
    g = torch.Generator().manual_seed(100 + seed)
    for i in range(cfg.num_layers):
        model.reorder_heads(i, torch.randperm(cfg.num_heads, generator=g))
        model.reorder_neurons(i, torch.randperm(cfg.ffn_size, generator=g))
    after = _run(model, ids, mask)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=1e-5)
    for a, b in zip(after.hidden_states, before.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # ...while a narrow sub-network now sees other heads: the permutation really happened
    assert not torch.allclose(model(ids, mask, width=0.25).logits, narrow_before, atol=1e-4)


def test_rewire_keeps_the_most_important_heads_and_neurons_at_quarter_width() -> None:
    cfg = tiny(architecture="mpnet", type_vocab_size=0, relative_attention_buckets=32, pad_token_id=1)
    model = _model(cfg)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    head_imp = torch.rand(cfg.num_layers, cfg.num_heads, generator=g)
    neuron_imp = torch.rand(cfg.num_layers, cfg.ffn_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (2, 9))
    before = _run(model, ids, torch.ones_like(ids)).logits
    model.rewire(head_imp, neuron_imp)
    torch.testing.assert_close(_run(model, ids, torch.ones_like(ids)).logits, before, rtol=0, atol=1e-5)

    k, n, hs, H = cfg.num_kept_heads(0.25), cfg.num_kept_neurons(0.25), cfg.head_size, cfg.hidden_size
    assert (k, n) == (2, 12)
    sd = model.state_dict()
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        top_heads = torch.topk(head_imp[i], k).indices  # most important first
        top_neurons = torch.topk(neuron_imp[i], n).indices
        # what width 0.25 slices: the leading k heads' rows / n neurons' rows
        qkv_old = old[p + "qkv_weight"].view(cfg.num_heads, 3 * hs, H)
        assert torch.equal(sd[p + "qkv_weight"][: 3 * k * hs], qkv_old[top_heads].reshape(-1, H))
        assert torch.equal(
            sd[p + "qkv_bias"][: 3 * k * hs], old[p + "qkv_bias"].view(cfg.num_heads, -1)[top_heads].flatten()
        )
        out_old = old[p + "attn_out_weight_t"].view(cfg.num_heads, hs, H)
        assert torch.equal(sd[p + "attn_out_weight_t"][: k * hs], out_old[top_heads].reshape(-1, H))
        assert torch.equal(sd[p + "rel_bias"][:, :k], old[p + "rel_bias"][:, top_heads])
        assert torch.equal(sd[p + "ffn_in_weight"][:n], old[p + "ffn_in_weight"][top_neurons])
        assert torch.equal(sd[p + "ffn_in_bias"][:n], old[p + "ffn_in_bias"][top_neurons])
        assert torch.equal(sd[p + "ffn_out_weight_t"][:n], old[p + "ffn_out_weight_t"][top_neurons])
        # and the heads are in descending importance order
        kept_imp = head_imp[i][torch.argsort(head_imp[i], descending=True)]
        assert torch.all(kept_imp[:-1] >= kept_imp[1:])
        # shared parts never move
        for name in ("attn_out_bias", "ffn_out_bias", "attn_norm.weight", "ffn_norm.bias"):
            assert torch.equal(sd[p + name], old[p + name])


def test_rewire_validates_inputs() -> None:
    cfg = tiny()
    model = _model(cfg)
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        model.rewire(torch.rand(3, 7), torch.rand(3, 48))
    with pytest.raises(ValueError, match=r"\(3, 48\)"):
        model.rewire(torch.rand(3, 8), torch.rand(2, 48))
    with pytest.raises(ValueError, match="permutation"):
        model.reorder_heads(0, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="permutation"):
        model.reorder_neurons(1, torch.arange(47))
