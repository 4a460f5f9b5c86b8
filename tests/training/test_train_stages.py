"""Pieces of the stages: sub-network sampling (sandwich rule), the learning-rate schedule, the
frozen teacher, recipes as data."""

from __future__ import annotations

import random

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel
from training import stages as S
from training.losses import DistillLoss
from training.recipes import FULL, QUICK, get_recipe

GRID = DynaBertConfig(task=TaskSpec(type="regression")).subnetworks()


def test_sampling_always_has_largest_and_smallest():
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        picked = S.sample_subnetworks(GRID, 4, rng)
        assert len(picked) == 4 and (1.0, 1.0) in picked and (0.25, 0.5) in picked
        assert picked == sorted(picked, reverse=True)
        seen.update(picked)
    assert seen == set(GRID)  # the random ones cover the grid over time
    assert S.sample_subnetworks(GRID, None, rng) == GRID


def test_linear_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = S.linear_schedule(opt, total=10, warmup=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_frozen_teacher_has_no_gradients_and_no_dropout():
    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    model = DynaBertModel(cfg).train()
    teacher = S.frozen(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    ids = torch.randint(1, 50, (2, 5))
    torch.testing.assert_close(teacher(ids).logits, teacher(ids).logits)  # deterministic


def test_recipes_are_data():
    assert FULL.teacher.lr == FULL.width_stage.lr == FULL.depth_stage.lr == 2e-5
    assert FULL.batch_size == 32 and FULL.max_length == 128 and FULL.max_length_qa == 384
    assert FULL.width_loss == (1.0, 0.1) and FULL.depth_loss == (1.0, 1.0) and FULL.subnets_per_step is None
    assert QUICK.subnets_per_step and QUICK.train_examples
    assert get_recipe("quick") is QUICK
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        get_recipe("fast")
    with pytest.raises(AttributeError):
        QUICK.batch_size = 8  # frozen


def test_stages_run_under_bf16_autocast(monkeypatch):
    """The GPU path (bf16 autocast) exercised on the CPU: a frozen teacher in eval mode feeds a
    student in train mode. Regression: the eval-mode residual GEMM ran in place, which autocast
    does not cover, and stage 2 failed with 'mat1 and mat2 must have the same dtype'."""
    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    torch.manual_seed(0)
    student = DynaBertModel(cfg).train()
    teacher = S.frozen(student)
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_out = teacher(ids, mask, output_hidden_states=True)
        for w in cfg.widths:
            s_out = student(ids, mask, width=w, output_hidden_states=True)
            loss, _, _ = DistillLoss("classification", 1.0, 0.1)(s_out, t_out)
            loss.backward()
    assert t_out.logits.dtype == torch.bfloat16  # the teacher did run in bf16
    ref = teacher(ids, mask).logits
    torch.testing.assert_close(t_out.logits.float(), ref, atol=0.1, rtol=0.05)
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
