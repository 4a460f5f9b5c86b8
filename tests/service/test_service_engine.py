"""Engine pre-processing against the real MiniLM tokenizer (the tiny checkpoints carry it)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from service.engine import Engine
from tests.conftest import data_dir


def _tsv(name: str) -> list[dict[str, str]]:
    path = data_dir() / name / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found (set DYNABERT_DATA_DIR)")
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_the_fast_tokenisation_path_gives_the_transformers_tokenizers_rows(tiny_cls_checkpoint):
    # The request path calls the `tokenizers` object directly; the transformers call it wraps is
    # the reference. Every SST-2 dev sentence, and RTE pairs (long premises: the truncation path).
    fast, ref = Engine.load(tiny_cls_checkpoint), Engine.load(tiny_cls_checkpoint)
    ref._fast = None
    assert fast._fast is not None
    sst2 = [r["sentence"] for r in _tsv("SST-2")]
    assert len(sst2) > 800
    rte = _tsv("RTE")
    firsts, seconds = [r["sentence1"] for r in rte], [r["sentence2"] for r in rte]
    for i in range(0, len(sst2), 64):
        a, b = fast.encode_texts(sst2[i : i + 64]), ref.encode_texts(sst2[i : i + 64])
        assert a == b
    truncated = 0
    for i in range(0, len(rte), 64):
        a = fast.encode_texts(firsts[i : i + 64], seconds[i : i + 64])
        b = ref.encode_texts(firsts[i : i + 64], seconds[i : i + 64])
        assert a == b
        truncated += a.truncated
    assert truncated > 0  # some RTE pairs pass the tiny checkpoint's 128 tokens: cut alike
    # odd inputs: empty after normalisation, accents and CJK, a lone pair
    odd = ["", "   ", "Café naïve — 東京", "a" * 2000]
    assert fast.encode_texts(odd) == ref.encode_texts(odd)
    assert fast.encode_texts(["q?"], ["ctx"]) == ref.encode_texts(["q?"], ["ctx"])


def test_a_request_costs_its_mean_row_unpadded_and_its_longest_padded(tiny_cls_checkpoint):
    """What the policy and the scheduler are told a request's rows cost, and that the engine's
    own batch through the unpadded forward gives the padded forward's logits."""
    import torch

    from service.engine import forward

    eng = Engine.load(tiny_cls_checkpoint)
    enc = eng.encode_texts(["fine", "a long, winding and rather beautifully acted film about nothing at all"])
    lengths = [len(r.input_ids) for r in enc.rows]
    assert enc.tokens == max(lengths) == enc.cost_tokens(False)
    assert enc.cost_tokens(True) == enc.mean_tokens == -(-sum(lengths) // 2) < enc.tokens
    ids, mask, types = eng.pack(enc.rows)
    served = forward(eng.model, (0.5, 0.5), ids, mask, types)  # (unpadded: inference_mode, CPU)
    with torch.inference_mode():
        padded = eng.model(
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.from_numpy(types),
            width=0.5,
            depth=0.5,
            unpad=False,
        ).logits.numpy()
    np.testing.assert_allclose(served, padded, atol=2e-5, rtol=1e-4)
