"""Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate, strict), the
ServiceMonitor against our vendored subset schema, and consistent with each other. Each check is
also shown to catch a planted mistake, so a validator that silently passes would fail here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


@pytest.fixture(scope="module")
def validate(tools):
    return tools.load_script(K8S / "validate.py")


def test_manifests_are_valid(validate):
    assert validate.validate() == []


def test_what_the_issue_asks_for(validate):
    manifests = validate.load_manifests()
    kinds = {d["kind"] for docs in manifests.values() for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "ConfigMap"} <= kinds
    hpa = validate._one(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "dynabert_queue_depth"
    (container,) = validate._one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def _mutated(validate, tmp_path, name, mutate):
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    docs = list(yaml.safe_load_all((folder / name).read_text()))
    mutate(docs[0])
    (folder / name).write_text(yaml.safe_dump_all(docs))
    return validate.schema_problems(validate.load_manifests(folder)) + validate.reference_problems(
        validate.load_manifests(folder)
    )


def test_a_misspelt_deployment_field_fails(validate, tmp_path):
    def typo(d):
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["readinesProbe"] = c.pop("readinessProbe")

    problems = _mutated(validate, tmp_path, "deployment.yaml", typo)
    assert any("readinesProbe" in p for p in problems), problems


def test_a_misspelt_servicemonitor_field_fails(validate, tmp_path):
    def typo(d):
        d["spec"]["endpoints"][0]["intervall"] = d["spec"]["endpoints"][0].pop("interval")

    problems = _mutated(validate, tmp_path, "servicemonitor.yaml", typo)
    assert any("intervall" in p for p in problems), problems


def test_a_misspelt_prometheusrule_field_fails(validate, tmp_path):
    def typo(d):
        rule = d["spec"]["groups"][0]["rules"][0]
        rule["annotation"] = rule.pop("annotations")

    problems = _mutated(validate, tmp_path, "prometheusrule.yaml", typo)
    assert any("annotation" in p for p in problems), problems


def test_prometheusrule_must_match_alerts_yml(validate, tmp_path):
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    assert validate.prometheus_rule_problems(folder) == []
    rule = folder / "prometheusrule.yaml"
    rule.write_text(rule.read_text().replace("< 0.99", "< 0.95"))
    assert "differs from deploy/prometheus/alerts.yml" in validate.prometheus_rule_problems(folder)[0]


def test_an_hpa_metric_the_adapter_does_not_serve_fails(validate, tmp_path):
    def rename(d):
        d["spec"]["metrics"][0]["pods"]["metric"]["name"] = "dynabert_queue_length"

    problems = _mutated(validate, tmp_path, "hpa.yaml", rename)
    assert any("dynabert_queue_length" in p for p in problems), problems


def test_a_service_that_selects_no_pod_fails(validate, tmp_path):
    def retarget(d):
        d["spec"]["selector"] = {"app.kubernetes.io/name": "other"}

    problems = _mutated(validate, tmp_path, "service.yaml", retarget)
    assert any("Service selector" in p for p in problems), problems


def test_an_unknown_kind_is_an_error_not_a_warning(validate, tmp_path):
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    (folder / "extra.yaml").write_text(
        yaml.safe_dump({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    )
    problems = validate.schema_problems(validate.load_manifests(folder)) + validate.kustomization_problems(
        folder
    )
    assert any("no schema" in p for p in problems) and any("does not list extra.yaml" in p for p in problems)


def test_the_adapter_rule_is_well_formed():
    (config_map,) = yaml.safe_load_all((K8S / "prometheus-adapter.yaml").read_text())
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for template in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert template in rule["metricsQuery"]
    assert rule["name"]["as"] == "dynabert_queue_depth"
