"""`dynabert bench overhead`: its argument parsing, and short runs against real servers (the tiny
checkpoint) that differ in their settings."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.overhead import Variant, markdown, parse_variant, summarise
from bench.unpad import parse_subnet


def test_a_variant_is_a_name_and_dynabert_settings():
    assert parse_variant("off:DYNABERT_BUSY_POLL_MS=0") == Variant("off", {"DYNABERT_BUSY_POLL_MS": "0"})
    assert parse_variant("two:DYNABERT_A=1, DYNABERT_B=x=y") == Variant(
        "two", {"DYNABERT_A": "1", "DYNABERT_B": "x=y"}
    )
    assert parse_variant("defaults:") == Variant("defaults", {})
    for bad in (
        "noenv",
        ":DYNABERT_A=1",
        "a b:DYNABERT_A=1",
        "x:PATH=/tmp",
        "x:DYNABERT_A",
        "x:dynabert_a=1",
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def test_a_subnet_is_width_slash_depth():
    assert parse_subnet("1/1") == (1.0, 1.0) and parse_subnet("0.25/0.5") == (0.25, 0.5)
    for bad in ("1", "1/1/1", "a/b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_subnet(bad)


def test_the_summary_takes_the_median_round():
    rows = [
        {
            "overhead_ms": x,
            "e2e_p50_ms": x + 5,
            "forward_p50_ms": 4.5,
            "tokenize_forward_p50_ms": 5.0,
            "front_cpu_ms": c,
            "worker_cpu_ms": 1.0,
        }
        for x, c in ((1.0, 1.0), (9.0, 2.0), (2.0, 3.0))
    ]
    s = summarise(rows)
    assert s["overhead_ms"] == 2.0 and s["e2e_p50_ms"] == 7.0 and s["front_cpu_ms"] == 2.0  # one slow round


def test_servers_that_differ_in_settings_side_by_side(tiny_cls_checkpoint, tmp_path, capsys):
    pytest.importorskip("service.cli")
    from model.cli import main

    out = tmp_path / "overhead.json"
    rc = main(
        ["bench", "overhead", "--checkpoint", str(tiny_cls_checkpoint), "--rounds", "2", "--requests", "12"]
        + ["--variant", "a:DYNABERT_CALIBRATE=false", "--variant", "b:DYNABERT_CALIBRATE=false,DYNABERT_BUSY_POLL_MS=50"]
        + ["--subnet", "1/1", "--subnet", "0.25/0.5", "--json", str(out), "--keep-logs", str(tmp_path / "logs")]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["variants"] == {
        "a": {"DYNABERT_CALIBRATE": "false"},
        "b": {"DYNABERT_CALIBRATE": "false", "DYNABERT_BUSY_POLL_MS": "50"},
    }
    assert set(result["results"]) == set(result["summary"]) == {"1/1", "0.25/0.5"}
    for per in result["results"].values():
        for name in ("a", "b"):
            assert len(per[name]) == 2  # a row per round
            for row in per[name]:
                # against tokenise + forward, as `bench serve` measures it
                assert row["overhead_ms"] == pytest.approx(row["e2e_p50_ms"] - row["tokenize_forward_p50_ms"])
                assert row["e2e_p50_ms"] > row["tokenize_forward_p50_ms"] > row["forward_p50_ms"] > 0
                assert row["front_cpu_ms"] > 0 and row["worker_cpu_ms"] > 0  # both processes worked
    assert (tmp_path / "logs" / "server-a.log").exists() and (tmp_path / "logs" / "server-b.log").exists()
    printed = capsys.readouterr().out
    assert printed.strip() == markdown(result)
    assert "| 1/1 | a |" in printed and "| 0.25/0.5 | b |" in printed and "| +0.000 ms |" in printed


def test_a_variant_s_settings_reach_its_server(tiny_cls_checkpoint, tmp_path):
    # a value the server's settings refuse: that server does not start, and the run says so
    pytest.importorskip("service.cli")
    from model.cli import main

    with pytest.raises(RuntimeError, match="before it was ready"):
        main(
            ["bench", "overhead", "--checkpoint", str(tiny_cls_checkpoint), "--rounds", "1", "--requests", "1"]
            + ["--variant", "ok:DYNABERT_CALIBRATE=false", "--variant", "bad:DYNABERT_BUSY_POLL_MS=-1"]
            + ["--keep-logs", str(tmp_path)]
        )  # fmt: skip
    assert "busy_poll_ms" in (tmp_path / "server-bad.log").read_text().lower()
