"""Taylor importance + rewiring: the full network's function is kept, scores follow the weights,
and narrow widths keep the most important heads and neurons."""

from __future__ import annotations

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel
from training.importance import compute_importance, rewire_by_importance

TASK = TaskSpec(
    type="classification", name="sst2", labels=("negative", "positive"), text_fields=("sentence",)
)


def _model(seed: int = 0) -> DynaBertModel:
    torch.manual_seed(seed)
    cfg = DynaBertConfig(
        vocab_size=200,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        ffn_size=48,
        max_positions=64,
        dropout=0.0,
        attention_dropout=0.0,
        task=TASK,
    )
    return DynaBertModel(cfg).eval()


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:3, 9:] = 0  # some padding
        out.append(
            {
                "input_ids": torch.randint(5, 200, (8, 12), generator=g) * mask,
                "attention_mask": mask,
                "token_type_ids": torch.zeros(8, 12, dtype=torch.long),
                "labels": torch.randint(0, 2, (8,), generator=g),
            }
        )
    return out


def test_rewiring_keeps_the_function_and_sorts_importance():
    model = _model()
    batches = _batches()
    x = batches[0]
    before = model(x["input_ids"], x["attention_mask"], x["token_type_ids"]).logits
    heads, neurons = rewire_by_importance(model, batches)
    after = model(x["input_ids"], x["attention_mask"], x["token_type_ids"]).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert heads.shape == (3, 4) and neurons.shape == (3, 48) and (heads >= 0).all() and (neurons >= 0).all()
    # rescoring the rewired model gives the same scores, now in descending order in every layer
    heads2, neurons2 = compute_importance(model, batches)
    torch.testing.assert_close(heads2, heads.sort(dim=1, descending=True).values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(neurons2, neurons.sort(dim=1, descending=True).values, atol=1e-5, rtol=1e-4)


def test_head_score_is_the_gradient_of_the_head_mask():
    model = _model(seed=3)
    b = _batches(1)[0]
    heads, _ = compute_importance(model, [b])
    mask = torch.ones(3, 4, requires_grad=True)
    out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head_mask=mask)
    torch.nn.functional.cross_entropy(out.logits, b["labels"]).backward()
    torch.testing.assert_close(heads, mask.grad.abs())
    # a dead head (zero output projection) scores exactly 0
    model2 = _model(seed=3)
    with torch.no_grad():
        model2.layers[1].attn_out_weight_t[8:16] = 0  # head 1 of layer 1 (head size 8)
    heads2, _ = compute_importance(model2, [b])
    assert heads2[1, 1].item() == pytest.approx(0.0, abs=1e-9)
    assert heads2[1].max().item() > 0


def test_rewired_narrow_network_keeps_important_units():
    model = _model(seed=5)
    batches = _batches()
    heads, neurons = compute_importance(model, batches)
    top_head = int(heads[0].argmax())
    top_neuron = int(neurons[0].argmax())
    w_head = model.layers[0].qkv_weight.view(4, 24, 32)[top_head].clone()
    w_neuron = model.layers[0].ffn_in_weight[top_neuron].clone()
    model.rewire(heads, neurons)
    torch.testing.assert_close(model.layers[0].qkv_weight.view(4, 24, 32)[0], w_head)
    torch.testing.assert_close(model.layers[0].ffn_in_weight[0], w_neuron)
