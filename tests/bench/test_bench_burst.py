"""`dynabert bench burst`: its pieces, and one short run against two real servers (the tiny
checkpoint). That abandoned requests leave the queue is tested deterministically in
tests/service (scheduler and real HTTP); here, that the benchmark reports it."""

from __future__ import annotations

import json
import math

import pytest

from bench.burst import _counter, variants, windows
from bench.serve import Record

EXPOSITION = """# HELP dynabert_client_closed_total x
dynabert_client_closed_total{model="a",stage="queued"} 3.0
dynabert_client_closed_total{model="b",stage="queued"} 4.0
dynabert_client_closed_total{model="a",stage="running"} 1.0
dynabert_batch_size_sum{model="a"} 10.0
dynabert_batch_size_sum{model="b"} 2.5
"""


def test_counter_sums_the_matching_samples():
    assert _counter(EXPOSITION, "dynabert_client_closed_total", stage="queued") == 7.0
    assert _counter(EXPOSITION, "dynabert_client_closed_total", model="a") == 4.0
    assert _counter(EXPOSITION, "dynabert_batch_size_sum") == 12.5
    assert _counter(EXPOSITION, "dynabert_missing_total") == 0.0


def test_windows_report_the_share_answered_per_second_after_the_burst():
    recs = [
        Record(0.5, 999.0, 200),  # the burst: not in any window
        Record(2.1, 30.0, 200),
        Record(2.5, math.inf, 0),  # timed out
        Record(2.9, 50.0, 200),
        Record(3.2, 40.0, 503),
    ]
    w = windows(recs, 2.0, 4.0)
    assert [x["from_s"] for x in w] == [0.0, 1.0]
    assert w[0]["requests"] == 3 and w[0]["answered"] == pytest.approx(2 / 3) and w[0]["p50_ms"] == 40.0
    assert w[1] == {"from_s": 1.0, "requests": 1, "answered": 0.0, "p50_ms": None}
    assert windows([], 2.0, 3.0) == [{"from_s": 0.0, "requests": 0, "answered": None, "p50_ms": None}]


def test_the_timeout_header_variant_sends_the_clients_timeout_to_one_server_only():
    (a, a_env, a_headers), (b, b_env, b_headers) = variants("timeout-header", 250.0)
    assert (a, b) == ("timeout-header", "no-header")
    assert a_env == b_env == {"DYNABERT_CANCEL_ON_DISCONNECT": "false"}  # neither sees hang-ups
    assert a_headers == {"X-Request-Timeout-Ms": "250"} and b_headers is None
    assert [env for _, env, _ in variants("hang-up", 250.0)] == [
        {"DYNABERT_CANCEL_ON_DISCONNECT": "true"},
        {"DYNABERT_CANCEL_ON_DISCONNECT": "false"},
    ]


@pytest.mark.parametrize("drop_by", ["hang-up", "timeout-header"])
def test_quick_burst_bench_against_real_servers(tiny_cls_checkpoint, tmp_path, capsys, monkeypatch, drop_by):
    from model.cli import main

    monkeypatch.setenv("DYNABERT_CALIBRATE", "false")  # the servers start quicker (profile from FLOPs)

    out = tmp_path / "burst.json"
    rc = main(
        ["bench", "burst", "--quick", "--checkpoint", str(tiny_cls_checkpoint), "--capacity", "100"]
        + ["--burst-s", "0.5", "--after-s", "2", "--client-timeout-ms", "200", "--json", str(out)]
        + ["--drop-by", drop_by]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["config"]["capacity_rps"] == 100 and result["config"]["policy"] == "fixed"
    assert result["config"]["drop_by"] == drop_by
    cancel, keep = result["runs"]
    names = ("cancel", "no-cancel") if drop_by == "hang-up" else ("timeout-header", "no-header")
    assert (cancel["server"], keep["server"]) == names
    assert cancel["burst_requests"] == keep["burst_requests"] > 50  # one schedule for both
    for run in (cancel, keep):
        assert [w["from_s"] for w in run["after"]] == [0.0, 1.0]
        assert sum(w["requests"] for w in run["after"]) > 20
        assert run["inputs_run"] > 0
    # the server that keeps abandoned requests never withdraws one
    assert keep["withdrawn_queued"] == keep["dropped_running"] == keep["refused_admission"] == 0
    printed = capsys.readouterr().out
    assert "| after the burst |" in printed and "| 0-1 s (" in printed
