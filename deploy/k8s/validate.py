"""Validate the Kubernetes manifests in deploy/k8s/ without a cluster.

- Built-in kinds (Deployment, Service, HPA, PVC, ConfigMap) against the Kubernetes OpenAPI schemas
  shipped by `kubernetes-validate`, strict (unknown fields fail), for KUBERNETES_VERSION.
- ServiceMonitor (a Prometheus Operator CRD, which kubernetes-validate has no schema for; its CLI
  only warns and exits 0) against schemas/servicemonitor-monitoring-v1.json, a closed subset we
  maintain. Any other kind without a schema is an error, not a warning.
- kustomization.yaml lists exactly the manifests in this folder.
- Cross-references a schema cannot see: Service and ServiceMonitor select the Deployment's pods,
  ports are referenced by existing names, the probes hit /readyz and /healthz, the HPA's custom
  metric is one the adapter rule serves, and that rule reads a metric of docs/CONTRACTS.md.

- prometheusrule.yaml is alerts.yml wrapped for the Prometheus Operator, byte for byte as
  ``--write-prometheusrule`` generates it (the rules themselves are checked by promtool).

    python deploy/k8s/validate.py                          # one line per problem, exit 1 if any
    python deploy/k8s/validate.py --write-prometheusrule   # regenerate prometheusrule.yaml
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
CONTRACTS = HERE.parents[1] / "docs" / "CONTRACTS.md"
KUBERNETES_VERSION = "1.30"  # oldest version we claim to support; HPA autoscaling/v2 is GA since 1.23
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = HERE / "prometheusrule.yaml"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "schemas" / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): HERE / "schemas" / "prometheusrule-monitoring-v1.json",
}


def load_manifests(folder: Path = HERE) -> dict[str, list[dict]]:
    """file name -> its YAML documents (kustomization.yaml excluded)."""
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
        for path in sorted(folder.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def schema_problems(manifests: dict[str, list[dict]]) -> list[str]:
    problems = []
    for name, docs in manifests.items():
        for doc in docs:
            where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
            if crd is not None:
                validator = jsonschema.Draft202012Validator(json.loads(crd.read_text()))
                problems += [f"{where}: {e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return problems


def kustomization_problems(folder: Path = HERE) -> list[str]:
    listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    problems = [f"kustomization.yaml lists {n}, which does not exist" for n in sorted(listed - present)]
    problems += [f"kustomization.yaml does not list {n}" for n in sorted(present - listed)]
    return problems


def contract_metrics(path: Path = CONTRACTS) -> set[str]:
    return set(re.findall(r"^\| (dynabert_\w+) \|", path.read_text(), re.M))


def _one(manifests: dict[str, list[dict]], kind: str) -> dict:
    found = [d for docs in manifests.values() for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind}, found {len(found)}")
    return found[0]


def reference_problems(manifests: dict[str, list[dict]]) -> list[str]:
    problems = []
    deploy = _one(manifests, "Deployment")
    service = _one(manifests, "Service")
    monitor = _one(manifests, "ServiceMonitor")
    hpa = _one(manifests, "HorizontalPodAutoscaler")
    adapter = _one(manifests, "ConfigMap")

    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    if not _matches(deploy["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pod template labels")
    if not _matches(service["spec"]["selector"], pod_labels):
        problems.append("Service selector does not match the Deployment's pods")
    if not _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
        problems.append("ServiceMonitor selector does not match the Service's labels")

    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        if port["targetPort"] not in port_names and not isinstance(port["targetPort"], int):
            problems.append(f"Service targetPort {port['targetPort']!r} is not a container port name")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports:
            problems.append(f"ServiceMonitor port {endpoint.get('port')!r} is not a Service port name")
        if endpoint.get("path", "/metrics") != "/metrics":
            problems.append(f"ServiceMonitor path {endpoint['path']!r} is not /metrics")

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        got = container.get(probe, {}).get("httpGet", {}).get("path")
        if got != path:
            problems.append(f"{probe} path is {got!r}, expected {path}")
    if not {"requests", "limits"} <= set(container.get("resources", {})):
        problems.append("container resources need both requests and limits")
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    if mounts.get("models", {}).get("mountPath") != "/models":
        problems.append("the model volume must be mounted at /models")

    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deploy["metadata"]["name"]):
        problems.append(f"HPA scales {target}, not the Deployment")
    served = set()
    metrics = contract_metrics()
    for text in adapter["data"].values():
        for rule in yaml.safe_load(text)["rules"]:
            served.add(rule.get("name", {}).get("as") or rule["seriesQuery"].split("{")[0])
            series = rule["seriesQuery"].split("{")[0].strip()
            if series not in metrics:
                problems.append(f"adapter rule reads {series}, which docs/CONTRACTS.md does not define")
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in served:
            problems.append(
                f"HPA metric {metric['pods']['metric']['name']} is not served by the adapter rules"
            )
    return problems


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as YAML block scalars, as a person would write them."""


_BlockStrings.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def prometheus_rule() -> str:
    """prometheusrule.yaml: the groups of deploy/prometheus/alerts.yml as a PrometheusRule."""
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "dynabert",
            "labels": {"app.kubernetes.io/name": "dynabert", "release": "prometheus"},
        },
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }
    header = (
        "# GENERATED from deploy/prometheus/alerts.yml by `python deploy/k8s/validate.py --write-prometheusrule`;\n"
        "# edit alerts.yml, then regenerate (make lint-deploy fails while they differ).\n"
        "# The alert rules for the Prometheus Operator; `release` must match your ruleSelector.\n"
    )
    return header + yaml.dump(manifest, Dumper=_BlockStrings, sort_keys=False, width=110)


def prometheus_rule_problems(folder: Path = HERE) -> list[str]:
    path = folder / PROMETHEUS_RULE.name
    if not path.exists() or path.read_text() != prometheus_rule():
        return [
            f"{path.name} differs from deploy/prometheus/alerts.yml: run deploy/k8s/validate.py --write-prometheusrule"
        ]
    return []


def validate(folder: Path = HERE) -> list[str]:
    manifests = load_manifests(folder)
    return (
        schema_problems(manifests)
        + kustomization_problems(folder)
        + reference_problems(manifests)
        + prometheus_rule_problems(folder)
    )


def main() -> int:
    if sys.argv[1:] == ["--write-prometheusrule"]:
        PROMETHEUS_RULE.write_text(prometheus_rule())
        return 0
    problems = validate()
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(
            f"deploy/k8s: {sum(map(len, load_manifests().values()))} manifests valid (Kubernetes {KUBERNETES_VERSION})"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
