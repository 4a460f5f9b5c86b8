"""Shared fixtures: tiny real checkpoints (random weights, the real MiniLM tokenizer) built once
per test session in a temp folder, in the exact checkpoint format the service loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import DynaBertConfig, TaskSpec
from model.hf import backbone_dir, load_tokenizer
from model.modeling import DynaBertModel

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("DYNABERT_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_config(task: TaskSpec, **overrides) -> DynaBertConfig:
    """HF BertModelTester-sized: hidden 32, 4 heads, FFN 64, 4 layers, real BERT vocab."""
    kw = dict(
        architecture="bert",
        vocab_size=30522,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        ffn_size=64,
        max_positions=160,
        dropout=0.0,
        attention_dropout=0.0,
        task=task,
    )
    kw.update(overrides)
    return DynaBertConfig(**kw)


def fixture_eval(cfg: DynaBertConfig, metric: str) -> list[dict]:
    """A test *input* for routing: dev metrics that rise with sub-network size, so tests can
    assert which sub-network a policy must pick. Not a measured result."""
    full = cfg.flops(1.0, 1.0)
    return [
        {
            "width": w,
            "depth": d,
            "params": cfg.params(w, d),
            "flops": cfg.flops(w, d),
            "metrics": {metric: round(0.80 + 0.1 * cfg.flops(w, d) / full, 4)},
            "metric": metric,
            "value": round(0.80 + 0.1 * cfg.flops(w, d) / full, 4),
            "split": "dev",
            "examples": 0,
        }
        for w, d in cfg.subnetworks()
    ]


def build_tiny_checkpoint(
    out: Path, task: TaskSpec, *, seed: int = 0, with_eval: bool = True, **overrides
) -> Path:
    torch.manual_seed(seed)
    cfg = tiny_config(task, **overrides)
    model = DynaBertModel(cfg).eval()
    tok = load_tokenizer(backbone_dir("minilm-l6"))
    return save_checkpoint(
        model,
        out,
        tokenizer=tok,
        max_seq_length=128,
        backbone="tiny-random (MiniLM tokenizer)",
        provenance={"fixture": "tests/conftest.py", "seed": seed},
        eval_results=fixture_eval(cfg, task.metric) if with_eval else None,
    )


SST2_TASK = TaskSpec(
    type="classification", name="sst2", labels=("negative", "positive"), text_fields=("sentence",)
)
QA_TASK = TaskSpec(type="qa", name="squad", text_fields=("question", "context"), metric="f1")


@pytest.fixture(scope="session")
def tiny_cls_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sst2", SST2_TASK)


@pytest.fixture(scope="session")
def tiny_qa_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-squad", QA_TASK, seed=1)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return backbone_dir("minilm-l6")
