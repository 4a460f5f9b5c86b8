"""bench/serve.py and bench/hog.py: the Poisson schedule, the analysis math on synthetic records,
the open-loop property against a slow loopback HTTP server, the CPU hog, and one --quick run of
`dynabert bench serve` against the real server on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest

from bench.hog import CpuHog, GpuHog, hog_for, matmuls, spin
from bench.serve import (
    BenchConfig,
    Record,
    Server,
    _machine,
    analyze,
    attainment_timeline,
    check_loopback,
    checks,
    config_from_args,
    hog_policies,
    host_drift,
    host_probe_ms,
    host_slowdown,
    load_scale,
    make_client,
    markdown,
    open_loop,
    paired,
    parse_gauges,
    parse_server_timing,
    parse_threads,
    percentile,
    point_stats,
    poisson_schedule,
    policy_spec,
    register_serve,
    subnet_metrics,
    variant_effects,
)

# ---- the Poisson schedule ------------------------------------------------------------------------


def test_poisson_schedule_has_poisson_statistics():
    rate, duration = 200.0, 50.0
    t = np.array(poisson_schedule(rate, duration, random.Random(1), max_requests=10**6))
    assert np.all(np.diff(t) > 0) and t[0] > 0 and t[-1] < duration
    n = len(t)
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)  # Poisson count: sd = sqrt(mean)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)  # exponential: CV 1
    assert (gaps < 1 / rate).mean() == pytest.approx(
        1 - math.exp(-1), abs=0.015
    )  # exponential CDF at the mean
    counts = np.histogram(t, bins=int(duration), range=(0, duration))[0]  # per-second counts: var = mean
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.45)


def test_poisson_schedule_bounds_and_errors():
    assert len(poisson_schedule(1000.0, 10.0, random.Random(0), max_requests=7)) == 7
    a = poisson_schedule(50.0, 2.0, random.Random(3), 10**6)
    assert a == poisson_schedule(50.0, 2.0, random.Random(3), 10**6)  # seeded: reproducible
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="rate"):
            poisson_schedule(bad, 1.0, random.Random(0), 10)
    with pytest.raises(ValueError, match="duration"):
        poisson_schedule(1.0, 0.0, random.Random(0), 10)


# ---- analysis math -------------------------------------------------------------------------------

METRIC = {"1/1": 0.9, "0.25/0.5": 0.8}


def _records() -> list[Record]:
    recs = [Record(i * 0.01, float(i + 1), 200, 1.0, 1.0) for i in range(6)]  # 1..6 ms, full net
    recs += [Record(0.1, 3.0, 200, 0.25, 0.5)]  # small net, in time
    recs += [Record(0.2, 30.0, 200, 1.0, 1.0)]  # answered but late: a miss
    recs += [Record(0.3, 2.0, 503)]  # rejected: a miss (not in the percentiles)
    recs += [Record(0.4, math.inf, 0)]  # timed out: a miss
    return recs


def test_analyze_counts_misses_as_failures():
    s = analyze(_records(), budget_ms=10.0, metric=METRIC, wall_s=2.0)
    assert (s.requests, s.answered, s.within_budget) == (10, 8, 7)
    assert s.attainment == pytest.approx(0.7)
    assert s.errors == pytest.approx(0.2)
    # 6 x 0.9 + 1 x 0.8 over all 10 requests; the late 200, the 503 and the timeout count 0
    assert s.effective_accuracy == pytest.approx((6 * 0.9 + 0.8) / 10)
    assert s.throughput_rps == pytest.approx(4.0) and s.goodput_rps == pytest.approx(3.5)
    assert s.shares == {"1/1": pytest.approx(7 / 8), "0.25/0.5": pytest.approx(1 / 8)}
    assert s.within_by_subnet == {"1/1": pytest.approx(6 / 7), "0.25/0.5": 1.0}  # of each one's 200s
    lat = [1, 2, 3, 4, 5, 6, 3, 30]  # only the 200s
    assert s.p50_ms == pytest.approx(3.5)
    assert s.p95_ms == pytest.approx(np.percentile(lat, 95))
    assert s.p99_ms == pytest.approx(30 - 0.07 * 24)  # linear interpolation between 6 and 30


def test_two_runs_served_alike_score_the_same_accuracy_and_the_check_calls_it_a_tie():
    """Every request within budget on one sub-network scores exactly its metric, whatever the
    count: serve-89's sla and fixed smallest both ran 0.25/0.5 within budget for 4712 and 4668
    requests, a running sum made them 0.8394499999999646 and ...648, and the check said sla
    was below."""
    metric = {"0.25/0.5": 0.83945, "1/1": 0.9}
    scores = [
        analyze(
            [Record(i * 1e-3, 5.0, 200, 0.25, 0.5) for i in range(n)], 50.0, metric, 10.0
        ).effective_accuracy
        for n in (4712, 4668, 6948, 7070)
    ]
    assert scores == [0.83945] * 4
    pts = [
        {"policy": pol, "load": 2.0, "attainment": 1.0, "effective_accuracy": acc,
         "block_effective_accuracy": [acc] * 5, "block_attainment": [1.0] * 5}
        for pol, acc in (("sla", 0.8394499999999646), ("fixed-smallest", 0.8394499999999648))
    ]  # fmt: skip
    assert checks({"points": pts, "hog": []})[1]["ok"] is True
    pts[0]["effective_accuracy"] = 0.8394  # a real shortfall still counts
    assert checks({"points": pts, "hog": []})[1]["ok"] is False


def test_analyze_splits_the_time_outside_the_server_and_counts_the_misses_it_could_not_see():
    recs = [
        Record(0, 8.0, 200, 1, 1, {"total": 7.0}),  # 1 ms outside, met
        Record(0, 12.0, 200, 1, 1, {"total": 9.0}),  # late, but the server's total was in budget
        Record(0, 14.0, 200, 1, 1, {"total": 13.0}),  # late, and the server saw it late
        Record(0, 9.0, 200, 1, 1),  # no Server-Timing: in nothing below
        Record(0, math.inf, 0),  # a timeout: not a 200
    ]
    s = analyze(recs, budget_ms=10.0, metric=METRIC, wall_s=1.0)
    assert s.outside_p50_ms == pytest.approx(1.0) and s.outside_p99_ms == pytest.approx(
        np.percentile([1, 3, 1], 99)
    )
    assert s.unseen_misses == pytest.approx(1 / 5)  # of all requests
    assert analyze([Record(0, 5.0, 200, 1, 1)], 10.0, METRIC, 1.0).outside_p50_ms is None


def test_analyze_budget_is_inclusive_and_rejects_unknown_subnetworks():
    assert analyze([Record(0, 10.0, 200, 1, 1)], 10.0, METRIC, 1.0).attainment == 1.0
    with pytest.raises(ValueError, match="0.5/1"):
        analyze([Record(0, 1.0, 200, 0.5, 1.0)], 10.0, METRIC, 1.0)
    with pytest.raises(ValueError, match="budget_ms"):
        analyze([], 0.0, METRIC, 1.0)
    empty = analyze([], 10.0, METRIC, 1.0)
    assert empty.attainment == 0.0 and empty.p99_ms is None


def test_percentile_and_timeline():
    assert percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert percentile([], 99) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    recs = [Record(0.1, 1.0, 200, 1, 1), Record(0.2, 50.0, 200, 1, 1), Record(1.5, 1.0, 200, 1, 1)]
    assert attainment_timeline(recs, 10.0, 1.0) == [(0.0, 0.5), (1.0, 1.0)]


def test_parse_server_timing():
    h = 'queue;dur=1.25, infer;desc="model";dur=3.5,total;dur=5, nodur'
    assert parse_server_timing(h) == {"queue": 1.25, "infer": 3.5, "total": 5.0}
    assert parse_server_timing(None) == {}


def test_capacity_is_the_median_round_with_its_own_host_probe():
    from bench.serve import capacity_of

    def rnd(rps: float, host_ms: float) -> dict:
        return {"rps": rps, "wall_s": 4.0, "p50_ms": 100.0, "host_ms": host_ms}

    # one round in a fast stretch of the host (200 req/s at a 3 ms probe) does not set the scale
    cap = capacity_of([rnd(200.0, 3.0), rnd(120.0, 5.2), rnd(125.0, 5.0)], 32)
    assert cap["rps"] == 125.0 and cap["host_ms"] == 5.0 and len(cap["rounds"]) == 3
    assert "median of 3 round(s)" in cap["method"] and "200.0, 120.0, 125.0 req/s" in cap["method"]
    # nor does one noisy probe (serve-121): the reference speed is the probes' median on its own
    cap = capacity_of([rnd(184.3, 4.41), rnd(196.0, 4.17), rnd(193.2, 7.18)], 32)
    assert cap["rps"] == 193.2 and cap["host_ms"] == 4.41
    # an even count takes the lower middle: a round that ran, a probe that was read
    two = capacity_of([rnd(130.0, 4.0), rnd(110.0, 6.0)], 32)
    assert two["rps"] == 110.0 and two["host_ms"] == 4.0
    assert capacity_of([rnd(130.0, 4.0)], 32)["rps"] == 130.0


def test_low_load_overhead_subtracts_each_requests_own_tokenise_and_forward():
    """The basis is the p50 of tokenise + forward per request (paired), not the sum of the two p50s;
    a server without a tokenize span falls back to the forward pass alone, then to infer."""
    from bench.serve import _low_load_summary

    def rec(e2e: float, **ms: float) -> Record:
        return Record(0.0, e2e, 200, server_ms=ms)

    # tokenise is slow exactly when forward is fast: the sum of the p50s (1 + 10) misses the
    # requests' own cost (3 + 8 = 11, 1 + 10 = 11, 0.5 + 12 = 12.5 -> p50 11)
    recs = [
        rec(14.0, tokenize=3.0, forward=8.0, infer=9.0, total=13.0),
        rec(14.0, tokenize=1.0, forward=10.0, infer=11.0, total=13.0),
        rec(15.0, tokenize=0.5, forward=12.0, infer=13.0, total=14.0),
        Record(0.0, 1.0, 503, server_ms={"tokenize": 0.1, "forward": 0.1}),  # refused: not counted
    ]
    s = _low_load_summary(recs)
    assert s["requests"] == 3 and s["basis"] == "tokenize+forward"
    assert s["basis_p50_ms"] == pytest.approx(11.0) and s["overhead_ms"] == pytest.approx(14.0 - 11.0)
    assert s["overhead_forward_ms"] == pytest.approx(14.0 - 10.0)
    assert s["overhead_infer_ms"] == pytest.approx(14.0 - 11.0)
    older = _low_load_summary([rec(14.0, forward=10.0, infer=11.0)])
    assert older["basis"] == "forward" and older["overhead_ms"] == pytest.approx(4.0)
    oldest = _low_load_summary([rec(14.0, infer=11.0)])
    assert oldest["basis"] == "infer" and oldest["overhead_ms"] == pytest.approx(3.0)
    assert _low_load_summary([rec(14.0)])["overhead_ms"] is None


def test_parse_gauges():
    text = (
        "# TYPE dynabert_contention_factor gauge\n"
        'dynabert_contention_factor{model="a"} 1.5\n'
        'dynabert_contention_factor{model="b"} 2.25\n'
        "dynabert_cpu_utilization_ratio 0.75\n"
        'dynabert_contention_factor_other{model="a"} 9\n'
    )
    assert parse_gauges(text) == {"contention_factor": 2.25, "cpu_utilization_ratio": 0.75}
    assert parse_gauges("") == {}


def test_parse_threads_sums_the_forward_passes_by_thread_count():
    text = (
        "# TYPE dynabert_inference_threads_total counter\n"
        'dynabert_inference_threads_total{model="a",threads="1"} 7.0\n'
        'dynabert_inference_threads_total{model="b",threads="1"} 2.0\n'
        'dynabert_inference_threads_total{model="a",threads="2"} 3.0\n'
        'dynabert_inference_threads_created{model="a",threads="2"} 1.7e9\n'
    )
    assert parse_threads(text) == {1: 9, 2: 3}
    assert parse_threads("") == {}


def test_subnet_metrics_from_models_or_eval():
    models = {
        "models": [
            {
                "name": "sst2",
                "subnetworks": [
                    {"width": 1.0, "depth": 1.0, "metric": "accuracy", "value": 0.91},
                    {"width": 0.25, "depth": 0.5, "metric": "accuracy", "value": 0.85},
                ],
            }
        ]
    }
    assert subnet_metrics(models, None) == {"1/1": 0.91, "0.25/0.5": 0.85}
    assert subnet_metrics({}, [{"width": 0.5, "depth": 0.75, "value": 0.8}]) == {"0.5/0.75": 0.8}


def test_paired_differences_and_their_confidence_interval_by_hand():
    # differences 1, 2, 3: mean 2, sample sd 1, t(0.975, 2 df) = 4.303 -> half-width 4.303 / sqrt 3
    mean, half = paired([3.0, 5.0, 7.0, 9.0], [2.0, 3.0, 4.0])  # the longer list is cut to the pairs
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.303 / math.sqrt(3))
    # identical shifts in both members of every pair: no noise left in the differences
    assert paired([0.9, 0.5, 0.7], [0.8, 0.4, 0.6]) == (pytest.approx(0.1), pytest.approx(0.0))
    assert paired([1.0], [0.5]) is None and paired([], []) is None
    # many pairs: the normal quantile
    a = [0.1 * (j % 3) for j in range(40)]
    assert paired(a, [0.0] * 40)[1] == pytest.approx(1.96 * np.std(a, ddof=1) / math.sqrt(40))


def test_point_stats_keeps_each_blocks_attainment_and_accuracy():
    blocks = [
        {
            "records": [Record(0, 5.0, 200, 1, 1), Record(0.1, 50.0, 200, 1, 1)],
            "wall": 1.0,
            "cpu": 0.1,
            "gauges": {},
            "server_cpu": {"requests": 3, "front_s": 0.003, "worker_s": 0.009},  # 3 sent, warm-up included
        },
        {
            "records": [Record(0, 5.0, 200, 0.25, 0.5)],
            "wall": 1.0,
            "cpu": 0.1,
            "gauges": {},
            "server_cpu": {"requests": 1, "front_s": 0.005, "worker_s": 0.003},
        },
    ]
    cfg = BenchConfig(checkpoint=None, budget_ms=10.0)  # type: ignore[arg-type]
    p = point_stats("sla", 1.0, 10.0, blocks, METRIC, cfg)
    assert p["attainment"] == pytest.approx(2 / 3)  # pooled
    assert p["block_attainment"] == [0.5, 1.0]
    assert p["block_effective_accuracy"] == [pytest.approx(0.45), pytest.approx(0.8)]
    # the server's CPU per request over both blocks: (3 + 5) ms and (9 + 3) ms over 4 requests
    assert p["server_cpu_ms_per_request"] == {"front": pytest.approx(2.0), "worker": pytest.approx(3.0)}


def _pt(policy: str, load: float, blocks_acc: list[float], att: float = 1.0) -> dict:
    return {
        "policy": policy,
        "load": load,
        "attainment": att,
        "effective_accuracy": sum(blocks_acc) / len(blocks_acc),
        "block_effective_accuracy": blocks_acc,
        "block_attainment": [att] * len(blocks_acc),
    }


def test_checks_tell_a_shortfall_within_the_noise_from_one_beyond_it():
    result = {
        "points": [
            # 1x: sla below fixed smallest on the mean, but the paired differences straddle 0
            _pt("sla", 1.0, [0.85, 0.78, 0.84, 0.81]),
            _pt("fixed-smallest", 1.0, [0.83, 0.83, 0.83, 0.83]),
            # 2x: below in every pair by about two points: beyond the noise
            _pt("sla", 2.0, [0.81, 0.809, 0.811, 0.81], att=0.97),
            _pt("fixed-smallest", 2.0, [0.83, 0.83, 0.83, 0.83]),
            _pt("fixed-full", 2.0, [0.1, 0.1, 0.1, 0.1], att=0.1),
        ],
        "hog": [],
    }
    target2x, acc = checks(result)[:2]
    assert target2x["ok"] is False and "sla 97.0% (blocks 97.0-97.0%)" in target2x["measured"]
    assert acc["ok"] is False
    assert "1x vs fixed-smallest (-1.00 ± 5.03)" in acc["measured"]  # sd 0.0316 x 3.182 / 2
    assert "2x vs fixed-smallest (-2.00 ± 0.13)" in acc["measured"]
    assert acc["measured"].endswith("below by more than that CI at: 2x vs fixed-smallest")
    # without blocks (an older result file) the plain verdict stays
    for p in result["points"]:
        del p["block_effective_accuracy"]
    assert "±" not in checks(result)[1]["measured"]


def test_a_variant_is_its_base_policy_with_settings_of_its_own(tmp_path):
    import argparse

    spec = policy_spec("sla@shed_late=false@MAX_BATCH_SIZE=4", [0.25, 1.0], [0.5, 1.0])
    assert spec.name == "sla@shed_late=false@MAX_BATCH_SIZE=4" and spec.subnet is None
    assert spec.env == {
        "DYNABERT_POLICY": "sla",
        "DYNABERT_SHED_LATE": "false",
        "DYNABERT_MAX_BATCH_SIZE": "4",
    }
    small = policy_spec("fixed-smallest@max_batch_size=1", [0.25, 1.0], [0.5, 1.0])
    assert small.subnet == (0.25, 0.5) and small.env["DYNABERT_FIXED_DEPTH"] == "0.5"
    assert small.env["DYNABERT_MAX_BATCH_SIZE"] == "1"
    (tmp_path / "dynabert.json").write_text("{}")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tmp_path), "--policies"]
    ok = config_from_args(parser.parse_args([*base, "sla,sla@shed_late=false,fixed-smallest"]))
    assert ok.policies == ("sla", "sla@shed_late=false", "fixed-smallest")
    # a typo, a setting that would make it another policy, no value, an unknown base, twice the same
    for bad in ("sla@shed_lat=false", "sla@fixed_width=0.5", "sla@shed_late", "max@shed_late=1", "sla,sla"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, bad])


def test_the_hog_scenario_runs_sla_its_variants_then_fixed_full():
    asked = ["fixed-smallest", "fixed-full", "sla@feedback_quantile=0.5", "sla"]
    asked += ["fixed-full@max_batch_size=4", "sla@shed_late=false"]
    assert hog_policies(asked) == ["sla", "sla@feedback_quantile=0.5", "sla@shed_late=false", "fixed-full"]
    assert hog_policies(["fixed-smallest"]) == []


def test_variant_effects_pair_a_variant_with_its_base_block_by_block():
    result = {
        "config": {"budget_ms": 50, "duration_s": 10, "blocks": 4},
        "points": [
            _pt("sla", 3.0, [0.80, 0.70, 0.82, 0.75], att=0.9),
            # one point below its base in every block: an effect beyond the noise
            _pt("sla@shed_late=false", 3.0, [0.78, 0.68, 0.80, 0.73], att=0.88),
            _pt("fixed-smallest", 3.0, [0.8] * 4),
            _pt("sla@shed_late=false", 2.0, [0.8] * 4),  # its base did not run at 2x: no row
        ],
        "hog": [],
        "checks": [],
    }
    (v,) = variant_effects(result)
    assert (v["variant"], v["base"], v["load"]) == ("sla@shed_late=false", "sla", 3.0)
    assert v["attainment"] == pytest.approx(-0.02) and v["effective_accuracy"] == pytest.approx(-0.02)
    assert v["effective_accuracy_paired"] == (pytest.approx(-0.02), pytest.approx(0.0, abs=1e-9))
    table = markdown({**result, "points": [], "variants": [v]})  # the variants' table alone
    assert "| sla@shed_late=false vs sla | 3x | -2.00 (-2.00 ± 0.00) | -2.00 (-2.00 ± 0.00) |" in table


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_host_probe_reads_a_shared_core_as_a_slower_host():
    """Sharing its core with a spinning process, the probe's loop runs at about half speed: what
    a neighbour taking the host's cycles looks like from inside a VM. Alone, the fastest of three
    probes: a VM's host slows it by itself at times (4.1 against 7.1 ms a try, tries apart), and
    one alone probe that fell in such a stretch read a shared core as only 1.1x slower."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        alone = min(host_probe_ms() for _ in range(3))
        spin = (
            f"import os; os.sched_setaffinity(0, {{{cpu}}}); print('spinning', flush=True)\nwhile True: pass"
        )
        hog = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
        try:
            # running, and on that core
            assert hog.stdout is not None and hog.stdout.readline().strip() == "spinning"
            shared = host_probe_ms()
        finally:
            hog.kill()
            hog.wait()
            hog.stdout.close()
    finally:
        os.sched_setaffinity(0, before)
    assert 0 < alone and shared > 1.3 * alone


def test_checks_and_tables_say_where_the_hosts_speed_was_off_the_capacity_measurements():
    result = {
        "host": {"start_ms": 4.0},
        "points": [
            {**_pt("sla", 1.0, [0.85, 0.85]), "host_ms": 4.2, "host_min_ms": 3.6},
            {**_pt("fixed-smallest", 1.0, [0.84, 0.84]), "host_ms": 4.1, "host_min_ms": 4.0},
            {**_pt("sla", 2.0, [0.80, 0.80], att=0.95), "host_ms": 6.0, "host_min_ms": 4.0},
            {**_pt("fixed-smallest", 2.0, [0.84, 0.84]), "host_ms": 4.0},
            {**_pt("fixed-full", 2.0, [0.0, 0.0], att=0.0), "host_ms": 4.4},
        ],
        "hog": [],
    }
    assert host_slowdown(result, 6.0) == pytest.approx(1.5) and host_slowdown({}, 6.0) is None
    assert host_drift(result, result["points"][2]) == pytest.approx(1.5)
    assert host_drift(result, result["points"][0]) == pytest.approx(-4 / 3.6)  # farther than 4.2 / 4
    assert host_drift({}, result["points"][2]) == 1.0  # no probes
    target2x, acc = checks(result)[:2]
    assert target2x["measured"].endswith(
        "; the host ran 1.5x slower than at the capacity measurement (host_probe_ms)"
    )
    assert acc["measured"].endswith("off the capacity measurement's at: 2x")
    result["points"][2]["host_ms"] = 4.8  # 1.2x: within what counts as the same host
    assert "host" not in checks(result)[0]["measured"] and "host" not in checks(result)[1]["measured"]
    # a faster host: the loads were scaled to a slower one, so 2x was less than twice its capacity
    result["points"][4]["host_min_ms"] = 2.5
    assert checks(result)[0]["measured"].endswith(
        "the host ran 1.6x faster than at the capacity measurement (host_probe_ms)"
    )
    assert host_drift(result, result["points"][4]) == pytest.approx(-1.6)
    del result["host"]  # a result from before the probes: no words about the host
    assert "host" not in checks(result)[0]["measured"]


def test_a_given_capacity_scales_the_loads_and_keeps_the_measurement(tiny_cls_checkpoint):
    measured = {"rps": 89.1, "method": "closed loop, 32 concurrent clients, 4.5 s", "p50_ms": 400.0}
    assert load_scale(measured, None) is measured
    given = load_scale(measured, 60.0)
    assert given["rps"] == 60.0 and given["measured_rps"] == 89.1 and given["p50_ms"] == 400.0
    assert given["method"].startswith("given (--capacity 60); measured 89.1 req/s, closed loop")

    import argparse

    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tiny_cls_checkpoint)]
    assert config_from_args(parser.parse_args(base)).capacity_rps is None
    assert config_from_args(parser.parse_args([*base, "--capacity", "60"])).capacity_rps == 60.0
    with pytest.raises(ValueError, match="--capacity must be > 0"):
        config_from_args(parser.parse_args([*base, "--capacity", "0"]))
    # the clients' timeout: 20x the budget, at least 2 s, unless given
    assert config_from_args(parser.parse_args(base)).timeout_s == 2.0
    assert config_from_args(parser.parse_args([*base, "--budget-ms", "500"])).timeout_s == 10.0
    assert config_from_args(parser.parse_args([*base, "--client-timeout-ms", "250"])).timeout_s == 0.25
    with pytest.raises(ValueError, match="--client-timeout-ms must be > 0"):
        config_from_args(parser.parse_args([*base, "--client-timeout-ms", "-1"]))


def test_server_workers_reach_the_servers_command_line(tiny_cls_checkpoint, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tiny_cls_checkpoint)]
    assert config_from_args(parser.parse_args(base)).server_workers == 1
    assert config_from_args(parser.parse_args([*base, "--server-workers", "2"])).server_workers == 2
    with pytest.raises(ValueError, match="--server-workers must be >= 1"):
        config_from_args(parser.parse_args([*base, "--server-workers", "0"]))
    one = Server(tiny_cls_checkpoint, {}, tmp_path / "a.log").command()
    assert "--workers" not in one and one[1:4] == ["-m", "model.cli", "serve"]
    two = Server(tiny_cls_checkpoint, {}, tmp_path / "b.log", workers=2).command()
    assert two[-2:] == ["--workers", "2"] and two[:6] == one[:6] and len(two) == len(one) + 2
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Server(tiny_cls_checkpoint, {}, tmp_path / "c.log", workers=0)
    result = {"machine": {"cpus": 2}, "config": {"server_workers": 2}}
    assert "every server with 2 uvicorn workers" in _machine(result)
    assert "uvicorn" not in _machine({"machine": {"cpus": 2}, "config": {"server_workers": 1}})


def test_a_server_cgroup_takes_the_server_before_it_starts(tiny_cls_checkpoint, tmp_path):
    """``--server-cgroup DIR``: the server writes its own pid to DIR/cgroup.procs before it execs
    (a real cgroup's file moves it there, its workers follow as its children; a plain file here
    just records the pid). The load generator stays outside."""
    import argparse

    group = tmp_path / "group"
    group.mkdir()
    (group / "cgroup.procs").write_text("")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tiny_cls_checkpoint)]
    assert config_from_args(parser.parse_args(base)).server_cgroup is None
    assert config_from_args(parser.parse_args([*base, "--server-cgroup", str(group)])).server_cgroup == group
    with pytest.raises(ValueError, match="cannot write its cgroup.procs"):
        config_from_args(parser.parse_args([*base, "--server-cgroup", str(tmp_path / "none")]))
    env = {"DYNABERT_CALIBRATE": "false", "DYNABERT_INSTANCES": "1"}
    with Server(tiny_cls_checkpoint, env, tmp_path / "s.log", cgroup=group) as server:
        assert server.proc is not None
        # exec kept the pid: the one written is the server's own
        assert (group / "cgroup.procs").read_text().split() == [str(server.proc.pid)]
        assert httpx.get(server.base_url + "/readyz", trust_env=False).status_code == 200
    assert "the servers in cgroup /sys/fs/cgroup/cpu/x; " in markdown(
        {"config": {"budget_ms": 50, "duration_s": 1, "server_cgroup": "/sys/fs/cgroup/cpu/x"},
         "points": [], "hog": [], "checks": []}
    )  # fmt: skip


def test_server_cpu_splits_the_front_processes_from_the_inference_workers(tmp_path):
    """With ``--workers`` the server is a tree: uvicorn's supervisor, its worker processes (the
    front: event loop, HTTP) and under each an inference worker (``-m service.worker``). A real tree
    of spinning processes stands in for it: each child burns 0.3 s of CPU."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(60)"
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {spin!r}, 'service.worker'])\n"
        f"subprocess.Popen([sys.executable, '-c', {spin!r}])\n"
        "time.sleep(60)"
    )
    server = Server(tmp_path, {}, tmp_path / "x.log")
    server.proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = psutil.Process(server.proc.pid).children()
            if len(kids) == 2 and all(sum(k.cpu_times()[:2]) >= 0.3 for k in kids):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the stand-in processes did not spin")
        front, worker = server.cpu_s()
        parent_cpu = sum(psutil.Process(server.proc.pid).cpu_times()[:2])  # asleep: no more since
        assert 0.3 <= worker < 0.6  # the inference worker alone
        assert 0.3 <= front - parent_cpu < 0.6  # the supervisor and the other child, the front
    finally:
        for k in psutil.Process(server.proc.pid).children(recursive=True):
            k.kill()
        server.proc.kill()
        server.proc.wait()


def test_markdown_table_has_every_point():
    s = analyze(_records(), 10.0, METRIC, 2.0).__dict__
    result = {
        "config": {"budget_ms": 10.0, "duration_s": 2.0, "hog_duration_s": 4.0, "hog_load": 1.0},
        "capacity": {"rps": 100.0, "method": "closed loop"},
        "points": [{"policy": p, "load": 2.0, "offered_rps": 200.0, **s} for p in ("sla", "fixed-full")],
        "hog": [],
        "checks": [{"target": "t", "measured": "m", "ok": False}],
    }
    md = markdown(result)
    assert md.count("| sla | 2x | 200 |") == 1 and "| fixed-full | 2x |" in md
    assert "70.0%" in md and "| t | m | **no** |" in md
    result["points"][0]["block_attainment"] = [0.931, 0.99]
    assert "| 70.0% (blocks 93.1-99.0%) |" in markdown(result)
    assert md.count("| n/a | — |") == 2  # no host probes: the host column (last) is empty
    result["host"] = {"start_ms": 4.0}
    result["points"][0]["host_ms"] = 6.0
    md = markdown(result)
    assert "| 1.50 |" in md and "the median of the capacity rounds' probes (4.00 ms)" in md
    result["points"][0]["host_min_ms"] = 3.0  # the point's fastest and slowest probes
    assert "| 0.75-1.50 |" in markdown(result)


# ---- the open loop, against a slow loopback server --------------------------------------------------


async def _slow_server(delay_s: float, arrivals: list[float]):
    """A minimal HTTP/1.1 keep-alive server that answers every POST after ``delay_s``."""
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                arrivals.append(loop.time())
                await asyncio.sleep(delay_s)
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"x-dynabert-width: 1.0\r\nx-dynabert-depth: 1.0\r\n"
                    b"server-timing: queue;dur=0.1, infer;dur=2.0, total;dur=2.5\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_open_loop_fires_on_schedule_regardless_of_completions():
    async def main():
        arrivals: list[float] = []
        server = await _slow_server(1.0, arrivals)
        port = server.sockets[0].getsockname()[1]
        schedule = [0.01 * i for i in range(1, 21)]  # 20 requests over 0.2 s, each answered after 1 s
        events: list[float] = []
        loop = asyncio.get_running_loop()
        async with server, make_client() as client:
            t0 = loop.time()
            records, wall = await open_loop(
                client,
                f"http://127.0.0.1:{port}",
                schedule,
                ["hello"],
                budget_ms=1000,
                timeout_s=5,
                at=[(0.1, lambda: events.append(loop.time() - t0))],
            )
        return arrivals, records, wall, events

    arrivals, records, wall, events = asyncio.run(main())
    assert len(arrivals) == 20
    # open loop: every request reached the server before the first answer could come back (1 s)
    assert max(arrivals) - min(arrivals) < 0.9
    assert all(r.status == 200 and r.width == 1.0 and r.server_ms["infer"] == 2.0 for r in records)
    lat = [r.latency_ms for r in records]
    assert min(lat) >= 1000 and max(lat) < 2000
    assert 1.15 < wall < 3.0
    assert len(events) == 1 and 0.09 < events[0] < 0.6


def test_a_block_sends_its_warm_up_and_counts_only_what_follows(tmp_path):
    from types import SimpleNamespace

    from bench.serve import _run_block

    async def main(warmup_s: float):
        arrivals: list[float] = []
        server = await _slow_server(0.005, arrivals)
        port = server.sockets[0].getsockname()[1]
        cfg = BenchConfig(checkpoint=tmp_path, warmup_s=warmup_s)
        target = SimpleNamespace(base_url=f"http://127.0.0.1:{port}", cpu_s=lambda: (0.0, 0.0))
        async with server, make_client() as client:
            block = await _run_block(client, target, 200.0, 0.4, ["x"], cfg, random.Random(0))
        return arrivals, block

    arrivals, block = asyncio.run(main(0.4))
    records = block["records"]
    # the server got the warm-up's requests too; the block kept those sent after it, re-timed
    # from the block's own start, and its wall time is the counted part's
    assert 50 < len(records) < 120 and len(arrivals) > len(records) + 40  # ~80 and ~80 more
    assert all(0 <= r.sched_s < 0.4 and r.status == 200 for r in records)
    assert 0.35 < block["wall"] < 0.7
    assert block["records"] == sorted(records, key=lambda r: r.sched_s)
    arrivals, block = asyncio.run(main(0.0))  # no warm-up: every request counts (the server
    n = len(block["records"])  # also counts the block's reads of /metrics at its end)
    assert 50 < n <= len(arrivals) <= n + 3


def test_open_loop_counts_timeouts_and_refuses_non_loopback():
    async def main():
        server = await _slow_server(2.0, [])
        port = server.sockets[0].getsockname()[1]
        async with server, make_client() as client:
            return await open_loop(
                client, f"http://127.0.0.1:{port}", [0.01, 0.02], ["x"], budget_ms=100, timeout_s=0.3
            )

    records, _ = asyncio.run(main())
    assert [r.status for r in records] == [0, 0] and all(math.isinf(r.latency_ms) for r in records)
    for url in ("http://example.com:80", "http://10.0.0.1:8000", "http://localhost:1"):
        with pytest.raises(ValueError, match="127.0.0.1"):
            check_loopback(url)


# ---- the CPU hog ---------------------------------------------------------------------------------


def test_cpu_hog_spins_and_stops():
    assert spin(0.05) > 1000
    with pytest.raises(ValueError):
        CpuHog(processes=0)
    hog = CpuHog(processes=2, max_seconds=30)
    with hog:
        procs = [psutil.Process(pid) for pid in hog.pids]
        time.sleep(0.3)  # past the interpreter's start-up
        t0 = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(0.7)
        busy = [sum(p.cpu_times()[:2]) - t for p, t in zip(procs, t0, strict=True)]
        assert hog.running
    assert not hog.running and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert all(b > 0.03 for b in busy), busy  # each kept using CPU (a sleeping process would use ~0)


def test_cpu_hog_stops_by_itself():
    hog = CpuHog(processes=1, max_seconds=0.3).start()
    try:
        deadline = time.monotonic() + 10
        while hog.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not hog.running
    finally:
        hog.stop()


def test_gpu_hog_multiplies_matrices_in_a_child_and_stops():
    # the GPU hog's loop is device-generic: on the CPU it runs float32 products, which is what
    # this test watches (the bench only ever points it at the served CUDA device: hog_for)
    matmuls(0.01, "cpu", 32)  # torch's first product starts its thread pool
    assert matmuls(0.2, "cpu", 32) > 10
    with pytest.raises(ValueError):
        matmuls(0.1, "cpu", 0)
    with pytest.raises(ValueError):
        GpuHog(device="cpu", size=0)
    hog = GpuHog(device="cpu", size=256, max_seconds=30)
    with hog:
        (proc,) = [psutil.Process(pid) for pid in hog.pids]
        time.sleep(1.5)  # past the interpreter's start-up and torch's import
        t0 = sum(proc.cpu_times()[:2])
        time.sleep(0.7)
        busy = sum(proc.cpu_times()[:2]) - t0
        assert hog.running
    assert not hog.running and not (proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    assert busy > 0.03, busy


def test_hog_for_matches_the_served_device():
    assert isinstance(hog_for("cpu", "cpu", 10), CpuHog)
    gpu = hog_for("gpu", "cuda:1", 10)
    assert isinstance(gpu, GpuHog) and gpu.device == "cuda:1" and gpu.processes == 1
    with pytest.raises(ValueError, match="CUDA"):
        hog_for("gpu", "cpu", 10)
    with pytest.raises(ValueError):
        hog_for("disk", "cpu", 10)


def test_device_flag_reaches_the_config_and_picks_the_hog(tmp_path):
    import argparse

    (tmp_path / "dynabert.json").write_text("{}")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tmp_path)]
    cpu = config_from_args(parser.parse_args(base))
    assert (cpu.device, cpu.hog_kind) == ("cpu", "cpu")
    gpu = config_from_args(parser.parse_args([*base, "--device", "cuda:0"]))
    assert (gpu.device, gpu.hog_kind) == ("cuda:0", "gpu")
    both = config_from_args(parser.parse_args([*base, "--device", "cuda", "--hog-kind", "cpu"]))
    assert both.hog_kind == "cpu"
    with pytest.raises(ValueError, match="CUDA"):
        config_from_args(parser.parse_args([*base, "--hog-kind", "gpu"]))


def test_send_timeout_announces_the_clients_timeout(tmp_path):
    import argparse

    (tmp_path / "dynabert.json").write_text("{}")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tmp_path), "--client-timeout-ms", "250"]
    assert config_from_args(parser.parse_args(base)).client_headers() is None
    sent = config_from_args(parser.parse_args([*base, "--send-timeout"]))
    assert sent.send_timeout and sent.client_headers() == {"X-Request-Timeout-Ms": "250"}


def test_warmup_flag(tmp_path):
    import argparse

    (tmp_path / "dynabert.json").write_text("{}")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    base = ["serve", "--checkpoint", str(tmp_path)]
    assert config_from_args(parser.parse_args(base)).warmup_s == 0.5
    assert config_from_args(parser.parse_args([*base, "--quick"])).warmup_s == 0.0
    assert config_from_args(parser.parse_args([*base, "--warmup", "0"])).warmup_s == 0.0
    with pytest.raises(ValueError, match="--warmup"):
        config_from_args(parser.parse_args([*base, "--warmup", "-1"]))
    result = {
        "config": {"budget_ms": 50, "duration_s": 10, "blocks": 5, "warmup_s": 0.5},
        "points": [],
        "hog": [],
        "checks": [],
    }
    assert "each block after 0.5 s of warm-up at its rate (not counted)" in markdown(result)


# ---- end to end against the real server -------------------------------------------------------------


def test_quick_bench_against_real_server(tiny_cls_checkpoint, tmp_path, capsys):
    pytest.importorskip("service.cli")
    from model.cli import main

    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    rc = main(
        ["bench", "serve", "--quick", "--checkpoint", str(tiny_cls_checkpoint), "--budget-ms", "200"]
        + ["--json", str(out), "--plot", str(png), "--duration", "1", "--blocks", "2"]
        + ["--keep-logs", str(tmp_path / "logs")]
        + ["--policies", "sla,fixed-full,fixed-smallest,sla@max_batch_size=1"]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    # the variant's server ran with its own setting: every batch of one request
    variant = [json.loads(x) for x in (tmp_path / "logs" / "server-sla_max_batch_size_1.log").read_text().splitlines()
               if x.startswith("{") and '"dynabert.access"' in x]  # fmt: skip
    batches = {x["batch"] for x in variant if x["endpoint"] == "classify" and x["status"] == 200}
    assert batches == {1}
    assert [(v["variant"], v["load"]) for v in result["variants"]] == [
        ("sla@max_batch_size=1", 0.5),
        ("sla@max_batch_size=1", 2.0),
    ]
    result["points"] = [p for p in result["points"] if "@" not in p["policy"]]
    # the servers' logs are kept where asked: every answered load request has its access line
    # there, with the sub-network its policy chose
    for policy in ("sla", "fixed-full", "fixed-smallest"):
        lines = [json.loads(x) for x in (tmp_path / "logs" / f"server-{policy}.log").read_text().splitlines()
                 if x.startswith("{") and '"dynabert.access"' in x]  # fmt: skip
        chosen = [x for x in lines if x["endpoint"] == "classify" and x["status"] == 200]
        assert chosen and all(x["width"] and x["depth"] and x["reason"] for x in chosen), policy
        if policy == "fixed-smallest":
            assert {(x["width"], x["depth"]) for x in chosen} == {(0.25, 0.5)}
    assert png.stat().st_size > 10_000
    assert result["capacity"]["rps"] > 0
    assert result["host"]["start_ms"] > 0 and result["host"]["end_ms"] > 0
    # --quick measures the capacity twice; the loads multiply the lower round, and the points'
    # host speed is compared with the lower of the rounds' probes
    rounds = result["capacity"]["rounds"]
    assert len(rounds) == 2 and result["capacity"]["rps"] == min(r["rps"] for r in rounds)
    assert result["host"]["start_ms"] == min(r["host_ms"] for r in rounds) > 0
    points = {(p["policy"], p["load"]): p for p in result["points"]}
    assert set(points) == {(p, ld) for p in ("sla", "fixed-full", "fixed-smallest") for ld in (0.5, 2.0)}
    for (policy, _), p in points.items():
        assert p["requests"] > 0 and 0 <= p["attainment"] <= 1
        assert p["blocks"] == 2 and p["wall_s"] > 0.6  # two 0.5 s blocks, pooled
        assert len(p["block_attainment"]) == len(p["block_effective_accuracy"]) == 2
        # the host's speed after each block, the point keeping the slowest
        assert len(p["block_host_ms"]) == 2 and p["host_ms"] == max(p["block_host_ms"]) > 0
        assert p["host_min_ms"] == min(p["block_host_ms"]) > 0
        # the server's own CPU per request, read from its processes: the front (event loop, HTTP,
        # policy) and the inference worker (a child process) both did work for every request
        assert p["server_cpu_ms_per_request"]["front"] > 0 and p["server_cpu_ms_per_request"]["worker"] > 0
        assert p["effective_accuracy"] <= max(result["metrics"].values()) * p["attainment"] + 1e-9
        fixed = {"fixed-full": "1/1", "fixed-smallest": "0.25/0.5"}.get(policy)
        if fixed is not None:  # a fixed policy serves one sub-network; misses count 0
            assert set(p["shares"]) <= {fixed}
            assert p["effective_accuracy"] == pytest.approx(result["metrics"][fixed] * p["attainment"])
    oh = result["overhead"]
    # the overhead is measured against in-process inference, tokenising and the forward pass (timed
    # in the inference worker), both from the server's Server-Timing of the same requests; the
    # stricter numbers against the forward pass alone and the batch as the server sees it (infer:
    # dispatch, worker round trip) beside it
    assert oh["overhead_basis"] == "Server-Timing tokenize+forward" and oh["tokenize_forward_p50_ms"] > 0
    # the in-process cross-check ran on the thread count of the server's forward passes
    assert oh["server_threads"] >= 1 and oh["torch_threads"] == oh["server_threads"]
    hx = oh["httpx"]  # the same requests from the asyncio + httpx client
    sm = oh["smallest"]
    assert hx["requests"] == sm["requests"] == oh["requests"] and sm["subnetwork"] == "0.25/0.5"
    for o in (oh, hx, sm):
        assert o["basis"] == "tokenize+forward"
        assert o["e2e_p50_ms"] > o["server_infer_p50_ms"] >= o["server_forward_p50_ms"] > 0
        assert o["server_tokenize_p50_ms"] > 0
        # every request's tokenise + forward exceeds its forward pass, so their p50s do too
        assert o["basis_p50_ms"] > o["server_forward_p50_ms"]
        assert o["overhead_ms"] == pytest.approx(o["e2e_p50_ms"] - o["basis_p50_ms"])
        assert o["overhead_forward_ms"] == pytest.approx(o["e2e_p50_ms"] - o["server_forward_p50_ms"])
        assert o["overhead_infer_ms"] == pytest.approx(o["e2e_p50_ms"] - o["server_infer_p50_ms"])
        assert o["overhead_ms"] < o["overhead_forward_ms"]
    (check,) = [c for c in result["checks"] if c["target"].startswith("HTTP overhead")]
    assert f"{oh['overhead_ms']:.2f} ms (vs Server-Timing tokenize+forward" in check["measured"]
    assert f"{oh['overhead_forward_ms']:.2f} ms vs the forward pass alone" in check["measured"]
    assert f"{oh['overhead_inprocess_ms']:.2f} ms vs tokenise+forward timed in" in check["measured"]
    printed = capsys.readouterr().out
    assert "| sla | 0.5x |" in printed and "| target (issue 4) |" in printed
    assert "| sla@max_batch_size=1 vs sla | 2x |" in printed
