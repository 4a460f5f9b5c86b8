"""docker-compose.yml (no Docker engine here): the three services, wired to each other by the names
and ports the Prometheus and Grafana files use, with every mounted host path present."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_wires_service_prometheus_and_grafana():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"dynabert", "prometheus", "grafana"}
    assert "3000:3000" in services["grafana"]["ports"]

    # Prometheus scrapes the service by its Compose name and container port.
    prom_mount = next(v for v in services["prometheus"]["volumes"] if v.endswith(":/etc/prometheus:ro"))
    prom_dir = REPO / prom_mount.split(":")[0]
    config = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dynabert"]
    assert job["static_configs"][0]["targets"] == [
        f"dynabert:{services['dynabert']['environment']['DYNABERT_PORT']}"
    ]
    for rule_file in config["rule_files"]:
        assert (prom_dir / rule_file).exists(), rule_file
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    # The service gets the models folder on the image's /models volume, read-only.
    assert "./models:/models:ro" in services["dynabert"]["volumes"]
    assert services["dynabert"]["build"]["context"] == "."

    # Every host path mounted from the repository exists (./models is created by `make serve`).
    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./") and host != "./models":
                assert (REPO / host).exists(), host
