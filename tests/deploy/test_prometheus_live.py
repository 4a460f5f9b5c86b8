"""A real Prometheus scrapes a running DynaBERT service while the test drives traffic; then every
PromQL expression of the dashboards, the alert rules and the HPA's adapter rule must parse and
return data through Prometheus's HTTP API. A typo or a metric the service does not export fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

# TEMPORARY SCAFFOLD (until service/app.py exists): an exporter with the contract's metric names
# and labels, so the Prometheus-side machinery can be exercised. Replaced by the real service.
SCAFFOLD = textwrap.dedent(
    """
    import random, sys, time
    from prometheus_client import Counter, Gauge, Histogram, start_http_server
    B = (.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 5)
    req = Counter("dynabert_requests", "", ["model", "endpoint", "status"])
    dur = Histogram("dynabert_request_duration_seconds", "", ["model", "endpoint"], buckets=B)
    wait = Histogram("dynabert_queue_wait_seconds", "", ["model"], buckets=B)
    inf = Histogram("dynabert_inference_duration_seconds", "", ["model", "width", "depth"], buckets=B)
    sel = Counter("dynabert_subnetwork_selected", "", ["model", "width", "depth", "reason"])
    bud = Counter("dynabert_latency_budget", "", ["model", "met"])
    budh = Histogram("dynabert_latency_budget_seconds", "", ["model"], buckets=B)
    bs = Histogram("dynabert_batch_size", "", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64))
    qd = Gauge("dynabert_queue_depth", "", ["model"])
    qc = Gauge("dynabert_queue_capacity", "", ["model"])
    cpu = Gauge("dynabert_cpu_utilization_ratio", "")
    gpu = Gauge("dynabert_gpu_utilization_ratio", "")
    cf = Gauge("dynabert_contention_factor", "", ["model"])
    dm = Histogram("dynabert_selected_metric", "", ["model"], buckets=[i / 10 for i in range(11)])
    ready = Gauge("dynabert_model_ready", "", ["model"])
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    m = "tiny-sst2"
    ready.labels(m).set(1); qc.labels(m).set(64); cf.labels(m).set(1.2)
    while True:
        for w, d, status, met in (("1.0", "1.0", "200", "true"), ("0.5", "0.5", "200", "false"),
                                  ("0.25", "0.5", "503", "false"), ("1.0", "1.0", "400", "true")):
            req.labels(m, "classify", status).inc(); dur.labels(m, "classify").observe(random.random() / 10)
            wait.labels(m).observe(0.001); inf.labels(m, w, d).observe(0.004)
            sel.labels(m, w, d, "budget").inc(); bud.labels(m, met).inc(); budh.labels(m).observe(0.02)
            bs.labels(m).observe(2); dm.labels(m).observe(0.85)
        qd.labels(m).set(random.randint(0, 3)); cpu.set(random.random()); gpu.set(0)
        time.sleep(0.05)
    """
)


@pytest.fixture
def dynabert_target(tools):
    """(host:port, drive) for a running service; ``drive()`` sends the traffic."""
    port = tools.free_port()
    proc = subprocess.Popen([sys.executable, "-c", SCAFFOLD, str(port)])
    try:
        tools.wait_http(f"http://127.0.0.1:{port}/metrics", timeout=20, proc=proc)
        yield f"127.0.0.1:{port}", lambda: time.sleep(4)
    finally:
        tools.stop(proc)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def test_every_dashboard_and_alert_expression_returns_data(run_prometheus, dynabert_target, check_queries):
    target, drive = dynabert_target
    with run_prometheus(target, scrape_interval="1s") as prom:
        drive()
        # At least a few scrapes with the traffic in them, and one more after it ended.
        deadline = time.monotonic() + 20
        while True:
            up = check_queries.instant_query(
                prom, f'count_over_time(up{{job="dynabert", instance="{target}"}}[1m])'
            )
            samples = float(up["data"]["result"][0]["value"][1]) if up["data"]["result"] else 0
            if samples >= 4:
                break
            assert time.monotonic() < deadline, f"Prometheus did not scrape {target}: {up}"
            time.sleep(0.5)
        time.sleep(2)

        targets = _get(f"{prom}/api/v1/targets")["data"]["activeTargets"]
        (ours,) = [t for t in targets if t["labels"]["job"] == "dynabert"]
        assert ours["health"] == "up", ours

        # Fill the template variables as Grafana would after a user picks a value: the model from the
        # $model variable's own query, the instance we scrape. (".*" would also match series that
        # lack the label, hiding a missing `model` label.)
        models = check_queries.instant_query(prom, "count by (model) (dynabert_model_ready)")["data"][
            "result"
        ]
        assert models, "dynabert_model_ready has no series: the $model variable would be empty"
        variables = {
            "model": models[0]["metric"]["model"],
            "instance": target,
            "__rate_interval": "20s",
            "__interval": "2s",
            "__range": "2m",
        }
        queries = check_queries.all_queries(variables)
        assert len(queries) >= 30, "expected every panel, variable, alert and adapter rule"
        problems = check_queries.check(prom, queries)
        assert not problems, "\n".join(problems)

        # The check is not vacuous: a misspelt metric and a syntax error are both reported.
        Query = check_queries.Query
        caught = check_queries.check(
            prom, [Query("typo", "dynabert_reqests_total"), Query("syntax", "sum(up")]
        )
        assert [p.split(":")[0] for p in caught] == ["typo", "syntax"], caught

        # The alert rules loaded and evaluated without error in Prometheus itself.
        groups = _get(f"{prom}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} == {
            "DynaBERTBudgetAttainmentLow",
            "DynaBERTServerErrors",
            "DynaBERTQueueNearBound",
            "DynaBERTDown",
        }
        assert all(r["health"] in ("ok", "unknown") for r in rules), rules
