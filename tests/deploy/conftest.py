"""Fixtures for the deployment tests: loading deploy/ scripts as modules, free loopback ports,
waiting on HTTP, and a real Prometheus (Debian's `prometheus` package) started on loopback."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def load_script(path: Path) -> ModuleType:
    """Import a deploy/ script (not a package) by path."""
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, ok=(200,)) -> None:
    """Poll ``url`` until it answers one of ``ok``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} not answering {ok} after {timeout}s (last: {last})")


def stop(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def tools() -> ModuleType:
    """This module, so tests can use its helpers (``--import-mode=importlib`` cannot import conftest)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def check_queries() -> ModuleType:
    return load_script(DEPLOY / "check_queries.py")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "prometheus binary not found: `apt-get install prometheus` (Debian) to run this test; "
            ".ci/run installs it in CI"
        )
    return path


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not found: `apt-get install prometheus` (Debian) to run this test; .ci/run installs it in CI"
        )
    return path


@pytest.fixture
def run_prometheus(prometheus_bin: str, tmp_path: Path) -> Callable:
    """``with run_prometheus(target, scrape_interval="1s") as url:`` starts Prometheus on loopback from
    deploy/prometheus/prometheus.yml (so its alert rules load too), with the dynabert job pointed at
    ``target`` ("host:port") and the intervals shortened for a test."""

    @contextmanager
    def run(target: str, scrape_interval: str = "1s") -> Iterator[str]:
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
        config["global"].pop("scrape_timeout", None)
        config["rule_files"] = [str(DEPLOY / "prometheus" / rule) for rule in config["rule_files"]]
        port = free_port()
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        jobs["dynabert"]["static_configs"][0]["targets"] = [target]
        jobs["dynabert"]["scrape_timeout"] = scrape_interval
        jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(f"{url}/-/ready", timeout=30, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{e}\n{(tmp_path / 'prometheus.log').read_text()}") from e
            yield url
        finally:
            stop(proc)
            log.close()

    return run
