"""The Pareto plot's points: one latency per shape, whichever run measured the series."""

from __future__ import annotations

from training.report import pareto_points


def _entry(w: float, d: float, value: float, ms: float | None, flops: float = 1e9) -> dict:
    return {"width": w, "depth": d, "value": value, "latency_ms_cpu": ms, "flops": flops}


def test_every_series_uses_the_main_runs_latency_of_its_shape():
    main = {"subnetworks": [_entry(1.0, 1.0, 0.86, 40.0), _entry(0.5, 1.0, 0.85, 20.0)]}
    # a baseline timed the same shapes at another moment (a slower host): 31 and 12 ms
    baseline = [_entry(1.0, 1.0, 0.84, 31.0), _entry(0.5, 1.0, 0.83, 12.0), _entry(0.25, 1.0, 0.80, 9.0)]
    pts = pareto_points(main, baseline, "latency_ms_cpu")
    # the shapes the main run has are placed at its latencies; (0.25, 1.0) keeps its own
    assert pts == [(9.0, 80.0), (20.0, 83.0), (40.0, 84.0)]


def test_flops_in_gflops_and_entries_without_a_cost_are_left_out():
    main = {"subnetworks": []}
    entries = [_entry(1.0, 1.0, 0.5, None, flops=2.5e9), _entry(0.5, 1.0, 0.25, None, flops=0)]
    assert pareto_points(main, entries, "flops") == [(2.5, 50.0)]
    assert pareto_points(main, entries, "latency_ms_cpu") == []
