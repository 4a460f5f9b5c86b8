"""At full width and depth our encoder computes what transformers' models compute.

BERT on the real all-MiniLM-L6-v2 weights; RoBERTa and MPNet on tiny random configs written to
disk with save_pretrained (safetensors) and read back through our loader. Padding included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import TaskSpec
from model.hf import load_hf_model, load_tokenizer

transformers = pytest.importorskip("transformers")

TASK = TaskSpec(type="classification", labels=("a", "b"))


def _compare(ours, theirs, ids: torch.Tensor, mask: torch.Tensor, tt: torch.Tensor | None = None) -> None:
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        kw = {"token_type_ids": tt} if tt is not None else {}
        ref = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw).hidden_states
        got = ours(ids, mask, tt, output_hidden_states=True).hidden_states
    assert len(got) == len(ref)
    # the tokens, tightly; padding positions (never read: pooling, classifier and QA heads all skip
    # them) only loosely: their rows attend through a mask whose fill value transformers changed
    # between releases (5.24 drifts 1.6e-4 there on MiniLM, against 4e-6 on the tokens)
    real = mask.bool()
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        err = (g - r)[real].abs().max().item()
        assert err < 2e-5, f"hidden state {i}: max abs diff {err} on the tokens"
        pad = (g - r)[~real].abs().max().item() if (~real).any() else 0.0
        assert pad < 1e-3, f"hidden state {i}: max abs diff {pad} at padding"


@pytest.mark.slow
def test_bert_equals_transformers_on_real_minilm(minilm_dir: Path) -> None:
    ours = load_hf_model(minilm_dir, TASK)
    theirs = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager")
    tok = load_tokenizer(minilm_dir)
    enc = tok(
        [
            "A gripping, beautifully acted film.",
            "The plot never comes together, and the second half drags on for what feels like hours.",
            "Fine.",
        ],
        ["Pair text for token types.", "b", "c"],
        padding=True,
        return_tensors="pt",
    )
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    assert (enc["token_type_ids"] == 1).any()
    _compare(ours, theirs, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def _save(model, path: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    assert (path / "model.safetensors").is_file()
    return path


def _padded_batch(vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(pad + 3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad
    return ids, mask


def test_roberta_equals_transformers_tiny_random(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        attn_implementation="eager",
    )
    theirs = transformers.RobertaModel(hf_cfg)
    ours = load_hf_model(_save(theirs, tmp_path / "roberta"), TASK)
    assert ours.cfg.architecture == "roberta" and ours.cfg.position_offset == 2
    ids, mask = _padded_batch(99, 1)
    _compare(ours, theirs, ids, mask)


def test_mpnet_equals_transformers_tiny_random(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.MPNetConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        relative_attention_num_buckets=32,
        pad_token_id=1,
    )
    theirs = transformers.MPNetModel(hf_cfg)
    with torch.no_grad():  # a non-zero shared relative position bias, so the test sees it
        theirs.encoder.relative_attention_bias.weight.normal_(std=1.0)
    ours = load_hf_model(_save(theirs, tmp_path / "mpnet"), TASK)
    assert ours.cfg.relative_attention_buckets == 32
    # MPNet shares one bias table; we hold a per-layer copy (so rewiring can permute each layer)
    for layer in ours.layers:
        torch.testing.assert_close(layer.rel_bias, theirs.encoder.relative_attention_bias.weight)
    ids, mask = _padded_batch(99, 1)
    _compare(ours, theirs, ids, mask)
