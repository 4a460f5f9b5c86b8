"""Pieces of the stages: sub-network sampling (sandwich rule), the learning-rate schedule, the
frozen teacher, recipes as data."""

from __future__ import annotations

import random

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel
from training import stages as S
from training.losses import DistillLoss, label_loss
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


def test_sampling_rules_keep_the_smallest_and_draw_the_rest():
    cfg = DynaBertConfig()

    def flops(sub):
        return float(cfg.flops(*sub))

    for rule in ("uniform", "cost"):
        rng = random.Random(0)
        counts = dict.fromkeys(GRID, 0)
        for _ in range(2000):
            picked = S.sample_subnetworks(GRID, 2, rng, rule=rule, cost=flops)
            assert len(picked) == 2 and (0.25, 0.5) in picked and picked == sorted(picked, reverse=True)
            for s in picked:
                counts[s] += 1
        assert counts[(0.25, 0.5)] == 2000
        others = {s: c for s, c in counts.items() if s != (0.25, 0.5)}
        assert all(c > 0 for c in others.values())  # the largest too
        if rule == "uniform":
            assert max(others.values()) < 2 * min(others.values())
        else:  # drawn in proportion to 1 / FLOPs: the cheapest others far more often
            cheap = others[(0.25, 0.75)] / 2000
            total = sum(1 / flops(s) for s in others)
            assert cheap == pytest.approx((1 / flops((0.25, 0.75))) / total, abs=0.03)
            assert others[(0.25, 0.75)] > 3 * others[(1.0, 1.0)]
    three = S.sample_subnetworks(GRID, 3, random.Random(1), rule="cost", cost=flops)
    assert len(three) == 3 and len(set(three)) == 3  # drawn without replacement
    assert S.sample_subnetworks(GRID, 1, random.Random(0), rule="uniform") == [(0.25, 0.5)]
    assert S.sample_subnetworks(GRID, 1, random.Random(0)) == [(1.0, 1.0)]
    with pytest.raises(ValueError, match="unknown sampling rule"):
        S.sample_subnetworks(GRID, 2, random.Random(0), rule="bogus")
    with pytest.raises(ValueError, match="needs a cost"):
        S.sample_subnetworks(GRID, 2, random.Random(0), rule="cost")


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


def test_optimizer_is_fused_adamw_with_the_bert_weight_decay_groups_and_steps_like_the_plain_one():
    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    torch.manual_seed(0)
    model = DynaBertModel(cfg).eval()  # no dropout: the two runs see the same gradients
    twin = DynaBertModel(cfg).eval()
    twin.load_state_dict(model.state_dict())
    opt = S.make_optimizer(model, FULL, 1e-2)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == FULL.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    plain = torch.optim.AdamW(
        [{"params": [q for q, p in zip(twin.parameters(), model.parameters(), strict=True) if p.ndim >= 2],
          "weight_decay": FULL.weight_decay},
         {"params": [q for q, p in zip(twin.parameters(), model.parameters(), strict=True) if p.ndim < 2],
          "weight_decay": 0.0}], lr=1e-2, foreach=False,
    )  # fmt: skip
    ids = torch.randint(1, 50, (4, 7))
    labels = torch.tensor([0, 1, 1, 0])
    for m, o in ((model, opt), (twin, plain)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(ids).logits, labels).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize(
    "task_type, pooling", [("classification", "mean"), ("classification", "cls"), ("qa", "cls")]
)
def test_a_training_step_on_an_accelerator_never_waits_for_it(task_type, pooling):
    """On a GPU a value read back to the host (``.item()``, ``bool(t)``) waits for every kernel
    queued before it; a step that does so once per sub-network (16 times in stage 3) no longer
    overlaps host and device. The meta device stands in for the accelerator: it has shapes but
    no values, so any such read raises. Regression: the forward asked ``attention_mask.all()``."""
    task = TaskSpec(type="qa") if task_type == "qa" else TaskSpec(labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=4, num_heads=4, ffn_size=32, pooling=pooling, task=task
    )
    student = DynaBertModel(cfg).to("meta").train()
    teacher = S.frozen(student)
    ids = torch.zeros(3, 7, dtype=torch.long, device="meta")
    mask = torch.ones_like(ids)
    labels = torch.zeros((3, 2) if task_type == "qa" else (3,), dtype=torch.long, device="meta")
    label_loss(student(ids, mask).logits, labels, task_type).backward()  # stage 0
    for w, d in cfg.subnetworks():  # stages 2 and 3: distillation with hidden states
        with torch.no_grad():
            t_out = teacher(ids, mask, width=w, output_hidden_states=True)
        s_out = student(ids, mask, width=w, depth=d, output_hidden_states=True)
        loss, _, _ = DistillLoss(task_type, 1.0, 1.0)(s_out, t_out)
        loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


class _Batches:
    """Just enough of TaskData for the distillation stages: a few fixed random batches."""

    def __init__(self, spec: TaskSpec, n: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        self.spec = spec
        self.batches = [
            {
                "input_ids": torch.randint(1, 50, (4, 6), generator=g),
                "attention_mask": torch.ones(4, 6, dtype=torch.long),
                "token_type_ids": None,
                "labels": torch.randint(0, 2, (4,), generator=g),
            }
            for _ in range(n)
        ]

    def train_batches(self, batch_size, seed, shard=(0, 1)):
        return iter(self.batches)

    def num_train_batches(self, batch_size):
        return len(self.batches)


@pytest.mark.parametrize("stage", ["width", "depth"])
def test_label_weight_adds_the_label_loss_to_distillation(stage, one_thread):
    """label_weight (l0) = 0 is the paper's distillation alone; l0 > 0 adds l0 * cross-entropy on
    the labels, and the logged loss is logit + hidden + l0 * label for every sub-network trained."""
    import dataclasses

    from training.recipes import TINY, StageSchedule

    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    torch.manual_seed(0)
    teacher = S.frozen(DynaBertModel(cfg))
    one_step = StageSchedule(lr=0.0, steps=1)  # lr 0: the same weights for both runs
    train = S.train_width if stage == "width" else S.train_depth
    logs = {}
    for l0 in (0.0, 0.7):
        recipe = dataclasses.replace(
            TINY, batch_size=4, label_weight=l0, width_loss=(1.0, 0.1), depth_loss=(1.0, 1.0),
            width_stage=one_step, depth_stage=one_step, subnets_per_step=None, mixed_precision=False,
        )  # fmt: skip
        ctx = S.Context(recipe=recipe, data=_Batches(task, n=1))
        student = DynaBertModel(cfg)
        student.load_state_dict(teacher.state_dict())
        logs[l0] = train(ctx, teacher, student)
    l2 = 0.1 if stage == "width" else 1.0
    assert "label" not in logs[0.0]
    assert logs[0.0]["loss"] == pytest.approx(logs[0.0]["logit"] + l2 * logs[0.0]["hidden"], rel=1e-4)
    with_labels = logs[0.7]
    assert with_labels["label"] > 0
    assert with_labels["logit"] == pytest.approx(logs[0.0]["logit"], rel=1e-5)  # same weights, same batch
    expected = with_labels["logit"] + l2 * with_labels["hidden"] + 0.7 * with_labels["label"]
    assert with_labels["loss"] == pytest.approx(expected, rel=1e-4)


class _IndexedBatches(_Batches):
    """Batches that carry their rows' index in the split, as GLUE batches do."""

    def __init__(self, spec: TaskSpec, n: int = 3) -> None:
        super().__init__(spec, n)
        for b, batch in enumerate(self.batches):
            batch["index"] = torch.arange(4 * b, 4 * b + 4)
        self.num_train = 4 * n


def test_stage3_reads_the_teachers_logits_back_after_the_first_epoch(one_thread):
    """With the logits alone distilled (l2 = 0), the fixed teacher runs once per example: from the
    second epoch on its logits are read back, and training is the same as with a forward pass."""
    import dataclasses

    from training.recipes import TINY, StageSchedule

    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    torch.manual_seed(0)
    init = DynaBertModel(cfg)
    teacher = S.frozen(init)
    recipe = dataclasses.replace(
        TINY, batch_size=4, depth_loss=(1.0, 0.0), depth_teacher="full_width", label_weight=0.5,
        depth_stage=StageSchedule(lr=1e-3, steps=7), subnets_per_step=2, mixed_precision=False,
    )  # fmt: skip
    calls = []
    teacher.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    results = {}
    for cache in (False, True):
        calls.clear()
        student = DynaBertModel(cfg)
        student.load_state_dict(init.state_dict())
        ctx = S.Context(recipe=recipe, data=_IndexedBatches(task, n=3))
        torch.manual_seed(1)  # the same dropout masks in both runs
        logs = S.train_depth(ctx, teacher, student, cache_logits=cache)
        results[cache] = (logs, student.state_dict(), list(calls))
    (plain, w_plain, calls_plain), (cached, w_cached, calls_cached) = results[False], results[True]
    assert calls_plain == [4] * 7  # one forward per step
    assert calls_cached == [4] * 3  # 12 examples, computed once in the first epoch of 3 batches
    assert cached["teacher_logits_reused"] == pytest.approx(4 / 7, abs=1e-4)
    assert "teacher_logits_reused" not in plain
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for k in w_plain:
        torch.testing.assert_close(w_cached[k], w_plain[k], atol=1e-5, rtol=1e-4)


def test_stage3_forwards_the_teacher_when_it_matches_hidden_states(one_thread):
    """With l2 > 0 the hidden states are needed every step: no cache."""
    import dataclasses

    from training.recipes import TINY, StageSchedule

    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    torch.manual_seed(0)
    teacher = S.frozen(DynaBertModel(cfg))
    recipe = dataclasses.replace(
        TINY, batch_size=4, depth_loss=(1.0, 1.0), depth_teacher="full_width",
        depth_stage=StageSchedule(lr=1e-3, steps=5), subnets_per_step=2, mixed_precision=False,
    )  # fmt: skip
    calls = []
    teacher.register_forward_hook(lambda m, args, out: calls.append(1))
    logs = S.train_depth(S.Context(recipe=recipe, data=_IndexedBatches(task)), teacher, DynaBertModel(cfg))
    assert len(calls) == 5 and "teacher_logits_reused" not in logs


def test_label_loss_leaves_augmented_texts_to_the_teacher():
    """An augmented text keeps the label of the text it came from, which a replaced word can
    make wrong: the label loss counts the batch's original texts only."""
    import dataclasses
    import math

    import torch.nn.functional as F

    from model.modeling import DynaBertOutput
    from training.recipes import TINY

    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    ctx = S.Context(recipe=dataclasses.replace(TINY, label_weight=2.0), data=_Batches(task))
    out = DynaBertOutput(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    labels = torch.tensor([0, 0, 1])
    base = torch.tensor(0.5)
    plain = S._with_labels(ctx, base, out, {"labels": labels}, {})
    assert plain.item() == pytest.approx(0.5 + 2 * F.cross_entropy(out.logits, labels).item())
    logs: dict = {}
    mixed = {"labels": labels, "augmented": torch.tensor([False, True, False])}
    masked = S._with_labels(ctx, base, out, mixed, logs)
    expected = F.cross_entropy(out.logits[[0, 2]], labels[[0, 2]]).item()
    assert masked.item() == pytest.approx(0.5 + 2 * expected) and logs["label"].item() == pytest.approx(
        expected
    )
    only_augmented = {"labels": labels, "augmented": torch.ones(3, dtype=torch.bool)}
    assert S._with_labels(ctx, base, out, only_augmented, {}).item() == 0.5
    assert not math.isnan(masked.item())
