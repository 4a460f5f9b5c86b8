"""Dashboards as code: the committed JSON is exactly what deploy/grafana/generate.py produces, the
main dashboard has every panel issue 5 asks for, and provisioning wires it to Prometheus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
MAIN = GRAFANA / "dashboards" / "dynabert-subnetworks.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(MAIN.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_regenerating_reproduces_the_committed_json_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_bytes() == (GRAFANA / "dashboards" / name).read_bytes(), (
            f"{name} is stale: run python deploy/grafana/generate.py and commit the result"
        )


def test_check_mode_flags_a_stale_file(tmp_path):
    subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--out", str(tmp_path)], check=True)
    assert (
        subprocess.run(
            [sys.executable, str(GRAFANA / "generate.py"), "--check", "--out", str(tmp_path)]
        ).returncode
        == 0
    )
    (tmp_path / MAIN.name).write_text((tmp_path / MAIN.name).read_text().replace("p95", "p96"))
    stale = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert stale.returncode == 1 and MAIN.name in stale.stderr


def test_main_dashboard_has_every_panel_of_the_issue(dashboard):
    assert dashboard["title"] == "DynaBERT sub-network usage"
    by_title = {p["title"]: p for p in panels(dashboard)}
    exprs = {t: " ".join(x["expr"] for x in p["targets"]) for t, p in by_title.items()}

    rate = by_title["Request rate by sub-network"]  # request rate by sub-network, stacked
    assert rate["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "by (width, depth)" in exprs["Request rate by sub-network"]

    share = by_title["Traffic share per width x depth"]  # each cell's share of traffic, as a table
    assert share["type"] in ("table", "heatmap")
    assert [t["id"] for t in share["transformations"]][0] == "groupingToMatrix"

    latency = exprs["Latency p50 / p95 / p99 against the budget"]  # quantiles against the budget
    for q in ("0.50", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) (rate(dynabert_request_duration_seconds_bucket" in latency
        )
    assert "dynabert_latency_budget_seconds_bucket" in latency

    assert "dynabert_latency_budget_total" in exprs["Budget attainment"]
    assert "dynabert_cpu_utilization_ratio" in exprs["CPU / GPU utilisation and contention"]
    assert "dynabert_gpu_utilization_ratio" in exprs["CPU / GPU utilisation and contention"]
    # CPU/GPU next to the chosen width and depth: same row, side by side.
    y = {
        t: by_title[t]["gridPos"]["y"]
        for t in ("CPU / GPU utilisation and contention", "Chosen width", "Chosen depth")
    }
    assert len(set(y.values())) == 1, y
    assert "by (width)" in exprs["Chosen width"] and "by (depth)" in exprs["Chosen depth"]

    assert "dynabert_queue_depth" in exprs["Queue depth and bound"]
    assert "dynabert_batch_size" in exprs["Batch size and queue wait"]
    assert "by (status" in exprs["Error rate by status"]
    assert "dynabert_selected_metric" in exprs["Dev metric of the chosen sub-networks"]


def test_template_variables_and_every_query_filters_on_them(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"model", "instance"} <= set(variables)
    for name in ("model", "instance"):
        assert (
            variables[name]["type"] == "query" and variables[name]["includeAll"] and variables[name]["multi"]
        )
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
            # Host-wide gauges (utilisation, throttling) and the connections closed carry no model
            # label; everything else is per model. The door's rejections, and requests gone before
            # their body was in, carry model="unknown" (answered before the body names a model).
            if not any(
                m in target["expr"]
                for m in ("utilization_ratio", "throttled_ratio", "dynabert_connections_closed_total")
            ):
                sel = (
                    'model=~"$model|unknown"'
                    if any(
                        m in target["expr"]
                        for m in ("dynabert_rejected_total", "dynabert_client_closed_total")
                    )
                    else 'model=~"$model"'
                )
                assert sel in target["expr"], (panel["title"], target["expr"])


def test_panels_do_not_overlap(dashboard):
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards(dashboard):
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    ds_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == datasource["uid"]

    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dynabert.yml").read_text())[
        "providers"
    ]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"] if m.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
