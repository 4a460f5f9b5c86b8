"""`dynabert train --set FIELD=VALUE` (training.recipes.apply_overrides) and the training loop's
on-device loss bookkeeping (training.stages._accumulate, _read, and train_loop's returned numbers)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel
from training import stages as S
from training.losses import label_loss
from training.recipes import FULL, QUICK, TINY, StageSchedule, apply_overrides

# ---- apply_overrides ---------------------------------------------------------------------------


def test_no_overrides_returns_the_same_recipe():
    assert apply_overrides(FULL, []) is FULL


def test_stage_fields_are_parsed_by_their_type():
    r = apply_overrides(FULL, ["depth_stage.epochs=1", "teacher.steps=10", "width_stage.lr=1e-4"])
    assert r.depth_stage.epochs == 1.0 and type(r.depth_stage.epochs) is float
    assert r.teacher.steps == 10 and type(r.teacher.steps) is int
    assert r.width_stage.lr == pytest.approx(1e-4) and type(r.width_stage.lr) is float
    # the other fields of each changed stage, and the other stages, are kept
    assert r.depth_stage == dataclasses.replace(FULL.depth_stage, epochs=1.0)
    assert r.teacher == dataclasses.replace(FULL.teacher, steps=10)
    assert r.final_stage == FULL.final_stage
    assert apply_overrides(QUICK, ["teacher.steps=none"]).teacher.steps is None
    assert apply_overrides(QUICK, ["teacher.steps=None"]).teacher.steps is None
    assert apply_overrides(FULL, [" depth_stage.warmup_ratio = 0.1 "]).depth_stage.warmup_ratio == 0.1


def test_final_stage_can_be_switched_off_and_on_again():
    assert FULL.final_stage is not None
    for off in ("none", "off", "skip", "None"):
        assert apply_overrides(FULL, [f"final_stage={off}"]).final_stage is None
    # a field of a switched-off stage 4 switches it on with the defaults for the rest
    r = apply_overrides(FULL, ["final_stage=none", "final_stage.epochs=2"])
    assert r.final_stage == dataclasses.replace(StageSchedule(), epochs=2.0)
    no_final = dataclasses.replace(FULL, final_stage=None)
    assert apply_overrides(no_final, ["final_stage.epochs=2"]).final_stage == StageSchedule(epochs=2.0)


@pytest.mark.parametrize(
    "item, field, value",
    [
        ("batch_size=8", "batch_size", 8),
        ("max_length=256", "max_length", 256),
        ("weight_decay=0", "weight_decay", 0.0),
        ("max_grad_norm=0.5", "max_grad_norm", 0.5),
        ("augment=true", "augment", True),
        ("augment=True", "augment", True),
        ("augment=yes", "augment", True),
        ("augment=1", "augment", True),
        ("mixed_precision=false", "mixed_precision", False),
        ("mixed_precision=no", "mixed_precision", False),
        ("mixed_precision=0", "mixed_precision", False),
        ("width_loss=1,0.5", "width_loss", (1.0, 0.5)),
        ("depth_loss=1, 0", "depth_loss", (1.0, 0.0)),
        ("depth_teacher=full_width", "depth_teacher", "full_width"),
        ("subnets_per_step=none", "subnets_per_step", None),
        ("subnets_per_step=6", "subnets_per_step", 6),
        ("train_examples=500", "train_examples", 500),
    ],
)
def test_top_level_fields_are_parsed_by_their_type(item, field, value):
    base = QUICK if field == "subnets_per_step" else FULL
    r = apply_overrides(base, [item])
    got = getattr(r, field)
    assert got == value and type(got) is type(value)
    # nothing else changes but the name
    others = {f.name for f in dataclasses.fields(r)} - {field, "name"}
    assert all(getattr(r, k) == getattr(base, k) for k in others)


def test_later_overrides_win():
    r = apply_overrides(FULL, ["batch_size=8", "batch_size=16"])
    assert r.batch_size == 16


def test_name_records_the_overrides_and_input_is_untouched():
    before = dataclasses.asdict(FULL)
    items = ["depth_stage.epochs=1", "final_stage=none", " augment=true "]
    r = apply_overrides(FULL, items)
    assert r.name.startswith("full (") and r.name.endswith(")")
    assert all(item.strip() in r.name for item in items)
    assert r.name == "full (depth_stage.epochs=1, final_stage=none, augment=true)"
    assert dataclasses.asdict(FULL) == before and FULL.name == "full"
    assert FULL.final_stage is not None and FULL.depth_stage.epochs == 3 and not FULL.augment
    assert apply_overrides(TINY, ["batch_size=4"]).name == "tiny (batch_size=4)"


@pytest.mark.parametrize(
    "item, message",
    [
        ("depth_stage.epochs", "expected FIELD=VALUE"),
        ("=3", "expected FIELD=VALUE"),
        ("bogus_field=1", "no field 'bogus_field'"),
        ("depth_stage.bogus=1", "no field 'bogus'"),
        ("bogus.epochs=1", "'bogus' is not a stage"),
        ("augment=maybe", "bad value for augment"),
        ("batch_size=abc", "bad value for batch_size"),
        ("batch_size=none", "bad value for batch_size"),  # not Optional
        ("depth_stage.epochs=fast", "bad value for epochs"),
        ("teacher.steps=1.5", "bad value for steps"),
        ("width_loss=a,b", "bad value for width_loss"),
        ("width_loss=1", "expected two numbers"),
        ("depth_loss=1,0.1,3", "expected two numbers"),
        ("depth_teacher=bigger", "expected one of same_width, full_width"),
        ("subnet_sampling=random", "expected one of sandwich, uniform, cost"),
        ("teacher=none", "only final_stage can be switched off"),
        ("depth_stage=off", "only final_stage can be switched off"),
        ("name=x", "set a stage's fields"),
        ("teacher=3", "set a stage's fields"),
        ("final_stage=3", "set a stage's fields"),
    ],
)
def test_bad_overrides_raise_a_value_error_naming_the_item(item, message):
    with pytest.raises(ValueError, match=message) as e:
        apply_overrides(FULL, ["batch_size=8", item])
    assert repr(item) in str(e.value)  # the message names the offending item


def test_cli_collects_set_options_in_order():
    from model.cli import build_parser

    argv = ["train", "--task", "sst2", "--out", "x"]
    args = build_parser().parse_args([*argv, "--set", "depth_stage.epochs=1", "--set", "final_stage=none"])
    assert args.overrides == ["depth_stage.epochs=1", "final_stage=none"]
    assert build_parser().parse_args(argv).overrides == []


# ---- the training loop's loss bookkeeping ------------------------------------------------------


def test_accumulate_sums_detached_float_tensors_per_key():
    logs: dict[str, torch.Tensor] = {}
    w = torch.tensor(2.0, requires_grad=True)
    S._accumulate(logs, loss=w * 1.5, logit=w * 0.5)
    S._accumulate(logs, loss=w * 2.0, hidden=torch.tensor(0.25, dtype=torch.float64))
    assert set(logs) == {"loss", "logit", "hidden"}
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in logs.values())
    assert logs["loss"].item() == pytest.approx(7.0)
    assert logs["logit"].item() == pytest.approx(1.0)
    assert logs["hidden"].item() == pytest.approx(0.25)
    bf16 = {}
    S._accumulate(bf16, loss=torch.tensor(1.0, dtype=torch.bfloat16))
    assert bf16["loss"].dtype == torch.float32


def test_read_returns_python_floats_in_order():
    values = [torch.tensor(1.5), torch.tensor([2.0]), torch.tensor(3, dtype=torch.int64)]
    out = S._read(values)
    assert out == [1.5, 2.0, 3.0] and all(type(x) is float for x in out)
    assert S._read(v for v in values) == [1.5, 2.0, 3.0]  # any iterable, e.g. dict.values()
    assert S._read({"a": torch.tensor(0.5)}.values()) == [0.5]
    assert S._read([]) == []


class _FakeData:
    """Just enough of TaskData for train_loop: the same few random batches every epoch."""

    def __init__(self, n_batches: int = 2, batch_size: int = 4, length: int = 6, vocab: int = 50) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {
                "input_ids": torch.randint(1, vocab, (batch_size, length), generator=g),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
                "token_type_ids": None,
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }
            for _ in range(n_batches)
        ]

    def train_batches(self, batch_size, seed, shard=(0, 1)):
        return iter(self.batches)

    def num_train_batches(self, batch_size):
        return len(self.batches)


def test_train_loop_returns_plain_numbers(one_thread):
    torch.manual_seed(0)
    task = TaskSpec(type="classification", name="x", labels=("a", "b"))
    cfg = DynaBertConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=16, task=task
    )
    model = DynaBertModel(cfg)
    recipe = dataclasses.replace(TINY, batch_size=4, mixed_precision=False)
    ctx = S.Context(recipe=recipe, data=_FakeData())
    calls = []

    def step(batch):
        logs: dict[str, torch.Tensor] = {}
        for w, d in ((1.0, 1.0), (0.5, 0.5)):  # two sub-networks, summed as in the stages
            loss = label_loss(
                model(*ctx.inputs(batch), width=w, depth=d).logits, batch["labels"], "classification"
            )
            loss.backward()
            S._accumulate(logs, loss=loss)
        S._accumulate(logs, marker=torch.tensor(float(len(calls))))
        calls.append(logs["loss"].item())
        return logs

    out = S.train_loop(ctx, model, StageSchedule(lr=1e-3, steps=3), step, "test")
    assert len(calls) == 3 and out["steps"] == 3 and type(out["steps"]) is int
    for k in ("loss", "grad_norm", "marker", "seconds", "cpu_seconds"):
        assert type(out[k]) is float, (k, type(out[k]))
    assert out["loss"] == pytest.approx(sum(calls) / 3, abs=1e-5)  # the mean over the stage
    assert out["marker"] == pytest.approx(1.0)  # mean of 0, 1, 2
    assert out["grad_norm"] > 0 and out["seconds"] >= 0
    json.dumps(out)  # plain numbers, ready for train_state.json
    assert not model.training  # left in eval mode
