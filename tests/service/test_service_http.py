"""Real HTTP: uvicorn on a loopback port (in-process server thread, and the `dynabert serve`
command in a subprocess), graceful shutdown, and prometheus-client multiprocess aggregation."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import uvicorn

from bench.transport import BlockingClient
from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture
def opened():
    """The raw client sockets a test opens, closed when it ends (however it ends): enter each with
    ``opened.enter_context(...)``."""
    with contextlib.ExitStack() as stack:
        yield stack


def serve_in_thread(settings: Settings, **config):
    """(app, server, thread, url): the app under uvicorn on a free loopback port, in a thread, ready.
    ``config``: more of uvicorn.Config's arguments."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", access_log=False, **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(url)
    return app, server, thread, url


def test_uvicorn_loopback_and_graceful_shutdown_finishes_in_flight_requests(tiny_cls_checkpoint):
    settings = Settings(checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1)
    app, server, thread, url = serve_in_thread(settings)
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        r = c.post("/v1/classify", json={"text": ["good", "bad"]}, headers={"X-Request-Id": "real-1"})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        assert r.headers["x-request-id"] == "real-1" and "server-timing" in r.headers
        assert (
            c.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}).status_code
            == 422
        )
        assert "dynabert_requests_total" in c.get("/metrics").text

        # hold the model, start a request, ask the server to stop: the request still completes
        served = app.state.dynabert.get(None)
        gate, entered = threading.Event(), threading.Event()
        real = served.scheduler.runner

        def held(key, rows):
            entered.set()
            gate.wait(30)
            return real(key, rows)

        served.scheduler.runner = held
        result: dict = {}
        t = threading.Thread(
            target=lambda: result.update(r=c.post("/v1/classify", json={"text": "in flight"}))
        )
        t.start()
        assert entered.wait(30)
        server.should_exit = True
        time.sleep(0.3)
        gate.set()
        t.join(30)
    thread.join(30)
    assert not thread.is_alive()
    assert result["r"].status_code == 200
    assert result["r"].json()["results"][0]["label"] in ("negative", "positive")


def test_dynabert_serve_command(tiny_cls_checkpoint, tmp_path, opened):
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    cmd = [sys.executable, "-m", "model.cli", "serve", "--checkpoint", f"sst={tiny_cls_checkpoint}",
           "--host", LOOPBACK, "--port", str(port), "--policy", "fixed", "--fixed-width", "0.5",
           "--fixed-depth", "0.75", "--no-calibrate", "--threads", "1", "--instances", "2"]  # fmt: skip
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNABERT_") and k != "OMP_WAIT_POLICY"}
    env["DYNABERT_HEADER_TIMEOUT_S"], env["DYNABERT_KEEP_ALIVE_S"] = "0.5", "1.5"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc=proc)
        # the command's uvicorn has the deadline on headers: a connection that says nothing closes
        idle = opened.enter_context(socket.create_connection((LOOPBACK, port)))
        t0 = time.monotonic()
        assert _answer(idle, 10) == b"" and 0.4 < time.monotonic() - t0 < 5
        # and DYNABERT_KEEP_ALIVE_S between requests: open after 1 s idle, closed by 1.5 s
        kept = opened.enter_context(BlockingClient(LOOPBACK, port))
        kept.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert kept.answer()[0] == 200
        time.sleep(1.0)
        kept.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert kept.answer()[0] == 200
        t0 = time.monotonic()
        assert _answer(kept.sock, 10) == b"" and 1.3 < time.monotonic() - t0 < 5
        r = httpx.post(
            url + "/v1/classify", json={"text": "x"}, headers={"X-Request-Id": "cli-1"}, trust_env=False
        )
        assert r.status_code == 200 and r.json()["model"] == "sst"
        assert (r.headers["x-dynabert-width"], r.headers["x-dynabert-depth"]) == ("0.5", "0.75")
        models = httpx.get(url + "/v1/models", trust_env=False).json()["models"]
        assert models[0]["name"] == "sst" and models[0]["profile"] == "flops"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    text = log.read_text()
    assert rc == 0, text
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    (rec,) = [x for x in lines if x.get("request_id") == "cli-1"]
    assert (
        rec["logger"] == "dynabert.access"
        and rec["status"] == 200
        and (rec["width"], rec["depth"]) == (0.5, 0.75)
    )
    assert "ts" in rec and rec["budget_ms"] == 100
    assert "2 inference worker(s) of 1 thread(s)" in text  # --instances, the one thread each


def test_serve_help_lists_the_flags():
    from model.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    args = build_parser().parse_args(["serve", "--checkpoint", "a", "--checkpoint", "qa=b", "--policy", "sla",
                                      "--port", "9", "--budget-ms", "20"])  # fmt: skip
    assert args.checkpoint == ["a", "qa=b"] and args.port == 9 and args.budget_ms == 20


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from model.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nothing"), "--port", "1"]) == 2


def test_a_port_in_use_or_out_of_range_is_a_clear_error_before_anything_loads(
    tiny_cls_checkpoint, capsys, caplog
):
    from model.cli import build_parser, main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "99999"])
    assert "port 99999 is outside 0-65535" in capsys.readouterr().err
    busy = socket.socket()
    busy.bind((LOOPBACK, 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with caplog.at_level(logging.INFO):
            rc = main(["serve", "--checkpoint", str(tiny_cls_checkpoint), "--host", LOOPBACK,
                       "--port", str(port), "--no-calibrate"])  # fmt: skip
    finally:
        busy.close()
    assert rc == 2
    assert f"cannot listen on {LOOPBACK}:{port}" in caplog.text
    assert "inference worker" not in caplog.text and "sub-networks" not in caplog.text  # nothing loaded
    # the server's own socket holds the port against a second server while its models load (a
    # socket only bound would not: Linux lets two SO_REUSEADDR sockets bind while neither listens)
    from service.cli import listen

    first = listen(LOOPBACK, 0)
    try:
        with pytest.raises(ValueError, match="cannot listen"):
            listen(LOOPBACK, first.getsockname()[1])
    finally:
        first.close()


def test_a_bad_setting_names_its_environment_variable_or_flag(monkeypatch):
    from service.cli import load_settings

    monkeypatch.setenv("DYNABERT_MAX_BATCH_SIZE", "abc")
    with pytest.raises(ValueError, match=r"DYNABERT_MAX_BATCH_SIZE: .*integer.* \(got 'abc'\)"):
        load_settings({})
    monkeypatch.delenv("DYNABERT_MAX_BATCH_SIZE")
    with pytest.raises(ValueError, match=r"--max-queue: .*greater than or equal to 1 \(got 0\)"):
        load_settings({"max_queue": 0})
    assert load_settings({"max_queue": 5}).max_queue == 5


MULTIPROC_WORKER = """
import os, sys
from service import metrics as M
n = int(sys.argv[1])
for _ in range(n):
    M.REQUESTS.labels("m", "classify", "200").inc()
    M.INFERENCE_DURATION.labels("m", "1.0", "1.0").observe(0.004)
M.QUEUE_DEPTH.labels("m").set(n)
M.MODEL_READY.labels("m").set(1)
if len(sys.argv) > 2:
    sys.stdout.write(M.exposition()[0].decode())
"""


def test_metrics_aggregate_across_worker_processes(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", MULTIPROC_WORKER, "2"], env=env, cwd=REPO, check=True)
    out = subprocess.run(
        [sys.executable, "-c", MULTIPROC_WORKER, "3", "show"], env=env, cwd=REPO, check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    assert 'dynabert_requests_total{endpoint="classify",model="m",status="200"} 5.0' in out
    assert 'dynabert_inference_duration_seconds_count{depth="1.0",model="m",width="1.0"} 5.0' in out
    assert (
        'dynabert_inference_duration_seconds_bucket{depth="1.0",le="0.005",model="m",width="1.0"} 5.0' in out
    )
    # live gauges: the first worker has exited (its pid is gone), so only the live one's value counts
    assert 'dynabert_queue_depth{model="m"}' in out


def test_missing_default_model_without_training_is_a_clear_error(tmp_path, monkeypatch, caplog):
    from model.cli import main

    monkeypatch.setenv("DYNABERT_DEFAULT_MODEL_DIR", str(tmp_path / "models" / "sst2"))
    assert main(["serve", "--no-train", "--port", "1"]) == 2
    assert "default model folder" in caplog.text and "sst2" in caplog.text


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _delta(before: str, after: str, name: str, **labels: str) -> float:
    """How much one sample grew between two expositions."""
    return _sample(after, name, **labels) - _sample(before, name, **labels)


@pytest.mark.parametrize("cancel", [True, False])
def test_a_client_that_hangs_up_while_queued_is_taken_out_of_the_queue(tiny_cls_checkpoint, cancel):
    """Over real HTTP: a request queued behind a held forward pass whose client closes its socket
    never runs (499 in the metrics); with DYNABERT_CANCEL_ON_DISCONNECT=false it still runs."""
    settings = Settings(
        checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1, max_wait_ms=0.0,
        inference_worker="thread", cancel_on_disconnect=cancel,
    )  # fmt: skip
    app, server, thread, url = serve_in_thread(settings)
    port = server.config.port
    served = app.state.dynabert.get(None)
    access: list[dict] = []
    handler = logging.Handler()
    handler.emit = lambda record: access.append(json.loads(record.getMessage()))  # type: ignore[method-assign]
    access_logger = logging.getLogger("dynabert.access")
    level = access_logger.level
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    gate, entered, ran = threading.Event(), threading.Event(), []
    real = served.scheduler.runner

    def held(key, rows):
        entered.set()
        gate.wait(30)
        ran.append(len(rows))
        return real(key, rows)

    served.scheduler.runner = held
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            before = c.get("/metrics").text
            first: dict = {}
            t = threading.Thread(target=lambda: first.update(r=c.post("/v1/classify", json={"text": "x"})))
            t.start()
            assert entered.wait(30)
            body = json.dumps({"text": ["y", "z", "w"]}).encode()
            with socket.create_connection((LOOPBACK, port)) as s:
                s.sendall(
                    b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                end = time.monotonic() + 30
                while served.scheduler.depth < 2:
                    assert time.monotonic() < end, "the second request never reached the queue"
                    time.sleep(0.01)
            # the socket is closed: the server sees the hang-up
            end = time.monotonic() + 5
            while cancel and served.scheduler.depth > 1:
                assert time.monotonic() < end, "the hung-up request stayed in the queue"
                time.sleep(0.01)
            time.sleep(0.2)
            assert served.scheduler.depth == (1 if cancel else 2)
            gate.set()
            t.join(30)
            assert first["r"].status_code == 200
            end = time.monotonic() + 10
            while served.scheduler.depth:
                assert time.monotonic() < end
                time.sleep(0.01)
            assert c.post("/v1/classify", json={"text": "after"}).status_code == 200
            after = c.get("/metrics").text
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
        access_logger.removeHandler(handler)
        access_logger.setLevel(level)
    name = served.name
    closed_lines = [x for x in access if x["status"] == 499]
    if cancel:  # the access log says where the abandoned request had been routed
        (line,) = closed_lines
        assert line["inputs"] == 3 and line["width"] is not None and line["depth"] is not None
        assert line["reason"] in ("budget", "fallback") and line["predicted_ms"] > 0
    else:
        assert closed_lines == []

    assert ran == ([1, 1] if cancel else [1, 3, 1])  # the three hung-up inputs never ran
    assert _delta(before, after, "dynabert_client_closed_total", model=name, stage="queued") == (
        1 if cancel else 0
    )
    answered = {
        code: _delta(before, after, "dynabert_requests_total", model=name, endpoint="classify", status=code)
        for code in ("200", "499")
    }
    assert answered == ({"200": 2, "499": 1} if cancel else {"200": 3, "499": 0})


# ---- a storm of every kind of client at once --------------------------------------------------

STORM_KINDS: dict[str, tuple[dict, set[int]]] = {
    # kind: (request, the statuses it may get; 503 wherever the small queue can be full)
    "classify": ({"json": {"text": "a fine film"}}, {200, 503}),
    "classify-list": ({"json": {"text": ["good", "bad", "so so", "great", "awful"]}}, {200, 503}),
    "classify-pinned": ({"json": {"text": "ok"}, "headers": {"X-DynaBERT-Width": "0.25"}}, {200, 503}),
    "qa": (
        {
            "path": "/v1/qa",
            "json": {"question": "who?", "context": "Ada wrote it. " * 30, "model": "tiny-squad"},
        },
        {200, 503},
    ),
    "tight-timeout": ({"json": {"text": "quick"}, "headers": {"X-Request-Timeout-Ms": "5"}}, {200, 503, 504}),
    "empty-text": ({"json": {"text": ""}}, {422}),
    "wrong-type": ({"json": {"text": 3}}, {422}),
    "bad-json": ({"content": b'{"text": ', "headers": {"Content-Type": "application/json"}}, {422}),
    "unknown-model": ({"json": {"text": "x", "model": "nope"}}, {404}),
    "bad-budget": ({"json": {"text": "x"}, "headers": {"X-Latency-Budget-Ms": "soon"}}, {400}),
    "unserved-width": ({"json": {"text": "x"}, "headers": {"X-DynaBERT-Width": "0.6"}}, {400}),
    "wrong-task": ({"json": {"text": "x", "model": "tiny-squad"}}, {400}),
    "too-big": ({"json": {"text": "x" * 30_000}}, {413}),
    "not-json": ({"content": b"text=x", "headers": {"Content-Type": "text/plain"}}, {415}),
}


@pytest.mark.parametrize("kill_worker", [False, True], ids=["", "the classifier's worker killed midway"])
def test_a_storm_of_good_bad_impatient_and_vanishing_clients_gets_no_500_and_loses_nothing(
    tiny_cls_checkpoint, tiny_qa_checkpoint, kill_worker
):
    """Every kind of request at once, 32 at a time over real HTTP, with clients that hang up
    mid-request, against a small queue and the inference worker processes (one of them
    SIGKILLed a third of the way through): each client gets one of the statuses its request
    allows (never a 500), /healthz answers throughout, the metrics count every request, and the
    server serves normally afterwards."""
    import asyncio
    import random

    settings = Settings(
        checkpoints=[str(tiny_cls_checkpoint), str(tiny_qa_checkpoint)], calibrate=False, torch_threads=1,
        max_queue=2, max_body_bytes=20_000,
    )  # fmt: skip
    app, server, thread, url = serve_in_thread(settings)
    port = server.config.port
    rng = random.Random(0)
    plan = [rng.choice([*STORM_KINDS, "hang-up"]) for _ in range(420)]

    async def storm() -> tuple[list[tuple[str, httpx.Response]], list[int]]:
        limits = httpx.Limits(max_connections=32)
        sem = asyncio.Semaphore(32)
        health: list[int] = []
        done = asyncio.Event()

        async def one(c: httpx.AsyncClient, i: int, kind: str) -> tuple[str, httpx.Response] | None:
            async with sem:
                if kill_worker and i == len(plan) // 3:
                    os.kill(app.state.dynabert.get("tiny-sst2").workers[0].pid, signal.SIGKILL)
                if kind == "hang-up":  # the whole request, then the socket closes at once
                    _, w = await asyncio.open_connection(LOOPBACK, port)
                    body = json.dumps({"text": ["gone"] * 4}).encode()
                    w.write(
                        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                    )  # fmt: skip
                    await w.drain()
                    w.close()
                    return None
                req, _ = STORM_KINDS[kind]
                headers = {"X-Request-Id": f"storm-{i}", **req.get("headers", {})}
                r = await c.post(
                    req.get("path", "/v1/classify"), json=req.get("json"), content=req.get("content"),
                    headers=headers,
                )  # fmt: skip
                return kind, r

        async def watch(c: httpx.AsyncClient) -> None:
            while not done.is_set():
                health.append((await c.get("/healthz", timeout=5)).status_code)
                await asyncio.sleep(0.05)

        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30, limits=limits) as c:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as side:
                watcher = asyncio.create_task(watch(side))
                out = await asyncio.gather(*(one(c, i, k) for i, k in enumerate(plan)))
                done.set()
                await watcher
        return [x for x in out if x is not None], health

    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            before = c.get("/metrics").text
            answers, health = asyncio.run(storm())
            served = [app.state.dynabert.get(n) for n in ("tiny-sst2", "tiny-squad")]
            end = time.monotonic() + 30
            while any(s.scheduler.depth for s in served):  # the hung-up requests finish too
                assert time.monotonic() < end, "the queue never drained"
                time.sleep(0.05)
            time.sleep(0.3)
            after = c.get("/metrics").text
            last = c.post("/v1/classify", json={"text": "still here"})
            assert last.status_code == 200 and last.json()["results"][0]["label"]
            assert c.get("/readyz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)

    hang_ups = plan.count("hang-up")
    assert len(answers) == len(plan) - hang_ups and hang_ups > 10
    wrong = [(k, r.status_code, r.text[:200]) for k, r in answers if r.status_code not in STORM_KINDS[k][1]]
    assert wrong == []
    for _, r in answers:
        assert r.headers["x-request-id"].startswith("storm-")
        if r.status_code != 200:
            assert r.headers["content-type"].startswith("application/problem+json")
    statuses = {r.status_code for _, r in answers}
    assert 200 in statuses and {400, 404, 413, 415, 422} <= statuses  # the mix really was mixed
    assert health and set(health) == {200}  # the event loop kept answering

    counted = {
        code: sum(
            _delta(before, after, "dynabert_requests_total", model=m, endpoint=e, status=code)
            for m in ("tiny-sst2", "tiny-squad", "unknown")
            for e in ("classify", "qa")
        )
        for code in ("200", "400", "404", "413", "415", "422", "499", "500", "503", "504")
    }
    assert counted["500"] == 0
    got = Counter(r.status_code for _, r in answers)
    # every answered request is counted under its status; the hung-up ones (valid requests without
    # a timeout) under 200, 499 or 503 (the queue was full when they came)
    for code in ("400", "404", "413", "415", "422", "504"):
        assert counted[code] == got[int(code)], code
    assert counted["503"] >= got[503]
    assert counted["200"] + counted["499"] + counted["503"] == got[200] + got[503] + hang_ups
    restarts = {
        m: _delta(before, after, "dynabert_worker_restarts_total", model=m)
        for m in ("tiny-sst2", "tiny-squad")
    }
    assert restarts == {"tiny-sst2": 1 if kill_worker else 0, "tiny-squad": 0}


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (b"": closed, silent)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_clients_that_stall_neither_hold_the_door_nor_keep_their_sockets(tiny_cls_checkpoint, opened):
    """Slow and idle clients (slowloris) over real HTTP, with the deadlines short:
    - requests that stall mid-body do not hold a place at the door (the door is 4; 6 of them
      stall, and a good request is still served), and get 408 problem+json at the body deadline,
      saying how much arrived, and the connection closes;
    - a connection that sends nothing is closed silently; one that stalls in its headers, first
      or on a kept-alive connection after a good request, gets a 408 and is closed;
    - a client that hangs up mid-body is a 499 in the metrics, not a request run on half a body;
    - headers sent slowly but within the deadline are served."""
    from service.protocol import protocol_class

    settings = Settings(
        checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1, max_in_flight=4,
        body_timeout_s=1.0, header_timeout_s=1.0,
    )  # fmt: skip
    app, server, thread, url = serve_in_thread(settings, http=protocol_class(1.0, 65536))
    port = server.config.port

    def connect() -> socket.socket:
        return opened.enter_context(socket.create_connection((LOOPBACK, port)))

    head = b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            before = c.get("/metrics").text
            stalled = []
            for i in range(6):
                s = connect()
                s.sendall(
                    head + f"X-Request-Id: stall-{i}\r\nContent-Length: 100\r\n\r\n".encode() + b'{"tex'
                )
                stalled.append(s)
            gone = connect()
            gone.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"te')
            idle, half = connect(), connect()
            half.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            kept = opened.enter_context(BlockingClient(LOOPBACK, port))
            kept.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert kept.answer()[0] == 200
            kept.sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request stalls in its headers
            time.sleep(0.2)
            gone.close()

            t0 = time.monotonic()
            r = c.post("/v1/classify", json={"text": "served while six uploads stall"})
            assert r.status_code == 200, r.text  # the stalled requests hold no place at the door
            # headers in three pieces, within the deadline: served
            slow_ok = opened.enter_context(BlockingClient(LOOPBACK, port))
            for piece in (b"GET /healthz HTT", b"P/1.1\r\nHost: t\r\n", b"\r\n"):
                slow_ok.sock.sendall(piece)
                time.sleep(0.2)
            assert slow_ok.answer()[0] == 200

            for i, s in enumerate(stalled):
                raw = _answer(s, 10)
                head_part, _, body = raw.partition(b"\r\n\r\n")
                assert head_part.startswith(b"HTTP/1.1 408"), raw[:200]
                assert b"connection: close" in head_part.lower()
                problem = json.loads(body)
                assert problem["type"].endswith(":body-timeout") and problem["request_id"] == f"stall-{i}"
                assert "within 1 s (5 of 100 bytes)" in problem["detail"]
            assert _answer(idle, 10) == b""  # closed without a word
            for s in (half, kept.sock):
                raw = _answer(s, 10)  # (kept's first answer was read above)
                assert raw.startswith(b"HTTP/1.1 408"), raw[:200]
                assert json.loads(raw.partition(b"\r\n\r\n")[2])["type"].endswith(":header-timeout")
            assert time.monotonic() - t0 < 5
            time.sleep(0.2)
            after = c.get("/metrics").text
            assert c.get("/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
    reasons = ("idle", "header_timeout", "header_too_large", "body_timeout")
    closed = {k: _delta(before, after, "dynabert_connections_closed_total", reason=k) for k in reasons}
    assert closed == {"idle": 1, "header_timeout": 2, "header_too_large": 0, "body_timeout": 6}
    assert (
        _delta(before, after, "dynabert_requests_total", model="unknown", endpoint="classify", status="408")
        == 6
    )
    assert (
        _delta(before, after, "dynabert_requests_total", model="unknown", endpoint="classify", status="499")
        == 1
    )
    assert _delta(before, after, "dynabert_client_closed_total", model="unknown", stage="body") == 1


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_requests_clock_starts_at_its_first_byte(tiny_cls_checkpoint, parser, opened):
    """The budget and Server-Timing's total count from the request's first byte read, not from
    when the application got it: a request whose head arrives in two pieces 0.4 s apart has used
    0.4 s of its budget; the next request on the kept-alive connection starts its own clock."""
    from bench.serve import parse_server_timing
    from service.protocol import protocol_class

    settings = Settings(checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1)
    app, server, thread, url = serve_in_thread(settings, http=protocol_class(5.0, 65536, parser))
    body = b'{"text": "x"}'
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"X-Latency-Budget-Ms: 300\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )

    def timed(*pieces: bytes, pause_s: float = 0.0) -> tuple[float, str]:
        for k, piece in enumerate(pieces):
            if k:
                time.sleep(pause_s)
            c.sock.sendall(piece)
        status, fields, _ = c.answer()
        assert status == 200
        return parse_server_timing(fields["server-timing"])["total"], fields["x-latency-budget-met"]

    try:
        c = opened.enter_context(BlockingClient(LOOPBACK, server.config.port))
        total, met = timed(head + body)
        assert total < 300 and met == "true"
        total, met = timed(head[:30], head[30:] + body, pause_s=0.4)  # the head in two pieces
        assert total >= 400 and met == "false"
        time.sleep(0.4)  # idle between requests: not the next request's time
        total, met = timed(head + body)
        assert total < 300 and met == "true"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_the_limits_on_headers_hold_with_either_parser(tiny_cls_checkpoint, parser, opened):
    """uvicorn's two HTTP parsers under protocol.py: headers past the size limit get a 431 and the
    connection closes (httptools alone would read 200 MB of them into memory), ones at it are
    served (h11 alone refuses past 16 KiB); a connection that sends nothing closes at the deadline;
    a partial request line gets a 408; well-behaved requests on a kept-alive connection, pipelined
    too, are untouched; and bytes the parser refuses are answered once, even past the limit."""
    from service.protocol import protocol_class

    settings = Settings(
        checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1, inference_worker="thread"
    )
    limit = 20_000  # over h11's own default limit (16 KiB)
    app, server, thread, url = serve_in_thread(settings, http=protocol_class(0.5, limit, parser))
    port = server.config.port

    def request(size: int) -> bytes:
        start = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            before = c.get("/metrics").text
            fits = opened.enter_context(BlockingClient(LOOPBACK, port))
            fits.sock.sendall(request(limit) + request(limit))  # two, pipelined, each exactly at the limit
            assert fits.answer()[0] == 200 and fits.answer()[0] == 200
            big = opened.enter_context(socket.create_connection((LOOPBACK, port)))
            try:  # the server may close while this is still sending
                for _ in range(64):
                    big.sendall(b"X-Junk: " + b"j" * 1000 + b"\r\n" if _ else b"GET /healthz HTTP/1.1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            raw = _answer(big, 10)
            assert raw.startswith(b"HTTP/1.1 431"), raw[:100]
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["type"].endswith(":headers-too-large")
            idle, half = (opened.enter_context(socket.create_connection((LOOPBACK, port))) for _ in "ih")
            half.sendall(b"GET /hea")
            assert _answer(idle, 10) == b""
            assert _answer(half, 10).startswith(b"HTTP/1.1 408")
            fits.sock.sendall(request(100))  # still open: kept alive between requests
            assert fits.answer()[0] == 200
            # bytes the parser refuses: the problem shape. A request smuggling classic for
            # httptools (h11 reads Transfer-Encoding over Content-Length, as RFC 9112 allows), a
            # header line without a colon for h11
            bad = b"GET /healthz HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n"
            if parser == "httptools":
                bad = (
                    b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{"text":"x"}\r\n0\r\n\r\n'
                )
            smuggle = opened.enter_context(socket.create_connection((LOOPBACK, port)))
            smuggle.sendall(bad)
            raw = _answer(smuggle, 10)
            assert raw.startswith(b"HTTP/1.1 400") and b"HTTP/1.1 200" not in raw, raw[:300]
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["type"].endswith(":bad-http")
            # refused and past the limit in one read: one answer (a second one was written after
            # the first's end of stream, and the transport died)
            both = opened.enter_context(socket.create_connection((LOOPBACK, port)))
            both.sendall(b"GET /healthz HTTP/1.1\r\nno colon here\r\nX-Pad: " + b"p" * limit + b"\r\n\r\n")
            raw = _answer(both, 10)
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), raw[:300]
            assert len(rest) == int(re.search(rb"content-length: (\d+)", head)[1]), raw  # nothing after it
            after = c.get("/metrics").text
    finally:
        server.should_exit = True
        thread.join(30)
    reasons = ("idle", "header_timeout", "header_too_large", "body_timeout", "bad_http")
    closed = {k: _delta(before, after, "dynabert_connections_closed_total", reason=k) for k in reasons}
    assert closed == {"idle": 1, "header_timeout": 1, "header_too_large": 1, "body_timeout": 0, "bad_http": 2}
