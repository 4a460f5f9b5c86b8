"""`dynabert bench unpad` in a short run on a tiny checkpoint and real SST-2 sentences: the
report's structure and that the two passes it compares agree (not timings)."""

from __future__ import annotations

import json
from pathlib import Path

from model.cli import main
from tests.conftest import data_dir


def test_short_run_compares_the_two_passes_on_real_sentences(
    tiny_cls_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "unpad.json"
    argv = ["bench", "unpad", "--checkpoint", str(tiny_cls_checkpoint), "--data-dir", str(data_dir())]
    argv += ["--batch-sizes", "1", "8", "--batches", "3", "--rounds", "2", "--subnet", "0.25/0.5"]
    argv += ["--subnet", "1/1", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["width"], r["depth"], r["batch"]) for r in rows] == [
        (0.25, 0.5, 1), (1.0, 1.0, 1), (0.25, 0.5, 8), (1.0, 1.0, 8),
    ]  # fmt: skip
    for r in rows:
        assert r["padded_ms"] > 0 and r["unpadded_ms"] > 0 and r["speedup"] > 0
        assert r["max_abs_logit_diff"] < 1e-4  # the same logits
    one, eight = rows[0], rows[2]
    assert one["real_token_share"] == 1.0  # a batch of one has no padding
    assert 0.2 < eight["real_token_share"] < 0.95  # eight real sentences of mixed lengths do
    table = capsys.readouterr().out
    assert "| 0.25/0.5 | 8 |" in table and "speed-up" in table


def test_a_bad_subnet_is_a_usage_error(tiny_cls_checkpoint: Path, capsys) -> None:
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", "unpad", "--checkpoint", str(tiny_cls_checkpoint), "--subnet", "half"])
    assert e.value.code == 2
    assert "WIDTH/DEPTH" in capsys.readouterr().err
