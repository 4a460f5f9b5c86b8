"""The classification head's pooling: BERT's first token or the mean of the real tokens
(sentence-transformers backbones), chosen from the backbone folder and kept in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import DynaBertConfig, TaskSpec
from model.export import ONNX_FILE, export_onnx, slice_model
from model.hf import backbone_pooling
from model.modeling import DynaBertModel

TASK = TaskSpec(labels=("neg", "pos"))


def _cfg(pooling: str) -> DynaBertConfig:
    return DynaBertConfig(
        vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, ffn_size=64, max_positions=64,
        dropout=0.0, attention_dropout=0.0, pooling=pooling, task=TASK,
    )  # fmt: skip


def _padded(ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.cat([torch.ones_like(ids), torch.zeros(ids.shape[0], pad, dtype=torch.long)], 1)
    return torch.cat([ids, torch.zeros(ids.shape[0], pad, dtype=torch.long)], 1), mask


@pytest.mark.parametrize("width,depth", [(1.0, 1.0), (0.25, 0.5)])
def test_mean_pooling_ignores_padding_and_averages_the_real_tokens(width, depth) -> None:
    torch.manual_seed(0)
    model = DynaBertModel(_cfg("mean")).eval()
    ids = torch.randint(5, 100, (2, 7))
    padded, mask = _padded(ids, 5)
    with torch.inference_mode():
        plain = model(ids, torch.ones_like(ids), width=width, depth=depth, output_hidden_states=True)
        pad = model(padded, mask, width=width, depth=depth)
        want = model.classifier(torch.tanh(model.pooler(plain.hidden_states[-1].mean(1))))
    torch.testing.assert_close(pad.logits, plain.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.logits, want, atol=1e-6, rtol=0)


def test_cls_and_mean_pooling_read_different_tokens() -> None:
    torch.manual_seed(0)
    cls_model = DynaBertModel(_cfg("cls")).eval()
    mean_model = DynaBertModel(_cfg("mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    ids = torch.randint(5, 100, (2, 9))
    with torch.inference_mode():
        out = cls_model(ids, output_hidden_states=True)
        first = cls_model.classifier(torch.tanh(cls_model.pooler(out.hidden_states[-1][:, 0])))
        torch.testing.assert_close(out.logits, first, atol=1e-6, rtol=0)
        assert not torch.allclose(mean_model(ids).logits, out.logits, atol=1e-4)


def test_pooling_is_validated_and_survives_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pooling"):
        _cfg("max")
    model = DynaBertModel(_cfg("mean"))
    save_checkpoint(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "dynabert.json").read_text())["config"]["pooling"] == "mean"
    assert load_checkpoint(tmp_path / "ck").config.pooling == "mean"
    # a checkpoint written before the field existed reads as BERT's first-token pooling
    assert (
        DynaBertConfig.from_dict({k: v for k, v in _cfg("cls").to_dict().items() if k != "pooling"}).pooling
        == "cls"
    )


def test_backbone_pooling_follows_the_sentence_transformers_folder(tmp_path: Path, minilm_dir: Path) -> None:
    assert backbone_pooling(minilm_dir) == "mean"  # all-MiniLM-L6-v2 was trained mean-pooled
    assert backbone_pooling(tmp_path) == "cls"  # a plain Hugging Face folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert backbone_pooling(tmp_path) == "cls"
    (tmp_path / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="1_Pooling"):
        backbone_pooling(tmp_path)


def test_onnx_export_of_a_mean_pooled_model_matches_pytorch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = slice_model(DynaBertModel(_cfg("mean")).eval(), 0.5, 0.75)
    path = export_onnx(model, tmp_path / ONNX_FILE)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ids, mask = _padded(torch.randint(5, 100, (3, 11)), 4)
    with torch.inference_mode():
        want = model(ids, mask, torch.zeros_like(ids)).logits.numpy()
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "token_type_ids": np.zeros_like(ids.numpy()),
    }
    got = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
