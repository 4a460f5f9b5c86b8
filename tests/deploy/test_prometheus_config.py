"""Prometheus config and alert rules: promtool accepts them and the rules' unit tests pass; every
metric any dashboard, alert or adapter rule reads is one docs/CONTRACTS.md defines."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"


def promtool(promtool_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_bin, *args], capture_output=True, text=True, cwd=REPO)


def test_promtool_check_config(promtool_bin):
    result = promtool(promtool_bin, "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(promtool_bin):
    result = promtool(promtool_bin, "check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 rules found" in result.stdout


def test_promtool_alert_unit_tests(promtool_bin):
    result = promtool(promtool_bin, "test", "rules", str(PROM / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_four_alerts_of_the_issue_and_our_own_three():
    rules = {
        r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
    }
    assert set(rules) == {
        "DynaBERTBudgetAttainmentLow",
        "DynaBERTServerErrors",
        "DynaBERTQueueNearBound",
        "DynaBERTDown",
        "DynaBERTWorkerRestarts",
        "DynaBERTClientsGivingUp",
        "DynaBERTCPUThrottled",
    }
    assert (
        "< 0.99" in rules["DynaBERTBudgetAttainmentLow"]["expr"]
        and rules["DynaBERTBudgetAttainmentLow"]["for"] == "5m"
    )
    assert (
        'status=~"5.."' in rules["DynaBERTServerErrors"]["expr"]
        and "for" not in rules["DynaBERTServerErrors"]
    )
    assert {"dynabert_queue_depth", "dynabert_queue_capacity"} <= set(
        re.findall(r"dynabert_\w+", rules["DynaBERTQueueNearBound"]["expr"])
    )
    assert rules["DynaBERTDown"]["expr"].strip() == 'up{job="dynabert"} == 0'
    assert "increase(dynabert_worker_restarts_total[" in rules["DynaBERTWorkerRestarts"]["expr"]
    assert {"dynabert_client_closed_total", "dynabert_requests_total"} <= set(
        re.findall(r"dynabert_\w+", rules["DynaBERTClientsGivingUp"]["expr"])
    )
    throttled = rules["DynaBERTCPUThrottled"]
    assert "dynabert_cpu_throttled_ratio" in throttled["expr"] and throttled["for"] == "10m"
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The scrape job the Down alert watches exists under that name.
    jobs = [j["job_name"] for j in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]]
    assert "dynabert" in jobs


def test_every_queried_metric_is_in_the_contract(check_queries):
    contract = set(re.findall(r"^\| (dynabert_\w+) \|", (REPO / "docs" / "CONTRACTS.md").read_text(), re.M))
    assert len(contract) >= 15
    used = {m for q in check_queries.all_queries() for m in re.findall(r"\b(dynabert_\w+)", q.expr)}
    unknown = {m for m in used if re.sub(r"_(bucket|sum|count)$", "", m) not in contract}
    assert not unknown, f"metrics not in docs/CONTRACTS.md: {sorted(unknown)}"
    # ... and the dashboards look at every contract metric (except the per-sub-network inference
    # histogram, which the latency profile, not a panel, is about).
    unused = contract - {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert unused <= {"dynabert_inference_duration_seconds"}, (
        f"contract metrics no panel/alert reads: {sorted(unused)}"
    )


def test_alert_signal_extraction(check_queries):
    signal = check_queries.alert_signal
    assert signal('up{job="x"} == 0') == 'up{job="x"}'
    assert signal('a{s=~"5.."} / b > 0.8') == 'a{s=~"5.."} / b'
    assert signal("1 - (x / y) < 0.99") == "1 - (x / y)"
    assert signal("sum(a) > 0 or sum(b unless c offset 5m) > 0") == "(sum(a)) or (sum(b unless c offset 5m))"
    assert signal('rate(x{le=">"}[5m])') is None  # no top-level threshold: not an alert shape


def test_grafana_variables_are_substituted(check_queries):
    sub = check_queries.substitute
    vars_ = {"model": "m", "instance": "i:1", "__rate_interval": "20s"}
    assert (
        sub('x{model=~"$model", instance=~"${instance}"}[$__rate_interval]', vars_)
        == 'x{model=~"m", instance=~"i:1"}[20s]'
    )
    assert sub("[[model]]", vars_) == "m"
    try:
        sub("$nope", vars_)
    except KeyError as e:
        assert "$nope" in str(e)
    else:
        raise AssertionError("an unknown variable must be an error")
