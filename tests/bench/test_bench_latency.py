"""`dynabert bench latency` in its short mode on a tiny checkpoint: the report's structure and
the sanity of what it measures (not timings: this is a benchmark, not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.latency import LatencyOptions, build_models, format_table, run_latency
from model.cli import main


def test_short_run_writes_a_complete_report(tiny_cls_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--checkpoint", str(tiny_cls_checkpoint), "--seq-len", "16"]
    argv += [
        "--batch-sizes",
        "1",
        "2",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        "--markdown",
        "--clock",
        "cpu",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["options"]["seq_len"] == 16 and report["options"]["batch_sizes"] == [1, 2]
    assert report["options"]["clock"] == "cpu"
    assert report["machine"]["threads"] == 1 and len(report["machine"]["loadavg_before"]) == 3
    rows = report["rows"]
    assert len(rows) == 24  # 12 sub-networks x 2 batch sizes
    want = {
        "batch",
        "width",
        "depth",
        "median_ms",
        "p10_ms",
        "p90_ms",
        "params",
        "flops",
        "speedup",
        "flop_ratio",
        "efficiency",
    }
    assert all(set(r) == want for r in rows)
    for b in (1, 2):
        mine = [r for r in rows if r["batch"] == b]
        assert {(r["width"], r["depth"]) for r in mine} == {
            (w, d) for w in (1.0, 0.75, 0.5, 0.25) for d in (1.0, 0.75, 0.5)
        }
        full = next(r for r in mine if (r["width"], r["depth"]) == (1.0, 1.0))
        assert full["speedup"] == 1.0 and full["flop_ratio"] == 1.0
        for r in mine:
            assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["flop_ratio"] >= 1.0 and r["efficiency"] == pytest.approx(
                r["speedup"] / r["flop_ratio"], abs=2e-3
            )
        quarter = next(r for r in mine if (r["width"], r["depth"]) == (0.25, 0.5))
        assert quarter["flops"] * quarter["flop_ratio"] == pytest.approx(full["flops"], rel=1e-3)
        assert quarter["params"] < full["params"]
    # transformers' model ran on the same weights and computed the same thing
    assert [r["batch"] for r in report["reference"]] == [1, 2]
    assert all(
        r["name"] == "transformers BertModel (eager)" and r["ours_vs_reference"] > 0
        for r in report["reference"]
    )
    assert all(v < 1e-4 for v in report["max_abs_diff_vs_reference"].values())
    text = capsys.readouterr().out
    assert text.count("| 1 | 0.25 | 0.5 |") == 1 and "| 2 | transformers BertModel (eager) |" in text


def test_plain_table_and_no_reference(tiny_cls_checkpoint: Path) -> None:
    model, _ = build_models(None, str(tiny_cls_checkpoint))
    report = run_latency(
        model, LatencyOptions(threads=1, seq_len=8, batch_sizes=(1,), repeats=1, warmup=0, reference=False)
    )
    assert report["reference"] == [] and len(report["rows"]) == 12
    text = format_table(report)
    assert len(text.splitlines()[0].split()) > 5 and "n/a" in text


def test_bad_arguments_are_user_errors(tiny_cls_checkpoint: Path) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--checkpoint", str(tiny_cls_checkpoint), "--shape", "base"])
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--shape", "huge"])
    assert main(["bench", "latency", "--checkpoint", str(tiny_cls_checkpoint), "--seq-len", "500"]) == 2
    assert main(["bench", "latency", "--checkpoint", str(tiny_cls_checkpoint), "--repeats", "0"]) == 2
    # the CPU clock cannot time an accelerator's work: refused before anything moves to the device
    argv = [
        "bench",
        "latency",
        "--checkpoint",
        str(tiny_cls_checkpoint),
        "--device",
        "cuda",
        "--clock",
        "cpu",
    ]
    assert main(argv) == 2


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_times_the_grid_on_the_gpu(tiny_cls_checkpoint: Path) -> None:
    import torch

    model, _ = build_models(None, str(tiny_cls_checkpoint))
    report = run_latency(
        model, LatencyOptions(seq_len=16, batch_sizes=(1, 4), repeats=3, warmup=1, device="cuda")
    )
    assert next(model.parameters()).is_cuda
    assert report["machine"]["gpu"] == torch.cuda.get_device_name(0) and report["machine"]["device"] == "cuda"
    assert len(report["rows"]) == 24 and all(r["median_ms"] > 0 for r in report["rows"])
    # transformers' model ran on the GPU too, on the same weights
    assert all(v < 1e-3 for v in report["max_abs_diff_vs_reference"].values())
    assert "NVIDIA" in format_table(report) or torch.cuda.get_device_name(0) in format_table(report)


def test_reference_model_holds_our_weights_for_roberta_and_none_for_mpnet() -> None:
    import torch

    from bench.latency import make_inputs, to_transformers
    from model.config import DynaBertConfig, TaskSpec
    from model.modeling import DynaBertModel

    kw = dict(
        vocab_size=90,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=40,
        max_positions=80,
        pad_token_id=1,
    )
    task = TaskSpec(labels=("a", "b"))
    torch.manual_seed(0)
    ours = DynaBertModel(DynaBertConfig(architecture="roberta", type_vocab_size=1, task=task, **kw)).eval()
    hf = to_transformers(ours)
    assert type(hf).__name__ == "RobertaModel"
    inp = make_inputs(ours.cfg, 2, 20, 0)
    assert set(inp) == {"input_ids", "attention_mask"}  # no token types for RoBERTa
    with torch.inference_mode():
        a = ours(inp["input_ids"], inp["attention_mask"], output_hidden_states=True).hidden_states[-1]
        b = hf(**inp).last_hidden_state
    assert (a - b).abs().max() < 1e-5
    mpnet = DynaBertConfig(
        architecture="mpnet", type_vocab_size=0, relative_attention_buckets=32, task=task, **kw
    )
    assert to_transformers(DynaBertModel(mpnet)) is None
