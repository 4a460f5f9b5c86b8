"""The distillation stages train on TinyBERT-style augmented texts when the recipe asks for it."""

from __future__ import annotations

from model.checkpoint import read_eval
from training.pipeline import RunConfig, run_training
from training.recipes import TINY


def test_augmentation_adds_distillation_examples(tmp_path, tiny_backbone, one_thread, monkeypatch):
    from training import stages as S

    seen = []  # what stage 4 (training on the labels) trains on
    train_on_labels = S.train_on_labels

    def spy(ctx, *args, **kw):
        seen.append((ctx.data.num_train, ctx.data.train.augmented))
        return train_on_labels(ctx, *args, **kw)

    monkeypatch.setattr(S, "train_on_labels", spy)
    recipe = TINY.with_overrides(train_examples=40, dev_examples=32, augment=True, augment_samples=2)
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
    assert res["stage4"] in ("before", "after") and len(read_eval(tmp_path / "rte")) == 12
    # stage 4 fine-tunes on the labels of the 40 original texts, none of the augmented ones
    assert seen == [(40, None)]
