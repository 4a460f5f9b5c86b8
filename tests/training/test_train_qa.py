"""QA smoke run of every stage on a tiny model and a few hundred real SQuAD v1.1 questions."""

from __future__ import annotations

import json

from model.checkpoint import load_checkpoint
from training.pipeline import RunConfig, run_training
from training.recipes import TINY


def test_squad_smoke_every_stage(tmp_path, tiny_backbone, one_thread):
    out = tmp_path / "squad-tiny"
    recipe = TINY.with_overrides(train_examples=120, dev_examples=40)
    res = run_training(
        RunConfig(
            task="squad", out=out, recipe=recipe, backbone=str(tiny_backbone), cache_dir=tmp_path / "cache"
        )
    )
    ckpt = load_checkpoint(out)
    assert ckpt.config.task.type == "qa" and ckpt.max_seq_length == TINY.max_length_qa
    assert len(ckpt.eval) == 12
    for e in ckpt.eval:
        assert e["metric"] == "f1" and set(e["metrics"]) == {"f1", "exact_match"}
        assert 0.0 <= e["metrics"]["exact_match"] <= e["value"] <= 1.0  # fractions, EM <= F1
        assert e["examples"] == 40
    state = json.loads((out / "train_state.json").read_text())
    assert list(state["stages"]) == ["teacher", "rewired", "dynabert_w", "dynabert", "final"]
    assert res["train_examples"] == 120
    assert (out / "report.md").is_file()
