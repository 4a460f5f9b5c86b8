"""The gate's direct path to the inference endpoints (service/routes.py's ``direct``) against
FastAPI's routes (``DYNABERT_DIRECT_ROUTES=false``): the same status, problem document, headers
and body for every request, valid or not, so that skipping the framework changes nothing a client
can see. Two apps on the tiny real checkpoints of tests/conftest.py, each request sent to both."""

from __future__ import annotations

import gzip
import json

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from service.app import ENDPOINTS, AppState, create_app, get_state
from service.routes import DIRECT
from service.settings import Settings

PIN = {"X-DynaBERT-Width": "0.5", "X-DynaBERT-Depth": "1.0"}  # the same sub-network on both apps
JSON = {"Content-Type": "application/json"}

# (path, raw body, extra headers): valid requests, then every kind of bad one
CASES = [
    ("/v1/classify", {"text": "a gripping film"}, PIN),
    ("/v1/classify", {"text": ["a gripping film", "dull"], "model": "cls"}, PIN),
    ("/v1/qa", {"question": "Where?", "context": "In Paris, by the river."}, PIN),
    ("/v1/qa", {"question": ["Who?", "What?"], "context": ["Ann wrote it.", "A book."]}, PIN),
    ("/v1/classify", b"", PIN),  # no body
    ("/v1/classify", b"null", PIN),
    ("/v1/classify", b"[1, 2]", PIN),
    ("/v1/classify", b'"text"', PIN),
    ("/v1/classify", b'{"text": "a", ', PIN),  # cut short
    ("/v1/classify", b'{"text": "a", "text": "b"}', PIN),  # a key twice
    ("/v1/classify", b'{"text": "caf\xe9"}', PIN),  # Latin-1, not UTF-8
    ("/v1/classify", b"[" * 100_000 + b"]" * 100_000, PIN),  # nested past the parser's limit
    ("/v1/classify", b'{"text": "\\ud800"}', PIN),  # a lone surrogate
    ("/v1/classify", {}, PIN),
    ("/v1/classify", {"text": ""}, PIN),
    ("/v1/classify", {"text": []}, PIN),
    ("/v1/classify", {"text": ["ok", "  "]}, PIN),
    ("/v1/classify", {"text": 3}, PIN),
    ("/v1/classify", {"text": "a", "extra": 1}, PIN),
    ("/v1/classify", {"text": ["a", "b"], "text_pair": ["c"]}, PIN),
    ("/v1/classify", {"text": "a", "text_pair": "b"}, PIN),  # a pair to a single-text model
    ("/v1/classify", {"text": ["a"] * 65}, PIN),  # past max_inputs
    ("/v1/classify", {"text": "a", "model": "nope"}, PIN),
    ("/v1/classify", {"text": "a", "model": "squad"}, PIN),  # the wrong task
    ("/v1/qa", {"question": "Who?", "context": "Ann.", "model": "cls"}, PIN),
    ("/v1/qa", {"question": "Who?"}, PIN),
    ("/v1/qa", {"question": ["Who?"], "context": ["a", "b"]}, PIN),
    ("/v1/classify", {"text": "a"}, {"X-DynaBERT-Width": "0.3", "X-DynaBERT-Depth": "1.0"}),  # not served
    ("/v1/classify", {"text": "a"}, {"X-Latency-Budget-Ms": "soon"}),
    ("/v1/classify", {"text": "a"}, {"X-Latency-Budget-Ms": "-5"}),
    ("/v1/classify", {"text": "a"}, {"X-Request-Timeout-Ms": "0"}),
    ("/v1/classify", {"text": ""}, {"X-Latency-Budget-Ms": "soon"}),  # a bad header and a bad body
    ("/v1/classify", b"{", {"X-Latency-Budget-Ms": "soon"}),  # unparsable body and a bad header
]
# headers whose values differ from request to request (ids, timings) or between runs
VARYING = {"x-request-id", "server-timing", "x-latency-budget-met", "date"}


@pytest.fixture(scope="module")
def clients(tiny_cls_checkpoint, tiny_qa_checkpoint):
    def app(direct: bool):
        settings = Settings(
            checkpoints=[f"cls={tiny_cls_checkpoint}", f"squad={tiny_qa_checkpoint}"],
            calibrate=False,
            torch_threads=1,
            inference_worker="thread",
            direct_routes=direct,
            max_inputs=64,
        )
        return create_app(settings)

    with TestClient(app(True)) as direct, TestClient(app(False)) as routed:
        yield direct, routed


def send(c: TestClient, path: str, body, headers: dict[str, str]):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(path, content=raw, headers={**JSON, **headers})


def comparable(r) -> tuple:
    doc = r.json() if r.content else None
    if isinstance(doc, dict):
        doc.pop("request_id", None)
    headers = {k: v for k, v in r.headers.items() if k not in VARYING}
    return r.status_code, headers, doc


@pytest.mark.parametrize("case", range(len(CASES)))
def test_direct_path_answers_as_the_routes_do(clients, case):
    path, body, headers = CASES[case]
    direct, routed = clients
    a, b = send(direct, path, body, headers), send(routed, path, body, headers)
    assert comparable(a) == comparable(b)
    assert a.headers["x-request-id"] and b.headers["x-request-id"]
    if a.status_code >= 400:
        assert a.headers["content-type"] == "application/problem+json"
        assert a.json()["request_id"] == a.headers["x-request-id"]


def test_the_direct_path_serves_every_path_the_gate_hands_it():
    """The gate hands ``direct`` the paths it counts as inference endpoints (app.ENDPOINTS);
    ``direct`` must have a handler for each, or such a request would fail with a KeyError."""
    assert set(DIRECT) == set(ENDPOINTS)


def test_the_cases_cover_answers_and_each_kind_of_error(clients):
    direct, _ = clients
    statuses = {send(direct, p, b, h).status_code for p, b, h in CASES}
    assert {200, 400, 404, 413, 422} <= statuses


def test_direct_path_skips_fastapi_dependencies_and_the_routes_use_them(clients):
    """The direct path never enters FastAPI's dependency solving (an override of ``get_state``,
    which every inference route depends on, is never called); with the setting off it is."""
    calls = []

    def counting(c: TestClient):  # (no extra parameters: FastAPI would read them as query fields)
        async def counted(request: Request) -> AppState:
            calls.append(c)
            return request.app.state.dynabert

        return counted

    for c in clients:
        c.app.dependency_overrides[get_state] = counting(c)
    try:
        direct, routed = clients
        for c in (direct, routed):
            assert send(c, "/v1/classify", {"text": "fine"}, PIN).status_code == 200
            assert send(c, "/v1/qa", {"question": "Who?", "context": "Ann."}, PIN).status_code == 200
            assert c.get("/v1/models").status_code == 200  # not an inference route: FastAPI's on both
        assert calls.count(direct) == 1 and calls.count(routed) == 3
    finally:
        for c in clients:
            c.app.dependency_overrides.clear()


def test_direct_path_keeps_the_gates_work(clients):
    """Gzip bodies in and out, and GET on an inference path (not the direct path's: 405)."""
    direct, routed = clients
    body = gzip.compress(json.dumps({"text": ["a gripping film"] * 40}).encode())
    for c in (direct, routed):
        r = c.post(
            "/v1/classify",
            content=body,
            headers={**JSON, **PIN, "Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        )
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert len(r.json()["results"]) == 40
        r = c.get("/v1/classify")
        assert r.status_code == 405 and "POST" in r.headers["allow"]
