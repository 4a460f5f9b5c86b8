"""Fixtures for the training tests: a tiny Hugging Face BERT folder (random weights, the real
MiniLM tokenizer) usable as ``--backbone PATH``, and the tiny recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def make_tiny_backbone(out: Path, seed: int = 0) -> Path:
    """A real Hugging Face BERT (transformers' own classes and save format), HF-tester sized,
    with a sentence-transformers pooling file."""
    import torch
    from transformers import BertConfig, BertModel

    from model.hf import backbone_dir

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertModel(cfg).save_pretrained(str(out), safe_serialization=True)
    # laid out like the packaged all-MiniLM-L6-v2 (a sentence-transformers folder, mean-pooled), so
    # the runs exercise `--pooling auto` picking the backbone's own pooling
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    src = backbone_dir("minilm-l6")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny-bert")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a CPU shared with other jobs
    (idle intra-op threads spin); the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
