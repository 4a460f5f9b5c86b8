"""The unpadded forward (DynaBertModel's ``unpad``) computes what the padded one computes on the
real tokens, for every sub-network, pooling, task and position scheme; and the default takes it
exactly where it should (serving: inference_mode on the CPU, with enough padding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import DynaBertConfig, TaskSpec
from model.modeling import UNPAD_MAX_REAL, DynaBertModel, Unpadded
from tests.conftest import data_dir, tiny_config

CLS = TaskSpec(type="classification", labels=("neg", "pos"))
REG = TaskSpec(type="regression", metric="pearson")
QA = TaskSpec(type="qa", text_fields=("question", "context"), metric="f1")


def tiny(task: TaskSpec = CLS, **kw) -> DynaBertConfig:
    return tiny_config(task, vocab_size=100, max_positions=64, **kw)


def batch(lengths: list[int], pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded random rows of the given lengths: ids, mask, token types (a pair's second half 1)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(pad + 3, 100, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = pad
    types = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        types[i, n // 2 : n] = 1
    return ids, mask, types


def run(model: DynaBertModel, ids, mask, types, unpad, width=1.0, depth=1.0) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, mask, types, width=width, depth=depth, unpad=unpad).logits


@pytest.mark.parametrize(
    "task,kw",
    [
        (CLS, {}),
        (CLS, {"pooling": "mean"}),
        (REG, {}),
        (QA, {}),
        (
            CLS,
            {
                "architecture": "mpnet",
                "relative_attention_buckets": 32,
                "pad_token_id": 1,
                "type_vocab_size": 0,
            },
        ),
    ],
    ids=["cls", "mean-pool", "regression", "qa", "mpnet"],
)
def test_unpadded_equals_padded_for_every_subnetwork(task: TaskSpec, kw: dict) -> None:
    torch.manual_seed(0)
    cfg = tiny(task, **kw)
    model = DynaBertModel(cfg).eval()
    if cfg.relative_attention_buckets:
        for layer in model.layers:  # a non-zero bias, or the test cannot see it
            torch.nn.init.normal_(layer.rel_bias, std=1.0)
    ids, mask, types = batch([9, 3, 14, 1, 6], pad=cfg.pad_token_id)
    types = types if cfg.type_vocab_size else None
    for w, d in cfg.subnetworks():
        got = run(model, ids, mask, types, True, w, d)
        ref = run(model, ids, mask, types, False, w, d)
        if task.type == "qa":  # the real tokens agree; padding says "no answer here"
            real = mask.bool()
            torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)
            assert torch.isneginf(got[~real]).all()
        else:
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_unpadded_index_bookkeeping() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rows = Unpadded.of(mask)
    assert rows.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert rows.starts.tolist() == [0, 3, 4]
    assert rows.lengths.tolist() == [3, 1, 4]
    x = torch.arange(12.0).view(12, 1)
    packed = rows.unpad(x)
    assert packed.view(-1).tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    back = rows.pad(packed).view(3, 4)
    assert back.tolist() == [[0, 1, 2, 0], [4, 0, 0, 0], [8, 9, 10, 11]]


def test_default_unpads_only_for_serving() -> None:
    """Observable through QA logits: -inf at padding only when the unpadded forward ran."""
    torch.manual_seed(0)
    model = DynaBertModel(tiny(QA)).eval()
    ids, mask, types = batch([10, 2, 5])  # 17 of 30 positions real: plenty of padding

    def unpadded(**kw) -> bool:
        return bool(torch.isneginf(model(ids, mask, types, **kw).logits).any())

    with torch.inference_mode():
        assert unpadded()  # serving's case
        assert not unpadded(unpad=False)
        with pytest.raises(ValueError, match="hidden states"):
            model(ids, mask, types, unpad=True, output_hidden_states=True)
        assert not unpadded(output_hidden_states=True)  # the default steps aside
        even_ids, even_mask, even_types = batch([6, 6, 6])
        assert not torch.isneginf(model(even_ids, even_mask, even_types).logits).any()
        # one pad in 30 (under a tenth): the gathers would cost more than the padding
        few_ids, few_mask, few_types = batch([10, 10, 9])
        assert few_mask.float().mean() > UNPAD_MAX_REAL
        assert not torch.isneginf(model(few_ids, few_mask, few_types).logits).any()
    with torch.no_grad():  # training's evaluation and teachers keep the padded pass
        assert not unpadded()
    model.train()
    with torch.inference_mode():
        assert not unpadded()


def test_left_padded_cls_pooling_keeps_the_padded_pass() -> None:
    """CLS pooling reads column 0: with a row whose column 0 is padding, the default stays padded
    (so it pools exactly what the padded pass pools)."""
    torch.manual_seed(0)
    model = DynaBertModel(tiny(CLS)).eval()
    ids, mask, types = batch([8, 3, 8])
    mask = mask.flip(1)
    ids = ids.flip(1)
    with torch.inference_mode():
        torch.testing.assert_close(
            model(ids, mask, types).logits, model(ids, mask, types, unpad=False).logits
        )


@pytest.mark.slow
def test_unpadded_equals_padded_on_real_minilm_sst2(minilm_dir: Path) -> None:
    """The real backbone on a batch of real SST-2 sentences of mixed lengths, through the serving
    engine's own packing: every sub-network agrees with the padded pass."""
    from model.hf import load_hf_model, load_tokenizer

    model = load_hf_model(minilm_dir, CLS).eval()
    tok = load_tokenizer(minilm_dir)
    lines = (data_dir() / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines[:16]]
    enc = tok(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert mask.float().mean() < 0.7  # really a mixed-length batch
    for w, d in model.cfg.subnetworks():
        got = run(model, enc["input_ids"], mask, enc["token_type_ids"], True, w, d)
        ref = run(model, enc["input_ids"], mask, enc["token_type_ids"], False, w, d)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5, rtol=1e-4)
