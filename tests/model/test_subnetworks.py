"""Every (width, depth) of a tiny config: shapes, kept layers, teacher maps, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel

CLS = TaskSpec(type="classification", labels=("neg", "pos"))
REG = TaskSpec(type="regression", metric="pearson")
QA = TaskSpec(type="qa", text_fields=("question", "context"), metric="f1")


def tiny(task: TaskSpec = CLS, **kw) -> DynaBertConfig:
    base = dict(
        vocab_size=100,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        ffn_size=64,
        max_positions=64,
        dropout=0.0,
        attention_dropout=0.0,
        task=task,
    )
    base.update(kw)
    return DynaBertConfig(**base)


def test_design_examples_for_twelve_layers() -> None:
    cfg = DynaBertConfig(task=CLS)  # BERT-base shape: 12 layers, 12 heads, 3072 neurons
    assert cfg.kept_layers(1.0) == tuple(range(12))
    kept = cfg.kept_layers(0.75)
    assert sorted(set(range(12)) - set(kept)) == [3, 7, 11]
    assert cfg.kept_layers(0.5) == (0, 2, 4, 6, 8, 10)
    # kept layer k distils towards the teacher output just before the next kept layer
    assert cfg.teacher_layers(0.5) == (1, 3, 5, 7, 9, 11)
    assert cfg.teacher_layers(0.75) == (0, 1, 3, 4, 5, 7, 8, 9, 11)
    assert cfg.teacher_layers(1.0) == tuple(range(12))
    assert [cfg.num_kept_heads(w) for w in (1.0, 0.75, 0.5, 0.25)] == [12, 9, 6, 3]
    assert [cfg.num_kept_neurons(w) for w in (1.0, 0.75, 0.5, 0.25)] == [3072, 2304, 1536, 768]


def test_half_up_rounding_on_six_layers() -> None:
    cfg = DynaBertConfig(
        num_layers=6, hidden_size=384, task=CLS
    )  # MiniLM-L6 depth: 0.75 * 6 = 4.5 -> 5 layers
    assert len(cfg.kept_layers(0.75)) == 5
    assert cfg.kept_layers(0.5) == (0, 2, 4)


@pytest.mark.parametrize("task", [CLS, REG, QA], ids=lambda t: t.type)
def test_every_subnetwork_runs_with_right_shapes(task: TaskSpec) -> None:
    torch.manual_seed(0)
    cfg = tiny(task)
    model = DynaBertModel(cfg).eval()
    B, T = 3, 10
    ids = torch.randint(5, cfg.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # one padded row
    seen = set()
    for w, d in cfg.subnetworks():
        assert len(cfg.subnetworks()) == 12
        with torch.inference_mode():
            out = model(ids, mask, width=w, depth=d, output_hidden_states=True)
        want = {"classification": (B, 2), "regression": (B, 1), "qa": (B, T, 2)}[task.type]
        assert tuple(out.logits.shape) == want
        assert torch.isfinite(out.logits).all()
        kept = cfg.kept_layers(d)
        assert len(out.hidden_states) == len(kept) + 1
        assert all(tuple(h.shape) == (B, T, cfg.hidden_size) for h in out.hidden_states)
        assert out.teacher_layers == cfg.teacher_layers(d)
        assert len(out.teacher_layers) == len(kept)
        assert out.teacher_layers[-1] == cfg.num_layers - 1
        seen.add(out.logits.flatten()[:4].tolist().__repr__())
    assert len(seen) == 12  # every sub-network computes something different


def test_kept_layers_are_the_ones_that_run() -> None:
    """Hidden states of sub-network (1.0, d) equal the full network's layers applied in `kept` order."""
    torch.manual_seed(1)
    cfg = tiny(num_layers=6)
    model = DynaBertModel(cfg).eval()
    ids = torch.randint(5, cfg.vocab_size, (2, 7))
    with torch.inference_mode():
        for d in (1.0, 0.75, 0.5, 0.3):
            out = model(ids, width=1.0, depth=d, output_hidden_states=True)
            x = out.hidden_states[0]
            for k, i in enumerate(cfg.kept_layers(d)):
                x = model.layers[i](x, None, cfg.num_heads, cfg.ffn_size)
                torch.testing.assert_close(x, out.hidden_states[k + 1], rtol=0, atol=1e-6)


def test_width_changes_head_and_neuron_counts() -> None:
    cfg = tiny(num_heads=8, hidden_size=64, ffn_size=100)
    assert [cfg.num_kept_heads(w) for w in cfg.widths] == [8, 6, 4, 2]
    assert [cfg.num_kept_neurons(w) for w in cfg.widths] == [100, 75, 50, 25]
    # params and FLOPs shrink monotonically along both axes
    for w, d in cfg.subnetworks():
        assert cfg.params(w, d) <= cfg.params(1.0, 1.0)
        assert cfg.flops(w, d) <= cfg.flops(1.0, 1.0)
    assert math.isclose(cfg.flops(0.5, 0.5) / cfg.flops(), 0.25, rel_tol=1e-9)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, -1, 1.01, 2, float("nan"), float("inf"), "0.5", None, 0.1])
def test_invalid_width_raises_value_error(bad) -> None:
    cfg = tiny()  # 4 heads: 0.1 keeps round(0.4) = 0 heads
    model = DynaBertModel(cfg).eval()
    ids = torch.randint(5, cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="width") as e:
        model(ids, width=bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


@pytest.mark.parametrize("bad", [0, -0.25, 1.5, float("nan"), "1", None, 0.1])
def test_invalid_depth_raises_value_error(bad) -> None:
    cfg = tiny()  # 4 layers: 0.1 keeps round(0.4) = 0 layers
    model = DynaBertModel(cfg).eval()
    ids = torch.randint(5, cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="depth") as e:
        model(ids, depth=bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_off_grid_values_work_at_inference() -> None:
    cfg = tiny()
    model = DynaBertModel(cfg).eval()
    ids = torch.randint(5, cfg.vocab_size, (1, 4))
    out = model(ids, width=0.6, depth=0.4, output_hidden_states=True)  # 2 heads, 2 layers
    assert len(out.hidden_states) == 3
    assert model(ids, width=1, depth=1).logits.shape == (1, 2)  # ints are numbers too


def test_bool_is_not_a_width() -> None:
    cfg = tiny()
    with pytest.raises(ValueError):
        cfg.num_kept_heads(True)


def test_too_long_sequence_raises() -> None:
    cfg = tiny()
    model = DynaBertModel(cfg).eval()
    with pytest.raises(ValueError, match="65"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_invalid_grid_in_config_raises() -> None:
    with pytest.raises(ValueError, match="width"):
        tiny(widths=(1.0, 0.1))
    with pytest.raises(ValueError, match="depth"):
        tiny(depths=(1.0, 0.0))


def test_inference_fast_path_matches_the_training_path_with_gradients() -> None:
    """Without dropout the output projections accumulate into (x + bias) in place; with dropout
    they take the plain path. Both must compute the same outputs and the same gradients."""
    torch.manual_seed(0)
    fused = DynaBertModel(tiny(dropout=0.0)).train()
    plain = DynaBertModel(tiny(dropout=1e-12)).train()  # p > 0 takes the dropout path, drops nothing
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for w, d in [(1.0, 1.0), (0.5, 0.75)]:
        a = fused(ids, mask, width=w, depth=d).logits
        b = plain(ids, mask, width=w, depth=d).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        a.square().sum().backward()
        b.square().sum().backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            if p.grad is None:
                assert q.grad is None, name
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        fused.zero_grad()
        plain.zero_grad()


def test_head_dim_lets_an_exported_model_keep_fewer_heads_of_the_same_size() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        tiny(num_heads=3)  # 32 / 3 heads: no head size
    cfg = tiny(num_heads=3, head_dim=8)  # 3 heads of 8 on hidden 32, as `dynabert export` writes
    assert (cfg.head_size, cfg.attention_size) == (8, 24)
    model = DynaBertModel(cfg).eval()
    assert tuple(model.layers[0].qkv_weight.shape) == (72, 32)
    assert tuple(model.layers[0].attn_out_weight_t.shape) == (24, 32)
    assert model(torch.randint(5, 100, (2, 6)), width=0.34).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="head_dim"):
        tiny(head_dim=-1)
