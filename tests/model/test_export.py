"""`dynabert export`: a physically sliced standalone checkpoint (and ONNX) that computes exactly
what the sub-network computes inside the full model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import WEIGHTS_FILE, load_checkpoint, read_eval
from model.cli import main
from model.config import DynaBertConfig, TaskSpec
from model.export import ONNX_FILE, export_onnx, onnx_input_names, slice_model
from model.modeling import DynaBertModel


def _batch(vocab: int, pad: int, B: int = 3, T: int = 19) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(B * 100 + T)
    ids = torch.randint(pad + 3, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, T // 2 :] = 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("width,depth", [(0.25, 0.5), (0.75, 0.75), (0.5, 1.0), (1.0, 1.0)])
def test_export_round_trip(tiny_cls_checkpoint: Path, tmp_path: Path, width: float, depth: float) -> None:
    out = tmp_path / "small"
    assert (
        main(
            [
                "export",
                str(tiny_cls_checkpoint),
                "--width",
                str(width),
                "--depth",
                str(depth),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    full, small = load_checkpoint(tiny_cls_checkpoint), load_checkpoint(out)
    fc, sc = full.config, small.config
    assert (sc.num_heads, sc.ffn_size, sc.num_layers) == (
        fc.num_kept_heads(width),
        fc.num_kept_neurons(width),
        len(fc.kept_layers(depth)),
    )
    assert sc.head_size == fc.head_size and sc.hidden_size == fc.hidden_size
    assert sc.widths == (1.0,) and sc.depths == (1.0,) and sc.task == fc.task
    assert sc.params() == fc.params(width, depth) and sc.flops() == fc.flops(width, depth)
    assert sum(p.numel() for p in small.model.parameters()) == fc.params(width, depth)
    if (width, depth) != (1.0, 1.0):
        assert (out / WEIGHTS_FILE).stat().st_size < (tiny_cls_checkpoint / WEIGHTS_FILE).stat().st_size
    assert small.tokenizer is not None and small.max_seq_length == full.max_seq_length
    assert small.meta["provenance"]["width"] == width and small.meta["provenance"]["depth"] == depth
    [entry] = read_eval(out)
    src_entry = next(e for e in full.eval if (e["width"], e["depth"]) == (width, depth))
    assert (entry["width"], entry["depth"], entry["source_width"], entry["source_depth"]) == (
        1.0,
        1.0,
        width,
        depth,
    )
    assert entry["value"] == src_entry["value"] and entry["params"] == src_entry["params"]
    ids, mask = _batch(fc.vocab_size, fc.pad_token_id)
    tt = (torch.arange(ids.shape[1]) >= 8).long().expand_as(ids)
    with torch.inference_mode():
        want = full.model(ids, mask, tt, width=width, depth=depth).logits
        got = small.model(ids, mask, tt).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_export_of_an_exported_checkpoint(tiny_cls_checkpoint: Path, tmp_path: Path) -> None:
    """The exported folder is an ordinary checkpoint: it can be sliced again (head_dim carried)."""
    assert (
        main(
            [
                "export",
                str(tiny_cls_checkpoint),
                "--width",
                "0.75",
                "--depth",
                "1.0",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        main(
            ["export", str(tmp_path / "a"), "--width", "0.34", "--depth", "0.5", "--out", str(tmp_path / "b")]
        )
        == 0
    )
    full, b = load_checkpoint(tiny_cls_checkpoint), load_checkpoint(tmp_path / "b")
    assert (b.config.num_heads, b.config.num_layers, b.config.head_size) == (1, 2, full.config.head_size)
    assert b.eval is None  # (0.34, 0.5) was never evaluated: nothing to carry
    ids, mask = _batch(full.config.vocab_size, 0)
    with torch.inference_mode():
        # 0.75 of 4 heads = 3 heads (0.75 * 4), then 0.34 of 3 = 1 head; 1 head of 4 is width 0.25
        want = full.model(ids, mask, width=0.25, depth=0.5).logits
        torch.testing.assert_close(b.model(ids, mask).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["roberta", "mpnet"])
def test_slice_model_other_architectures(arch: str) -> None:
    torch.manual_seed(0)
    extra = (
        {"relative_attention_buckets": 32, "type_vocab_size": 0}
        if arch == "mpnet"
        else {"type_vocab_size": 1}
    )
    cfg = DynaBertConfig(
        architecture=arch,
        vocab_size=90,
        hidden_size=48,
        num_layers=4,
        num_heads=6,
        ffn_size=30,
        max_positions=40,
        pad_token_id=1,
        task=TaskSpec(type="regression", metric="pearson"),
        **extra,
    )
    model = DynaBertModel(cfg).eval()
    with torch.no_grad():
        for lyr in model.layers:
            if lyr.rel_bias is not None:
                lyr.rel_bias.normal_()
    ids, mask = _batch(90, 1)
    for w, d in cfg.subnetworks():
        small = slice_model(model, w, d)
        with torch.inference_mode():
            torch.testing.assert_close(
                small(ids, mask).logits, model(ids, mask, width=w, depth=d).logits, rtol=0, atol=1e-5
            )


def test_export_rejects_bad_arguments(tiny_cls_checkpoint: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "x"
    assert (
        main(["export", str(tiny_cls_checkpoint), "--width", "0.1", "--depth", "1", "--out", str(out)]) == 2
    )
    assert "0.1" in caplog.text and not out.exists()
    assert (
        main(["export", str(tiny_cls_checkpoint), "--width", "1", "--depth", "1.5", "--out", str(out)]) == 2
    )
    assert main(["export", str(tmp_path / "missing"), "--width", "1", "--depth", "1", "--out", str(out)]) == 2
    assert (
        main(
            [
                "export",
                str(tiny_cls_checkpoint),
                "--width",
                "1",
                "--depth",
                "1",
                "--out",
                str(tiny_cls_checkpoint),
            ]
        )
        == 2
    )
    with pytest.raises(SystemExit):
        main(["export", str(tiny_cls_checkpoint), "--width", "wide", "--depth", "1", "--out", str(out)])


def _ort_logits(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[
        0
    ]


def test_onnx_export_matches_pytorch(tiny_cls_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert (
        main(
            [
                "export",
                str(tiny_cls_checkpoint),
                "--width",
                "0.5",
                "--depth",
                "0.75",
                "--out",
                str(out),
                "--onnx",
            ]
        )
        == 0
    )
    small = load_checkpoint(out)
    import onnx

    graph = onnx.load(str(out / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert onnx_input_names(small.config) == ["input_ids", "attention_mask", "token_type_ids"]
    # dynamic batch and sequence: sizes the export never saw, padded and unpadded
    for B, T in [(1, 5), (4, 37), (2, 128)]:
        ids, mask = _batch(small.config.vocab_size, 0, B, T)
        tt = torch.randint(0, 2, ids.shape)
        for m in (mask, torch.ones_like(mask)):
            with torch.inference_mode():
                want = small.model(ids, m, tt).logits.numpy()
            got = _ort_logits(
                out / ONNX_FILE,
                {"input_ids": ids.numpy(), "attention_mask": m.numpy(), "token_type_ids": tt.numpy()},
            )
            assert got.shape == want.shape == (B, 2)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_onnx_qa_without_token_types(tmp_path: Path) -> None:
    """RoBERTa-style (no token types) span QA: two inputs, (B, T, 2) logits with dynamic T."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = DynaBertConfig(
        architecture="roberta",
        vocab_size=90,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=40,
        max_positions=80,
        type_vocab_size=1,
        pad_token_id=1,
        task=TaskSpec(type="qa", text_fields=("question", "context"), metric="f1"),
    )
    model = slice_model(DynaBertModel(cfg).eval(), 0.5, 0.5)
    path = export_onnx(model, tmp_path / ONNX_FILE)
    for B, T in [(1, 7), (3, 50)]:
        ids, mask = _batch(90, 1, B, T)
        with torch.inference_mode():  # the padded pass, which the traced graph is (the unpadded
            # one puts -inf at QA padding: model/modeling.py)
            want = model(ids, mask, unpad=False).logits.numpy()
        got = _ort_logits(path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert got.shape == (B, T, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_onnx_dynamo_exporter_matches_pytorch(tiny_qa_checkpoint: Path, tmp_path: Path) -> None:
    """The torch.export-based exporter (onnxscript) gives the same graph semantics."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "dyn"
    argv = ["export", str(tiny_qa_checkpoint), "--width", "0.5", "--depth", "0.5", "--out", str(out)]
    assert main([*argv, "--onnx", "--onnx-exporter", "dynamo"]) == 0
    small = load_checkpoint(out)
    for B, T in [(1, 9), (3, 40)]:
        ids, mask = _batch(small.config.vocab_size, 0, B, T)
        tt = torch.zeros_like(ids)
        with torch.inference_mode():  # the padded pass, as the exported graph computes it
            want = small.model(ids, mask, tt, unpad=False).logits.numpy()
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": tt.numpy()}
        got = _ort_logits(out / ONNX_FILE, feeds)
        assert got.shape == (B, T, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
