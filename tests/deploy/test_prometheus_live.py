"""A real Prometheus scrapes a running DynaBERT service while the test drives traffic; then every
PromQL expression of the dashboards, the alert rules and the HPA's adapter rule must parse and
return data through Prometheus's HTTP API. A typo or a metric the service does not export fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

# Two uvicorn workers: the production shape of the image (`--workers N`), where /metrics aggregates
# the workers through prometheus-client's multiprocess mode, the riskier path for the queries. A small
# queue bound, so a burst gets 503s.
MODEL_FLAGS = ["--workers", "2", "--max-queue", "2", "--max-batch-size", "8"]


@pytest.fixture
def dynabert_target(tools, tiny_cls_checkpoint, tmp_path):
    """(host:port, drive): the real service (`dynabert serve`, uvicorn workers) on a free loopback
    port, serving the tiny checkpoint of tests/conftest.py; ``drive()`` sends the traffic."""
    port = tools.free_port()
    dynabert = Path(sys.executable).with_name("dynabert")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            dynabert,
            "serve",
            "--checkpoint",
            str(tiny_cls_checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *MODEL_FLAGS,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            tools.wait_http(f"{base}/readyz", timeout=90, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{(tmp_path / 'server.log').read_text()[-4000:]}") from e
        yield f"127.0.0.1:{port}", lambda: drive(base)
    finally:
        tools.stop(proc)
        log.close()


def drive(base: str, seconds: float = 6.0) -> Counter:
    """Traffic over several sub-networks and budgets, met and missed, with client errors and a burst
    past the queue bound; returns the count of each status."""
    statuses: Counter = Counter()
    body = {"text": ["a gripping, beautifully made film", "a dull, lifeless mess"]}

    def post(client: httpx.Client, headers: dict[str, str], json_body: dict = body) -> None:
        statuses[client.post("/v1/classify", json=json_body, headers=headers).status_code] += 1

    with httpx.Client(base_url=base, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for width, depth in (("1.0", "1.0"), ("0.5", "0.75"), ("0.25", "0.5")):  # pinned sub-networks
                post(
                    client,
                    {"X-Latency-Budget-Ms": "1000", "X-DynaBERT-Width": width, "X-DynaBERT-Depth": depth},
                )
            for budget in ("1000", "50", "5", "0.001"):  # routed by budget; the last cannot be met
                post(client, {"X-Latency-Budget-Ms": budget})
            post(client, {"X-DynaBERT-Width": "0.3"})  # not a served width: 400
            post(client, {"X-Latency-Budget-Ms": "100"}, {"text": []})  # empty list: 422
            with ThreadPoolExecutor(12) as pool:  # a burst past the queue bound: some 503
                list(pool.map(lambda _: post(client, {"X-Latency-Budget-Ms": "1000"}), range(12)))
            time.sleep(0.2)
    assert statuses[200] and statuses[400] and statuses[422], statuses
    assert statuses[503], f"the burst never hit the queue bound: {statuses}"
    return statuses


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
            "DynaBERTWorkerRestarts",
            "DynaBERTClientsGivingUp",
            "DynaBERTCPUThrottled",
        }
        assert all(r["health"] in ("ok", "unknown") for r in rules), rules
