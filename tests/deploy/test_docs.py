"""docs/OBSERVABILITY.md describes every panel and alert there is, and docs/DEPLOY.md every
manifest: adding one without documenting it fails here."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_observability_doc_covers_every_panel_and_alert():
    doc = (REPO / "docs" / "OBSERVABILITY.md").read_text()
    for path in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        assert dashboard["title"] in doc
        for panel in dashboard["panels"]:
            assert (
                f"**{panel['title']}**" in doc or panel["type"] == "row" and f'"{panel["title"]}"' in doc
            ), panel["title"]
    for group in yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert f"**{rule['alert']}**" in doc, rule["alert"]


def test_deploy_doc_covers_every_manifest():
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    for path in (REPO / "deploy" / "k8s").glob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert f"`{path.name}`" in doc, path.name
