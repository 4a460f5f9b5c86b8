"""Endpoint tests through `with TestClient(app)` (the lifespan runs: load, profile, schedulers)
against the tiny real checkpoints of tests/conftest.py (random weights, real MiniLM tokenizer).

The latency profile is the FLOPs one (``calibrate=False``) so the suite does not spend seconds
timing sub-networks on a busy machine; test_service_profile.py covers calibration. Nothing here
asserts a wall-clock duration."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

SMALLEST = ("0.25", "0.5")


def make_settings(*ckpts, **kw) -> Settings:
    base = dict(
        checkpoints=[str(c) for c in ckpts],
        calibrate=False,
        torch_threads=1,
        max_wait_ms=0.0,
        inference_worker="thread",  # each app below starts quicker; the shared client uses processes
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def client(tiny_cls_checkpoint, tiny_qa_checkpoint):
    # the default inference worker (a process per model), as `dynabert serve` runs
    app = create_app(
        make_settings(tiny_cls_checkpoint, f"squad={tiny_qa_checkpoint}", inference_worker="process")
    )
    with TestClient(app) as c:
        yield c


def classify(c: TestClient, body, **headers):
    return c.post("/v1/classify", json=body, headers=headers)


def access_records(caplog, n: int = 1, timeout_s: float = 5.0) -> list[logging.LogRecord]:
    """The access log's records, once there are ``n``: a request's line is written just after its
    answer has gone out (service/later.py), so it may trail the response by a millisecond."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in caplog.records if r.name == "dynabert.access"]
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.002)


def assert_problem(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert body["request_id"] == r.headers["x-request-id"] != ""
    for w in words:
        assert w in body["detail"], body
    return body


# ---- happy paths ------------------------------------------------------------------------------


def test_classify_one_text_has_label_probability_scores_and_sla_headers(client):
    r = classify(client, {"text": "a gripping, beautifully made film"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-sst2"
    (res,) = body["results"]
    assert set(res["scores"]) == {"negative", "positive"}
    assert res["label"] == max(res["scores"], key=res["scores"].get)
    assert res["probability"] == pytest.approx(res["scores"][res["label"]])
    assert sum(res["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    h = r.headers
    assert (float(h["x-dynabert-width"]), float(h["x-dynabert-depth"])) == (body["width"], body["depth"])
    assert h["x-latency-budget-ms"] == "100"  # the settings' default
    assert h["x-latency-budget-met"] in ("true", "false")
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", h["server-timing"]))
    assert set(timing) == {"tokenize", "queue", "infer", "forward", "total"}
    # forward (the model alone, in the worker) <= infer (the batch as the server sees it) <= total
    assert float(timing["forward"]) <= float(timing["infer"]) <= float(timing["total"])
    assert float(timing["forward"]) > 0
    # tokenising comes before the queue, and both within the server's total with the batch
    assert 0 < float(timing["tokenize"])
    assert float(timing["tokenize"]) + float(timing["queue"]) + float(timing["infer"]) <= float(
        timing["total"]
    )
    assert re.fullmatch(r"[0-9a-f]{32}", h["x-request-id"])


def test_classify_list_matches_single_requests(client):
    texts = ["good", "a dull, lifeless mess that goes nowhere", "fine"]
    pin = {"X-DynaBERT-Width": "1.0", "X-DynaBERT-Depth": "1.0"}
    batch = classify(client, {"text": texts}, **pin).json()["results"]
    assert len(batch) == 3
    for t, b in zip(texts, batch, strict=True):
        one = classify(client, {"text": t}, **pin).json()["results"][0]
        assert one["scores"]["positive"] == pytest.approx(b["scores"]["positive"], abs=1e-5)


def test_pairs_to_a_single_text_model_are_refused_naming_text_pair(client):
    # tiny-sst2 declares one text field (sentence): a pair would be read as a segment B it never
    # saw in training. Pair models take pairs (test_a_pair_classifier_takes_pairs_and_only_pairs)
    r = classify(client, {"text": ["A man plays.", "b"], "text_pair": ["Someone plays music.", "c"]})
    problem = assert_problem(r, 422, "single texts", "text_pair")
    assert problem["errors"][0]["field"] == "text_pair"
    r = classify(client, {"text": ["a", "b"], "text_pair": ["c"]})
    assert_problem(r, 422, "text_pair has 1 items but text has 2")


def test_request_id_echoed(client):
    r = classify(client, {"text": "x"}, **{"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert client.get("/healthz", headers={"X-Request-Id": "h.1"}).headers["x-request-id"] == "h.1"


def test_pinning_overrides_the_policy(client):
    r = classify(client, {"text": "x"}, **{"X-DynaBERT-Width": "0.5", "X-DynaBERT-Depth": "0.75"})
    assert r.status_code == 200
    assert (r.headers["x-dynabert-width"], r.headers["x-dynabert-depth"]) == ("0.5", "0.75")
    r = classify(client, {"text": "x"}, **{"X-DynaBERT-Width": "0.25"})  # width only: depth by policy
    assert r.headers["x-dynabert-width"] == "0.25"


def test_budget_drives_the_choice(client):
    generous = classify(client, {"text": "x"}, **{"X-Latency-Budget-Ms": "60000"})
    assert (generous.headers["x-dynabert-width"], generous.headers["x-dynabert-depth"]) == ("1.0", "1.0")
    assert generous.headers["x-latency-budget-met"] == "true"
    # nothing can finish in a microsecond: the fastest sub-network answers, budget reported missed
    tight = classify(client, {"text": "x"}, **{"X-Latency-Budget-Ms": "0.001"})
    assert tight.status_code == 200
    assert (tight.headers["x-dynabert-width"], tight.headers["x-dynabert-depth"]) == SMALLEST
    assert tight.headers["x-latency-budget-ms"] == "0.001"
    assert tight.headers["x-latency-budget-met"] == "false"


def test_qa_long_context_is_windowed_and_offsets_point_into_the_context(client):
    context = "Paris is the capital of France. " * 60 + "The Eiffel Tower stands in Paris."
    r = client.post("/v1/qa", json={"model": "squad", "question": "Where is the tower?", "context": context})
    assert r.status_code == 200, r.text
    (a,) = r.json()["results"]
    assert 0 <= a["start"] < a["end"] <= len(context)
    assert context[a["start"] : a["end"]] == a["answer"]
    assert 0 < a["score"] <= 1
    contexts = ["The river flows north.", "Bread is made from flour and water."]
    r = client.post(
        "/v1/qa", json={"model": "squad", "question": ["Which way?", "From what?"], "context": contexts}
    )
    results = r.json()["results"]
    assert len(results) == 2
    for ctx, a in zip(contexts, results, strict=True):
        assert ctx[a["start"] : a["end"]] == a["answer"]


def test_big_batches_run_in_chunks_with_the_same_results(client):
    # the shared client forwards in worker processes: 70 rows go to the worker as 64 + 6
    # (the runner is a coroutine function awaiting the worker: it runs on the app's event loop)
    served = client.app.state.dynabert.get(None)
    rows = served.engine.encode_texts([f"text number {i}" for i in range(70)]).rows
    ran = client.portal.call(served.scheduler.runner, (1.0, 1.0), rows)
    whole = ran.outputs
    assert len(whole) == 70 and ran.forward_s > 0
    for i in (0, 63, 64, 69):
        (one,) = client.portal.call(served.scheduler.runner, (1.0, 1.0), rows[i : i + 1]).outputs
        assert abs(whole[i] - one).max() < 1e-5


def test_models_lists_tasks_and_subnetwork_tables(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny-sst2", "squad"]
    cls, qa = models
    assert cls["default"] and qa["default"]  # each answers its route's requests that name no model
    assert (cls["task"], cls["labels"], qa["task"]) == ("classification", ["negative", "positive"], "qa")
    assert len(cls["subnetworks"]) == 12
    full = next(s for s in cls["subnetworks"] if (s["width"], s["depth"]) == (1.0, 1.0))
    small = next(s for s in cls["subnetworks"] if (s["width"], s["depth"]) == (0.25, 0.5))
    assert full["params"] > small["params"] and full["flops"] > small["flops"]
    assert full["metric"] == pytest.approx(0.9)  # conftest's eval.json
    assert full["latency_ms"] > small["latency_ms"] > 0
    # the front sla routes along: the most accurate and the fastest are always on it
    front = {(s["width"], s["depth"]) for s in cls["subnetworks"] if s["pareto"]}
    assert front == client.app.state.dynabert.models["tiny-sst2"].policy.front
    assert full["pareto"] and small["pareto"]


def test_health_ready_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    head = client.head("/healthz"), client.head("/readyz")  # for probes that send HEAD
    assert [r.status_code for r in head] == [200, 200] and head[0].content == b""
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/qa", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["ClassifyRequest"]["examples"]
    for path in ("/v1/classify", "/v1/qa"):
        op = spec["paths"][path]["post"]
        headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
        assert {"X-Latency-Budget-Ms", "X-Request-Timeout-Ms", "X-DynaBERT-Width", "X-Request-Id"} <= headers
        assert {"400", "401", "404", "408", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert client.get("/docs").status_code == 200


# ---- client mistakes: 4xx problem documents, never a 500 ---------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": ""}, "text"),
        ({"text": []}, "text"),
        ({"text": ["ok", "  "]}, "text"),
        ({}, "text"),
        ({"text": 3}, "text"),
        ({"text": "x", "colour": "red"}, "colour"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(client, body, field):
    problem = assert_problem(classify(client, body), 422)
    assert field in problem["detail"] and any(e["field"].startswith(field) for e in problem["errors"])


def test_malformed_json_is_422_saying_what_and_where(client):
    r = client.post("/v1/classify", content=b'{"text": ', headers={"content-type": "application/json"})
    problem = assert_problem(r, 422, "invalid JSON", "Expecting value", "at character 9")
    assert problem["errors"] == [
        {"field": "body", "message": "invalid JSON: Expecting value (at character 9)", "type": "json_invalid"}
    ]


@pytest.mark.parametrize(
    ("path", "body", "key", "once"),
    [
        ("/v1/classify", b'{"text": "fine", "text": "awful"}', "text", {"text": "awful"}),
        # an escape spells the same key: the parser's strings are compared, not the bytes
        ("/v1/classify", b'{"text": ["fine"], "te\\u0078t": ["awful"]}', "text", {"text": ["awful"]}),
        (
            "/v1/classify",
            b'{"model": "squad", "text": "fine", "model": "tiny-sst2"}',
            "model",
            {"model": "tiny-sst2", "text": "fine"},
        ),
        (
            "/v1/qa",
            b'{"question": "who?", "context": "Bob did.", "context": "Ann did."}',
            "context",
            {"question": "who?", "context": "Ann did."},
        ),
    ],
)
def test_a_key_given_twice_is_a_422_not_a_silent_choice(client, path, body, key, once):
    # which value the client meant is unknown (most parsers keep the last one without a word), as
    # with a single-valued header sent twice; before, {"text": "fine", "text": "awful"} classified
    # "awful" and answered 200
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    problem = assert_problem(r, 422, f"key {key!r} given twice")
    assert problem["errors"][0]["field"] == "body"
    assert client.post(path, json=once).status_code == 200  # each key once: served


def test_bodies_that_are_not_utf8_text_or_nest_too_deep_are_400_saying_why(client):
    h = {"content-type": "application/json"}
    r = client.post("/v1/classify", content='{"text": "café au lait"}'.encode("latin-1"), headers=h)
    assert_problem(r, 400, "not UTF-8 text", "at byte 13", "send JSON as UTF-8")
    # UTF-16 with a byte order mark is JSON's own rule (RFC 8259 allows reading it): served
    r = client.post("/v1/classify", content='{"text": "café"}'.encode("utf-16"), headers=h)
    assert r.status_code == 200, r.text
    r = client.post("/v1/classify", content=b"\xff\xfe{\x00\x00\xdc", headers=h)  # a lone low surrogate
    assert r.status_code in (400, 422) and r.headers["content-type"].startswith("application/problem+json")
    assert_problem(client.post("/v1/classify", content=b"[" * 100_000, headers=h), 400, "nested too deeply")


def test_qa_errors(client):
    assert_problem(
        client.post("/v1/qa", json={"model": "squad", "question": "q", "context": ""}), 422, "context"
    )
    r = client.post("/v1/qa", json={"model": "squad", "question": ["a", "b"], "context": ["c"]})
    assert_problem(r, 422, "2 questions but 1 contexts")
    assert_problem(
        client.post("/v1/qa", json={"model": "tiny-sst2", "question": "q", "context": "c"}),
        400,
        "use POST /v1/classify",
    )
    assert_problem(classify(client, {"model": "squad", "text": "x"}), 400, "use POST /v1/qa")


def test_a_request_that_names_no_model_goes_to_the_first_model_of_its_route(client, tiny_cls_checkpoint):
    # the classifier is served first; a QA request without a model still finds the QA model
    r = client.post("/v1/qa", json={"question": "Where?", "context": "In Paris."})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "squad" and r.json()["results"][0]["end"] <= len("In Paris.")
    assert classify(client, {"text": "x"}).json()["model"] == "tiny-sst2"
    # with no QA model served, the route says where the default model answers (named apart, so
    # its shutdown does not touch the shared client's per-model gauges)
    with TestClient(create_app(make_settings(f"solo={tiny_cls_checkpoint}"))) as c:
        r = c.post("/v1/qa", json={"question": "q", "context": "c"})
        assert_problem(r, 400, "'solo' is a classification model", "use POST /v1/classify")
        (only,) = c.get("/v1/models").json()["models"]
        assert only["default"]


def test_too_many_inputs_is_413(client):
    assert_problem(classify(client, {"text": ["x"] * 65}), 413, "65 texts", "at most 64")


def test_body_too_large_is_413(client):
    assert_problem(classify(client, {"text": "word " * 300_000}), 413, "bytes")


def test_chunked_body_too_large_is_413(client):
    def chunks():
        for _ in range(30):
            yield b" " * 50_000

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(r, 413, "body over")


def test_overlong_text_is_truncated_and_says_so(client):
    r = classify(client, {"text": ["short", "word " * 400]})
    assert r.status_code == 200
    assert r.headers["x-dynabert-truncated"] == "1"
    assert "x-dynabert-truncated" not in classify(client, {"text": "short"}).headers


def test_unknown_model_is_404(client):
    assert_problem(classify(client, {"model": "nope", "text": "x"}), 404, "'nope'", "tiny-sst2")


@pytest.mark.parametrize(
    "headers, words",
    [
        ({"X-Latency-Budget-Ms": "fast"}, ["X-Latency-Budget-Ms", "'fast'"]),
        ({"X-Latency-Budget-Ms": "-5"}, ["X-Latency-Budget-Ms"]),
        ({"X-Latency-Budget-Ms": "0"}, ["X-Latency-Budget-Ms"]),
        ({"X-Latency-Budget-Ms": "nan"}, ["X-Latency-Budget-Ms"]),
        ({"X-DynaBERT-Width": "2"}, ["X-DynaBERT-Width"]),
        ({"X-DynaBERT-Width": "0.6"}, ["width=0.6", "served"]),
        ({"X-DynaBERT-Width": "1.0", "X-DynaBERT-Depth": "0.3"}, ["depth=0.3"]),
        ({"X-Request-Id": "a" * 200}, ["X-Request-Id"]),
        ({"X-Request-Timeout-Ms": "soon"}, ["X-Request-Timeout-Ms", "'soon'"]),
        ({"X-Request-Timeout-Ms": "0"}, ["X-Request-Timeout-Ms", "> 0"]),
        ({"X-Envoy-Expected-Rq-Timeout-Ms": "-1"}, ["X-Envoy-Expected-Rq-Timeout-Ms"]),
    ],
)
def test_bad_headers_are_400(client, headers, words):
    assert_problem(classify(client, {"text": "x"}, **headers), 400, *words)


def test_non_json_content_type_is_415(client):
    r = client.post(
        "/v1/classify", content=b"text=hi", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert_problem(r, 415, "application/json")
    assert_problem(client.post("/v1/classify", content=b'{"text":"x"}'), 415)  # no content type at all


def test_compressed_bodies_are_inflated_within_the_body_limit(client):
    import gzip
    import zlib

    doc = json.dumps({"text": ["a gripping film", "a dull mess"]}).encode()
    pin = {"X-DynaBERT-Width": "1.0", "X-DynaBERT-Depth": "1.0", "Content-Type": "application/json"}
    plain = client.post("/v1/classify", content=doc, headers=pin).json()["results"]
    raw = zlib.compressobj(wbits=-15)
    for coding, body in [
        ("gzip", gzip.compress(doc)),
        ("x-gzip", gzip.compress(doc)),
        ("deflate", zlib.compress(doc)),  # the zlib format, as RFC 9110 means it
        ("Deflate", raw.compress(doc) + raw.flush()),  # raw deflate, as some clients send it
    ]:
        r = client.post("/v1/classify", content=body, headers={**pin, "Content-Encoding": coding})
        assert r.status_code == 200, (coding, r.text)
        assert r.json()["results"] == plain
    enc = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    # a plain body that claims to be gzip, or a gzip stream cut short, is the client's mistake
    assert_problem(client.post("/v1/classify", content=doc, headers=enc), 400, "not valid gzip")
    assert_problem(client.post("/v1/classify", content=gzip.compress(doc)[:-8], headers=enc), 400, "gzip")
    # 48 kB that inflate to 50 MB stop at the body limit (1 MB here), not in memory
    bomb = gzip.compress(b" " * 50_000_000)
    assert len(bomb) < 100_000
    assert_problem(client.post("/v1/classify", content=bomb, headers=enc), 413, "inflates past")
    # a coding the server does not decode: 415 naming the ones it does (RFC 9110 15.5.16)
    r = client.post("/v1/classify", content=doc, headers={**enc, "Content-Encoding": "br"})
    assert_problem(r, 415, "'br'", "gzip, deflate")
    assert r.headers["accept-encoding"] == "gzip, deflate"


def test_a_single_valued_header_sent_twice_with_different_values_is_400(client):
    both = [("Content-Type", "application/json"), ("X-DynaBERT-Width", "0.25"), ("X-DynaBERT-Width", "1")]
    r = client.post("/v1/classify", content=b'{"text": "x"}', headers=both)
    assert_problem(r, 400, "X-DynaBERT-Width sent twice", "'0.25' and '1'")
    twice = [
        ("Content-Type", "application/json"),
        ("X-Latency-Budget-Ms", "50"),
        ("X-Latency-Budget-Ms", "50"),
    ]
    assert (
        client.post("/v1/classify", content=b'{"text": "x"}', headers=twice).status_code == 200
    )  # same value


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/v2/nothing"), 404)
    assert client.get("/v1/classify").headers["allow"] == "POST"
    assert_problem(client.get("/v1/classify"), 405, "GET /v1/classify: this route answers POST")
    assert_problem(client.delete("/healthz"), 405, "DELETE /healthz: this route answers GET, HEAD")


# ---- metrics ----------------------------------------------------------------------------------

CONTRACT = [
    "dynabert_requests_total",
    "dynabert_request_duration_seconds_bucket",
    "dynabert_queue_wait_seconds_bucket",
    "dynabert_inference_duration_seconds_bucket",
    "dynabert_subnetwork_selected_total",
    "dynabert_latency_budget_total",
    "dynabert_latency_budget_seconds_bucket",
    "dynabert_batch_size_bucket",
    "dynabert_queue_depth",
    "dynabert_queue_capacity",
    "dynabert_cpu_utilization_ratio",
    "dynabert_cpu_throttled_ratio",
    "dynabert_gpu_utilization_ratio",
    "dynabert_contention_factor",
    "dynabert_selected_metric_bucket",
    "dynabert_model_ready",
]


def sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _raw(c: TestClient, method: str, path: str, **kw) -> tuple[object, bytes]:
    """The response and the bytes that went over the wire (httpx would inflate a gzip body)."""
    with c.stream(method, path, **kw) as r:
        return r, b"".join(r.iter_raw())


def test_metrics_are_gzipped_for_a_scraper_that_asks(client):
    import gzip

    plain = client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and "dynabert_queue_depth" in plain.text
    r, raw = _raw(client, "GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.headers["vary"] == "Accept-Encoding"
    assert len(raw) < len(plain.content) / 3
    assert b"dynabert_queue_depth" in gzip.decompress(raw)


def test_large_answers_are_gzipped_for_a_client_that_takes_gzip(client):
    import gzip

    texts = [f"review number {i}: a quietly moving, well acted film" for i in range(48)]
    pin = {"X-DynaBERT-Width": SMALLEST[0], "X-DynaBERT-Depth": SMALLEST[1], "X-Latency-Budget-Ms": "60000"}
    plain, plain_raw = _raw(
        client, "POST", "/v1/classify", json={"text": texts}, headers={**pin, "Accept-Encoding": "identity"}
    )
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Accept-Encoding" and len(plain_raw) > 1400
    r, raw = _raw(
        client, "POST", "/v1/classify", json={"text": texts}, headers={**pin, "Accept-Encoding": "gzip, br"}
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.headers["vary"] == "Accept-Encoding" and int(r.headers["content-length"]) == len(raw)
    assert len(raw) < len(plain_raw) / 3
    # the same answer, headers and all, only smaller on the wire
    assert json.loads(gzip.decompress(raw)) == json.loads(plain_raw)
    for name in (
        "x-dynabert-width",
        "x-dynabert-depth",
        "x-latency-budget-met",
        "x-request-id",
        "server-timing",
    ):
        assert name in r.headers
    # a client that refuses gzip (q=0), or prefers identity, gets it plain
    for ae in ("gzip;q=0, deflate", "gzip;q=0.5, identity;q=1", "*;q=0"):
        r, raw = _raw(
            client, "POST", "/v1/classify", json={"text": texts}, headers={**pin, "Accept-Encoding": ae}
        )
        assert r.status_code == 200 and "content-encoding" not in r.headers, ae
        assert json.loads(raw) == json.loads(plain_raw)
    # "*" takes gzip; so do the model table and the OpenAPI document
    r, raw = _raw(client, "GET", "/v1/models", headers={"Accept-Encoding": "*"})
    assert r.headers["content-encoding"] == "gzip"
    assert {m["name"] for m in json.loads(gzip.decompress(raw))["models"]} == {"tiny-sst2", "squad"}
    r, raw = _raw(client, "GET", "/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert (
        r.headers["content-encoding"] == "gzip"
        and "/v1/classify" in json.loads(gzip.decompress(raw))["paths"]
    )


def test_small_answers_and_errors_go_plain(client):
    r, raw = _raw(client, "POST", "/v1/classify", json={"text": "fine"}, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers and "vary" not in r.headers
    assert json.loads(raw)["results"][0]["label"]
    r, raw = _raw(client, "POST", "/v1/classify", json={"text": ""}, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 422 and "content-encoding" not in r.headers
    assert json.loads(raw)["request_id"] == r.headers["x-request-id"]
    r = client.head("/healthz", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_gate_gzips_only_whole_unencoded_bodies(setting):
    """The gate's rule on any ASGI app behind it: a streamed body, one already encoded, a 204 and
    a body under the threshold pass as they are; DYNABERT_GZIP_RESPONSES=false turns it off."""
    import gzip

    from service.app import Gate

    big = b'{"x": "' + b"abc" * 1000 + b'"}'

    async def app(scope, receive, send):
        path = scope["path"]
        headers = [(b"content-type", b"application/json")]
        if path == "/encoded":
            headers.append((b"content-encoding", b"br"))
        status = 204 if path == "/empty" else 200
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if path == "/stream":
            await send({"type": "http.response.body", "body": big, "more_body": True})
            await send({"type": "http.response.body", "body": big, "more_body": False})
        elif path == "/empty":
            await send({"type": "http.response.body", "body": b""})
        elif path == "/small":
            await send({"type": "http.response.body", "body": b'{"x": 1}'})
        else:
            await send({"type": "http.response.body", "body": big})

    settings = Settings(gzip_responses=setting == "on", gzip_min_bytes=100)
    c = TestClient(Gate(app, settings))
    take = {"Accept-Encoding": "gzip"}
    r, raw = _raw(c, "GET", "/whole", headers=take)
    if setting == "on":
        assert r.headers["content-encoding"] == "gzip" and gzip.decompress(raw) == big
    else:
        assert "content-encoding" not in r.headers and raw == big
    assert r.headers["x-request-id"]
    r, raw = _raw(c, "GET", "/stream", headers=take)
    assert "content-encoding" not in r.headers and raw == big + big
    r, raw = _raw(c, "GET", "/encoded", headers=take)
    assert r.headers["content-encoding"] == "br" and raw == big
    r, raw = _raw(c, "GET", "/small", headers=take)
    assert "content-encoding" not in r.headers and raw == b'{"x": 1}'
    r, raw = _raw(c, "GET", "/empty", headers=take)
    assert r.status_code == 204 and "content-encoding" not in r.headers


def test_an_app_that_fails_after_its_head_is_counted_as_the_500_the_client_gets():
    from service import metrics as M
    from service.app import Gate

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("a bug after the head")

    served = M.REQUESTS.labels("unknown", "classify", "500")
    before = served._value.get()
    c = TestClient(Gate(app, Settings()), raise_server_exceptions=False)
    assert c.get("/v1/classify").status_code == 500
    assert served._value.get() == before + 1


@pytest.mark.parametrize(
    ("value", "takes"),
    [
        (None, False), ("", False), ("gzip", True), ("gzip, deflate, br", True), ("deflate", False),
        ("GZIP;q=0.5", True), ("x-gzip", True), ("gzip;q=0", False), ("gzip;q=0.0, *", False),
        ("*", True), ("*;q=0", False), ("br, *;q=0.1", True), ("identity", False),
        ("gzip;q=0.2, identity;q=1", False), ("gzip, identity;q=0.5", True), ("identity;q=0, gzip", True),
        ("gzip;q=nope", False),
    ],
)  # fmt: skip
def test_accept_encoding_is_read_with_its_q_values(value, takes):
    from service.app import accepts_gzip

    assert accepts_gzip(value) is takes


def test_metrics_count_requests_choices_and_budgets(client):
    before = client.get("/metrics").text
    pin = {"X-DynaBERT-Width": "0.75", "X-DynaBERT-Depth": "0.5", "X-Latency-Budget-Ms": "60000"}
    for _ in range(3):
        assert classify(client, {"text": "x"}, **pin).status_code == 200
    assert classify(client, {"model": "nope", "text": "x"}).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    for name in CONTRACT:
        assert re.search(rf"^{name}[{{ ]", after, re.M), f"{name} missing from /metrics"

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("dynabert_requests_total", model="tiny-sst2", endpoint="classify", status="200") == 3
    assert delta("dynabert_requests_total", model="unknown", endpoint="classify", status="404") == 1
    sel = dict(model="tiny-sst2", width="0.75", depth="0.5", reason="pinned")
    assert delta("dynabert_subnetwork_selected_total", **sel) == 3
    assert (
        delta("dynabert_inference_duration_seconds_count", model="tiny-sst2", width="0.75", depth="0.5") >= 1
    )
    assert delta("dynabert_latency_budget_total", model="tiny-sst2") == 3
    assert delta("dynabert_latency_budget_seconds_count", model="tiny-sst2") == 3
    assert sample(after, "dynabert_model_ready", model="tiny-sst2") == 1
    assert sample(after, "dynabert_queue_capacity", model="tiny-sst2") == 64
    assert 0 <= sample(after, "dynabert_cpu_utilization_ratio") <= 1
    assert 0 <= sample(after, "dynabert_cpu_throttled_ratio") <= 1  # (0 without a CPU quota)


def test_json_access_log_line_per_request(client, caplog):

    with caplog.at_level("INFO", logger="dynabert.access"):
        classify(client, {"text": "x"}, **{"X-Request-Id": "log-1", "X-Latency-Budget-Ms": "250"})
        (rec,) = [json.loads(r.getMessage()) for r in access_records(caplog)]
    assert rec["request_id"] == "log-1" and rec["model"] == "tiny-sst2" and rec["status"] == 200
    assert (
        rec["budget_ms"] == 250
        and rec["width"] in (1.0, 0.75, 0.5, 0.25)
        and rec["depth"] in (1.0, 0.75, 0.5)
    )
    assert rec["latency_ms"] > 0 and isinstance(rec["budget_met"], bool)
    # its time before the choice (read, parse, tokenise), within the prediction and the latency,
    # both counted from its first byte
    assert 0 < rec["chosen_ms"] < rec["predicted_ms"] and rec["chosen_ms"] < rec["latency_ms"]
    # tokenising is part of the time before the choice; queue, batch and the forward pass follow it
    assert 0 < rec["tokenize_ms"] < rec["chosen_ms"]
    assert (
        0 < rec["forward_ms"] <= rec["infer_ms"] and rec["tokenize_ms"] + rec["infer_ms"] < rec["latency_ms"]
    )
    # the server's JSON formatter merges the record's fields as they are (serialised once), with
    # time, level and logger; other messages through it become {"message": ...}
    from service.cli import JsonFormatter

    (raw,) = [r for r in caplog.records if r.name == "dynabert.access"]
    line = json.loads(JsonFormatter().format(raw))
    assert {k: line[k] for k in rec} == rec and line["logger"] == "dynabert.access"
    assert line["level"] == "info" and line["ts"].endswith("Z")
    other = logging.LogRecord("x", logging.WARNING, "", 0, "%d requests", (3,), None)
    assert json.loads(JsonFormatter().format(other))["message"] == "3 requests"


# ---- saturation, auth, policies: their own apps ------------------------------------------------


def hold_inference(served):
    """Make the model's runner wait for a gate, so a request stays in flight as long as we like."""
    gate, entered = threading.Event(), threading.Event()
    real = served.scheduler.runner

    def runner(key, rows):
        entered.set()
        gate.wait(30)
        return real(key, rows)

    served.scheduler.runner = runner
    return gate, entered


@contextlib.contextmanager
def one_request_held(app, c: TestClient):
    """One classify request held inside its forward pass while the block runs; yields a dict that
    holds its response (``"r"``) once the block has ended and the request was let go."""
    gate, entered = hold_inference(app.state.dynabert.get(None))
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=classify(c, {"text": "x"})))
    t.start()
    try:
        assert entered.wait(30)
        yield first
    finally:
        gate.set()
        t.join(30)


def test_saturated_queue_is_503_with_retry_after_and_health_still_answers(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, max_queue=1))
    with TestClient(app) as c, one_request_held(app, c) as first:
        assert app.state.dynabert.get(None).scheduler.depth == 1
        assert c.get("/healthz").status_code == 200  # the event loop is free while the model works
        assert "dynabert_queue_depth" in c.get("/metrics").text
        r = classify(c, {"text": "y"})
        body = assert_problem(r, 503, "queue full")
        assert int(r.headers["retry-after"]) >= 1
        assert body["queue_depth"] == 1 and body["queue_capacity"] == 1
    assert first["r"].status_code == 200


def counter(name: str, **labels: str) -> float:
    """The value of counter ``name`` (without ``_total``) for exactly these labels, in this process."""
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for m in REGISTRY.collect()
        if m.name == name
        for s in m.samples
        if s.name.endswith("_total") and s.labels == labels
    )


def test_a_pin_the_model_does_not_serve_is_400_even_when_the_queue_is_full(tiny_cls_checkpoint):
    """Found by the storm test over real HTTP: the queue bound was checked first, so under load
    this client's mistake was a 503, which invites a retry that can never succeed."""
    app = create_app(make_settings(tiny_cls_checkpoint, max_queue=1))
    with TestClient(app) as c, one_request_held(app, c):
        assert_problem(classify(c, {"text": "y"}), 503, "queue full")
        r = classify(c, {"text": "y"}, **{"X-DynaBERT-Width": "0.6"})
        assert assert_problem(r, 400, "width=0.6")["type"].endswith("subnetwork-not-served")


def rejected(reason: str, model: str = "unknown") -> float:
    return counter("dynabert_rejected", model=model, reason=reason)


def test_the_door_turns_requests_away_past_max_in_flight_before_reading_them(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, max_in_flight=1))
    with TestClient(app) as c:
        with one_request_held(app, c) as first:
            before = rejected("in_flight")
            # the body is not read: even one the route would refuse (an empty text) gets the 503
            for body in ({"text": "y"}, {"text": ""}):
                r = classify(c, body, **{"X-Request-Id": "door-1"})
                problem = assert_problem(r, 503, "in flight", "DYNABERT_MAX_IN_FLIGHT=1")
                assert r.headers["retry-after"] == "1" and problem["request_id"] == "door-1"
                assert problem["type"].endswith("overloaded")
                assert problem["in_flight"] == 1 and problem["in_flight_capacity"] == 1
            assert rejected("in_flight") == before + 2
            assert c.get("/healthz").status_code == 200 and c.get("/v1/models").status_code == 200
        assert first["r"].status_code == 200
        # answered requests leave the door: the next one is admitted
        assert classify(c, {"text": "z"}).status_code == 200
        assert app.state.dynabert.get(None).scheduler.depth == 0
    slow = create_app(make_settings(tiny_cls_checkpoint, max_in_flight=1, queue_full_status=429))
    with TestClient(slow) as c, one_request_held(slow, c):
        assert_problem(classify(c, {"text": "y"}), 429, "in flight")


def deadline_exceeded(stage: str, model: str = "tiny-sst2") -> float:
    return counter("dynabert_deadline_exceeded", model=model, stage=stage)


@pytest.mark.parametrize(
    "header, setting",
    [("X-Request-Timeout-Ms", 0.0), ("X-Envoy-Expected-Rq-Timeout-Ms", 0.0), (None, 150.0)],
    ids=["our header", "Envoy's", "the setting"],
)
def test_a_request_whose_timeout_passes_in_the_queue_is_504_and_never_run(
    tiny_cls_checkpoint, header, setting
):
    app = create_app(make_settings(tiny_cls_checkpoint, request_timeout_ms=setting))
    headers = {header: "150"} if header else {}
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        seen: list[int] = []
        real = served.scheduler.runner
        served.scheduler.runner = lambda key, rows: seen.append(len(rows)) or real(key, rows)
        observed: list = []
        observe = served.policy.observe_request
        served.policy.observe_request = lambda *a: observed.append(a) or observe(*a)
        assert "dynabert_deadline_exceeded_total" in c.get("/metrics").text  # at 0 from the start
        before = deadline_exceeded("queued")
        with one_request_held(app, c) as first:
            t0 = time.perf_counter()
            r = classify(c, {"text": ["y", "z"]}, **headers, **{"X-Request-Id": "late-1"})
            waited = time.perf_counter() - t0
            body = assert_problem(r, 504, "timeout", "150 ms", "not run")
        # under the setting the held request's own timeout passed as well: its batch ends later
        end = time.monotonic() + 10
        while not seen and time.monotonic() < end:
            time.sleep(0.01)
        assert first["r"].status_code == (504 if setting else 200)
        assert seen == [1]  # only the held request's row ran
        assert body["type"].endswith("deadline-exceeded") and body["request_id"] == "late-1"
        assert body["stage"] == "queued" and body["timeout_ms"] == 150
        assert (body["width"], body["depth"]) in {(s.width, s.depth) for s in served.engine.subnets}
        assert 0.15 <= waited < 10  # answered at its timeout, not when the held batch ended
        # the policy counts it as a miss of the sub-network it had chosen (within the default
        # 100 ms budget, shorter than the timeout)
        (d, budget_s, total_s) = observed[-1]
        assert (d.width, d.depth) == (body["width"], body["depth"])
        assert budget_s == 0.1 and total_s >= 0.15
        assert deadline_exceeded("queued") == before + 1
        while served.scheduler.depth and time.monotonic() < end:  # the held batch may still be running
            time.sleep(0.01)
        assert served.scheduler.depth == 0
        if header != "X-Request-Timeout-Ms":
            return
        # with nothing ahead, a timeout the answer beats changes nothing
        ok = classify(c, {"text": "w"}, **{"X-Request-Timeout-Ms": "30000"})
        assert ok.status_code == 200 and ok.json()["results"][0]["label"]


def test_a_timeout_during_the_forward_pass_is_504_at_the_timeout(tiny_cls_checkpoint, caplog):

    app = create_app(make_settings(tiny_cls_checkpoint))
    with TestClient(app) as c:
        gate, entered = hold_inference(app.state.dynabert.get(None))
        before = deadline_exceeded("running")
        try:
            with caplog.at_level("INFO", logger="dynabert.access"):
                r = classify(c, {"text": "x"}, **{"X-Request-Timeout-Ms": "100", "X-Request-Id": "t-1"})
                records = access_records(caplog)
        finally:
            gate.set()
        body = assert_problem(r, 504, "running", "dropped")
        assert entered.is_set() and body["stage"] == "running"
        assert deadline_exceeded("running") == before + 1
        # the access log says where it had been routed, and its timeout
        (rec,) = [json.loads(x.getMessage()) for x in records]
        assert rec["request_id"] == "t-1" and rec["status"] == 504 and rec["timeout_ms"] == 100
        assert (rec["width"], rec["depth"]) == (body["width"], body["depth"]) and rec["reason"] == "budget"
        assert classify(c, {"text": "y"}).status_code == 200  # the server goes on


def test_a_timeout_that_passes_before_the_queue_is_504_without_queuing(client):
    before = deadline_exceeded("admission")
    # 1 us: gone by the time the text is tokenised and routed
    r = classify(client, {"text": "x"}, **{"X-Request-Timeout-Ms": "0.001"})
    body = assert_problem(r, 504, "only after its timeout")
    assert body["stage"] == "admission" and 0 <= body["predicted_start_ms"] < body["predicted_finish_ms"]
    assert deadline_exceeded("admission") == before + 1


def test_the_policy_chooses_for_the_shorter_of_budget_and_timeout(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint))
    with TestClient(app) as c:
        policy = app.state.dynabert.get(None).policy
        budgets: list[float] = []
        real = policy.choose
        policy.choose = lambda budget_s, *a, **kw: budgets.append(budget_s) or real(budget_s, *a, **kw)
        for timeout in ("40", "900"):
            r = classify(c, {"text": "x"}, **{"X-Latency-Budget-Ms": "500", "X-Request-Timeout-Ms": timeout})
            assert r.status_code == 200 and r.headers["x-latency-budget-ms"] == "500"
    assert budgets == [0.04, 0.5]


def test_queue_full_status_429_by_setting(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, max_queue=1, queue_full_status=429))
    with TestClient(app) as c, one_request_held(app, c):
        r = classify(c, {"text": "y"})
        assert_problem(r, 429)
        assert "retry-after" in r.headers


def selected(reason: str) -> float:
    """dynabert_subnetwork_selected_total for tiny-sst2 and ``reason``, over all sub-networks."""
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for m in REGISTRY.collect()
        if m.name == "dynabert_subnetwork_selected"
        for s in m.samples
        if s.name.endswith("_total") and s.labels["model"] == "tiny-sst2" and s.labels["reason"] == reason
    )


def ran_on_threads(model: str) -> dict[str, float]:
    """dynabert_inference_threads_total of ``model``, by thread count."""
    from prometheus_client import REGISTRY

    return {
        s.labels["threads"]: s.value
        for m in REGISTRY.collect()
        if m.name == "dynabert_inference_threads"
        for s in m.samples
        if s.name.endswith("_total") and s.labels["model"] == model
    }


def test_a_calibrated_server_measures_one_thread_and_its_maximum(tiny_cls_checkpoint):
    settings = make_settings(
        tiny_cls_checkpoint, calibrate=True, profile_cache=False, torch_threads=2,
        calibration_batches=(1,), calibration_tokens=(8,),
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        assert served.profile.source == "calibrated" and served.profile.thread_counts == (1, 2)
        assert classify(c, {"text": "hi"}).status_code == 200
    fixed = create_app(make_settings(tiny_cls_checkpoint, calibrate=True, profile_cache=False, torch_threads=2,
                                     calibration_batches=(1,), calibration_tokens=(8,), adaptive_threads=False))  # fmt: skip
    with TestClient(fixed):
        assert fixed.state.dynabert.get(None).profile.thread_counts == (2,)


def test_each_batch_runs_on_the_thread_count_its_profile_predicts_fastest(tiny_cls_checkpoint):
    from service.profile import Curve

    app = create_app(make_settings(tiny_cls_checkpoint, torch_threads=2, adaptive_threads=False))
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        # one thread: 1 ms a token; two: 10 ms + 0.25 ms a token (they cross at 13 tokens in the batch)
        for per in served.profile.curves.values():
            per.clear()
            per.update({1: Curve(0.0, 1e-3, 0.0), 2: Curve(0.010, 0.25e-3, 0.0)})
        before = ran_on_threads("tiny-sst2")
        pin = {"X-DynaBERT-Width": "1.0", "X-DynaBERT-Depth": "1.0"}
        assert classify(c, {"text": "hi"}, **pin).status_code == 200
        after_one = ran_on_threads("tiny-sst2")
        assert after_one.get("1", 0) == before.get("1", 0) + 1 and after_one.get("2", 0) == before.get("2", 0)
        r = classify(c, {"text": [f"a rather longer sentence number {i}" for i in range(16)]}, **pin)
        assert r.status_code == 200
        after_big = ran_on_threads("tiny-sst2")
        assert after_big.get("2", 0) == after_one.get("2", 0) + 1 and after_big.get("1", 0) == after_one.get(
            "1", 0
        )
        assert "dynabert_inference_threads_total" in c.get("/metrics").text


@pytest.mark.parametrize("shed", [None, True, False])
def test_request_the_queue_makes_late_is_shed_with_retry_after_by_default(tiny_cls_checkpoint, shed, caplog):
    from service.profile import Curve

    # None: the setting left at its default, which sheds
    app = create_app(
        make_settings(tiny_cls_checkpoint, max_batch_size=1, **({} if shed is None else {"shed_late": shed}))
    )
    shed = shed is not False
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        for (
            per
        ) in served.profile.curves.values():  # a known profile: every forward pass is predicted at 20 ms
            for n in per:
                per[n] = Curve(0.020, 0.0, 0.0)
        gate, entered = hold_inference(served)
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(classify(c, {"text": "x"})))]
        threads[0].start()
        try:
            assert entered.wait(30)
            for _ in range(2):  # two more wait behind it, one forward pass each (max_batch_size=1)
                threads.append(threading.Thread(target=lambda: results.append(classify(c, {"text": "y"}))))
                threads[-1].start()
            deadline = time.monotonic() + 30
            while served.scheduler.depth < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.scheduler.depth == 3
            # counted from here: how the three above were routed depends on how fast they came
            fallbacks = selected("fallback")
            late = {"X-Latency-Budget-Ms": "50"}  # 40 ms queued + 20 ms own > 50; idle, 20 ms fits
            if shed:
                with caplog.at_level("INFO", logger="dynabert.access"):
                    r = classify(c, {"text": "z"}, **late, **{"X-Request-Id": "shed-1"})
                    records = access_records(caplog)
                body = assert_problem(r, 503, "budget", "retry after")
                assert body["type"].endswith(":overloaded") and int(r.headers["retry-after"]) >= 1
                assert body["predicted_ms"] > body["budget_ms"] == 50 and body["queue_depth"] == 3
                # the access log says the policy shed it, and what it predicted on which sub-network
                (rec,) = [json.loads(x.getMessage()) for x in records]
                assert rec["request_id"] == "shed-1" and rec["status"] == 503 and rec["reason"] == "shed"
                assert rec["predicted_ms"] == body["predicted_ms"] and rec["contention"] >= 1
                assert (rec["width"], rec["depth"]) == (0.25, 0.5) and rec["budget_met"] is None
                assert (
                    'dynabert_rejected_total{model="tiny-sst2",reason="deadline"}' in c.get("/metrics").text
                )
            # served late, not shed: without the setting, when even an idle server would miss the
            # budget (10 ms < 20 ms), and when pinned
            kept = [late] if not shed else []
            kept += [{"X-Latency-Budget-Ms": "10"}, {**late, "X-DynaBERT-Depth": "0.5"}]
            for h in kept:
                threads.append(
                    threading.Thread(target=lambda h=h: results.append(classify(c, {"text": "w"}, **h)))
                )
                threads[-1].start()
            while served.scheduler.depth < 3 + len(kept) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.scheduler.depth == 3 + len(kept)
        finally:
            gate.set()
            for t in threads:
                t.join(30)
        assert [r.status_code for r in results] == [200] * len(threads)
        assert selected("fallback") - fallbacks == len(kept) - 1  # all but the pinned one


def test_api_key(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, api_key="s3cret"))
    with TestClient(app) as c:
        r = classify(c, {"text": "x"})
        assert assert_problem(r, 401, "missing")["type"] == "urn:dynabert:problem:unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert_problem(classify(c, {"text": "x"}, Authorization="Bearer wrong"), 401, "wrong")
        assert_problem(classify(c, {"text": "x"}, Authorization="Basic s3cret"), 401)
        assert classify(c, {"text": "x"}, Authorization="Bearer s3cret").status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200


def test_cors_lets_the_listed_origins_call_the_api_and_read_its_headers(tiny_cls_checkpoint, monkeypatch):
    page = "https://app.example"
    app = create_app(make_settings(tiny_cls_checkpoint, api_key="s3cret", cors_origins=[page]))
    with TestClient(app) as c:
        # the browser's preflight for a POST with the SLA and auth headers: answered without a key
        asks = "authorization, content-type, x-latency-budget-ms, x-dynabert-width"
        pre = {
            "Origin": page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asks,
        }
        r = c.options("/v1/classify", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert {"authorization", "x-latency-budget-ms", "x-dynabert-width"} <= {
            h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")
        }
        r = classify(
            c, {"text": "x"}, Origin=page, Authorization="Bearer s3cret", **{"X-Latency-Budget-Ms": "80"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {
            "x-dynabert-width",
            "x-dynabert-depth",
            "x-latency-budget-met",
            "server-timing",
            "x-request-id",
        } <= exposed
        # the gate's own answers carry CORS too, so the page can read why it failed
        r = classify(c, {"text": "x"}, Origin=page)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == page
        # another origin: its preflight fails and no answer names it
        r = c.options("/v1/classify", headers={**pre, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = classify(c, {"text": "x"}, Origin="https://evil.example", Authorization="Bearer s3cret")
        assert "access-control-allow-origin" not in r.headers
    # by default no CORS at all: a preflight is a 405 like any OPTIONS
    with TestClient(create_app(make_settings(tiny_cls_checkpoint))) as c:
        assert "access-control-allow-origin" not in classify(c, {"text": "x"}, Origin=page).headers
        assert c.options("/v1/classify", headers=pre).status_code == 405
    monkeypatch.setenv("DYNABERT_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_overlong_text_rejected_by_setting(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, overlong_text="reject"))
    with TestClient(app) as c:
        assert_problem(classify(c, {"text": "word " * 400}), 413, "exceed", "128 tokens")
        assert classify(c, {"text": "short"}).status_code == 200


@pytest.mark.parametrize(
    "policy, extra, expect",
    [
        ("fixed", {"fixed_width": 0.5, "fixed_depth": 0.75}, ("0.5", "0.75")),
        ("max-accuracy", {}, ("1.0", "1.0")),
    ],
)
def test_fixed_and_max_accuracy_policies_ignore_the_budget(tiny_cls_checkpoint, policy, extra, expect):
    app = create_app(make_settings(tiny_cls_checkpoint, policy=policy, **extra))
    with TestClient(app) as c:
        r = classify(c, {"text": "x"}, **{"X-Latency-Budget-Ms": "0.001"})
        assert (r.headers["x-dynabert-width"], r.headers["x-dynabert-depth"]) == expect
        pinned = classify(c, {"text": "x"}, **{"X-DynaBERT-Width": "0.25", "X-DynaBERT-Depth": "0.5"})
        assert (pinned.headers["x-dynabert-width"], pinned.headers["x-dynabert-depth"]) == SMALLEST


def test_fixed_policy_with_an_unserved_subnetwork_fails_at_startup(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, policy="fixed", fixed_width=0.6))
    with pytest.raises(ValueError, match="0.6"):
        with TestClient(app):
            pass


def test_concurrent_requests_are_batched(tiny_cls_checkpoint):
    app = create_app(make_settings(tiny_cls_checkpoint, max_wait_ms=5.0))
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        gate, entered = hold_inference(served)
        pin = {"X-DynaBERT-Width": "1.0", "X-DynaBERT-Depth": "1.0"}
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(classify(c, {"text": "x"}, **pin)))
            for _ in range(4)
        ]
        threads[0].start()
        assert entered.wait(30)  # the first runs alone and blocks; the next three queue up together
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while served.scheduler.depth < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(30)
        assert all(r.status_code == 200 for r in results)
        assert served.scheduler.batches_run == 2  # 1 + 3


def test_a_pair_classifier_takes_pairs_and_only_pairs(tmp_path):
    from model.config import TaskSpec
    from tests.conftest import build_tiny_checkpoint

    mrpc = TaskSpec(
        name="mrpc", labels=("not_equivalent", "equivalent"), text_fields=("sentence1", "sentence2")
    )
    ckpt = build_tiny_checkpoint(tmp_path / "tiny-mrpc", mrpc, seed=3)
    with TestClient(create_app(make_settings(ckpt))) as c:
        one = classify(c, {"text": "A man plays.", "text_pair": "Someone plays music."})
        many = classify(c, {"text": ["A man plays.", "b"], "text_pair": ["Someone plays music.", "c"]})
        assert one.status_code == many.status_code == 200, many.text
        assert len(many.json()["results"]) == 2
        assert set(many.json()["results"][0]["scores"]) == {"not_equivalent", "equivalent"}
        # the same pair alone or in a batch: the same scores (the second text is read, not dropped)
        p1, p2 = one.json()["results"][0]["scores"], many.json()["results"][0]["scores"]
        assert p1["equivalent"] == pytest.approx(p2["equivalent"], abs=1e-5)
        swapped = classify(c, {"text": "Someone plays music.", "text_pair": "A man plays."}).json()
        assert swapped["results"][0]["scores"]["equivalent"] != pytest.approx(p1["equivalent"], abs=1e-6)
        problem = assert_problem(classify(c, {"text": "A man plays."}), 422, "text_pair")
        assert problem["errors"][0]["field"] == "text_pair"


def test_regression_model_returns_values(tmp_path, minilm_dir):
    from model.checkpoint import save_checkpoint
    from model.config import DynaBertConfig, TaskSpec
    from model.hf import load_tokenizer
    from model.modeling import DynaBertModel

    task = TaskSpec(type="regression", name="stsb", text_fields=("sentence1", "sentence2"), metric="pearson")
    cfg = DynaBertConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=160, task=task)
    ckpt = save_checkpoint(
        DynaBertModel(cfg).eval(), tmp_path / "tiny-stsb", tokenizer=load_tokenizer(minilm_dir)
    )
    with TestClient(create_app(make_settings(ckpt))) as c:
        r = classify(c, {"text": ["a man plays", "x"], "text_pair": ["someone plays", "y"]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2 and all(
            set(x) == {"value"} and isinstance(x["value"], float) for x in results
        )
        # a pair model without its second texts: 422 naming text_pair
        problem = assert_problem(classify(c, {"text": "a man plays"}), 422, "text_pair")
        assert problem["errors"][0]["field"] == "text_pair"
