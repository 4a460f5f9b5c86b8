"""The distillation stages train on TinyBERT-style augmented texts when the recipe asks for it."""

from __future__ import annotations

from model.checkpoint import read_eval
from training.pipeline import RunConfig, run_training
from training.recipes import TINY


def test_augmentation_adds_distillation_examples(tmp_path, tiny_backbone, one_thread):
    recipe = TINY.with_overrides(
        train_examples=40, dev_examples=32, augment=True, augment_samples=2, final_stage=None
    )
    res = run_training(
        RunConfig(
            task="rte",
            out=tmp_path / "rte",
            recipe=recipe,
            backbone=str(tiny_backbone),
            cache_dir=tmp_path / "cache",
        )
    )
    # 40 originals plus up to 2 variants each (a text with no replaceable word has none)
    assert 40 + 40 < res["train_examples"] <= 40 * 3
    assert res["stage4"] == "skipped" and len(read_eval(tmp_path / "rte")) == 12
