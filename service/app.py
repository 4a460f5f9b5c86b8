"""The FastAPI application: ``create_app(settings)``.

The lifespan loads every checkpoint once, calibrates (or re-checks the cached) latency profile of
its sub-networks, starts one scheduler per model and the load sampler, and only then is the app
ready; on shutdown it stops taking work, finishes queued and running requests, and stops.
State lives on ``app.state.dynabert`` and routes reach it through typed dependencies.

A pure ASGI gate in front of the routes gives every response an ``X-Request-Id``, turns client
mistakes at the HTTP level (bad request id, a single-valued header sent twice, missing API key,
non-JSON content type, an unknown content coding, body too large) into problem documents,
inflates gzip/deflate bodies, hands an admitted POST /v1/classify or /v1/qa straight to its
handler (service/routes.py's ``direct``, unless DYNABERT_DIRECT_ROUTES=false), and records request
metrics and one JSON log line per API call.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import gzip
import hmac
import json
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service import metrics as M
from service.engine import PIECE_ROWS, Engine, pieces
from service.errors import CLIENT_CLOSED_STATUS, ProblemError, problem_response
from service.later import Later
from service.load import LoadMonitor, LoadReading, cpu_capacity, threads_for, usable_cores
from service.policy import Policy
from service.profile import LatencyProfile, flops_profile, load_or_calibrate, thread_counts_to_calibrate
from service.scheduler import Ran, Runner, Scheduler
from service.serving import RequestOptions, Served
from service.settings import Settings
from service.worker import Calibration, InferenceWorker

log = logging.getLogger(__name__)
access_log = logging.getLogger("dynabert.access")

ENDPOINTS = {"/v1/classify": "classify", "/v1/qa": "qa"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


Problem = tuple[int, str, dict[str, str], str]  # status, detail, headers, problem type

# request headers that carry one value: sent twice with different values, which one the client
# meant is unknown (a proxy that appends instead of replacing, two layers of a client each
# setting a pin), so the request is refused instead of silently taking the first
SINGLE_HEADERS = {
    b"x-latency-budget-ms": "X-Latency-Budget-Ms",
    b"x-request-timeout-ms": "X-Request-Timeout-Ms",
    b"x-envoy-expected-rq-timeout-ms": "X-Envoy-Expected-Rq-Timeout-Ms",
    b"x-dynabert-width": "X-DynaBERT-Width",
    b"x-dynabert-depth": "X-DynaBERT-Depth",
    b"x-request-id": "X-Request-Id",
    b"authorization": "Authorization",
    b"content-type": "Content-Type",
    b"content-encoding": "Content-Encoding",
}
# request body codings the gate decodes (RFC 9110 8.4.1; "deflate" is the zlib format, and some
# clients send it raw, which is accepted too); Triton's HTTP endpoint takes the same two
CODINGS = {"gzip": 16 + 15, "x-gzip": 16 + 15, "deflate": 15}
ACCEPT_ENCODING = "gzip, deflate"
# CORS (DYNABERT_CORS_ORIGINS): what a page may send beyond the CORS-safelisted headers, and the
# response headers its script may read (the SLA headers, the request id, Retry-After)
CORS_REQUEST_HEADERS = [
    "Authorization", "Content-Type", "Content-Encoding", "X-Request-Id", "X-Latency-Budget-Ms",
    "X-DynaBERT-Width", "X-DynaBERT-Depth", "X-Request-Timeout-Ms",
]  # fmt: skip
CORS_RESPONSE_HEADERS = [
    "X-Request-Id", "X-DynaBERT-Width", "X-DynaBERT-Depth", "X-Latency-Budget-Ms", "X-Latency-Budget-Met",
    "X-DynaBERT-Truncated", "Server-Timing", "Retry-After",
]  # fmt: skip


class AccessLine(dict):
    """One access-log record's fields, logged as the message object: ``JsonFormatter`` merges
    them as they are, and any other formatter gets them as JSON text (``str``). Serialising once
    here and parsing the text again in the formatter cost 35 us of the event loop per request."""

    def __str__(self) -> str:
        return json.dumps(self, separators=(",", ":"))


@dataclass
class AppState:
    settings: Settings
    models: dict[str, Served] = field(default_factory=dict)
    monitor: LoadMonitor | None = None
    later: Later = field(default_factory=Later)  # records and feedback, run once the answer is out
    ready: bool = False
    started: float = field(default_factory=time.time)

    def get(self, name: str | None, qa: bool = False) -> Served:
        """A served model by name; 404 when unknown. None: the route's default, the first model
        of its kind (``qa``: the first QA model; else the first classifier), or the first model
        when none is (the route then says which route that one answers on)."""
        if name is None:
            if not self.models:
                raise ProblemError(
                    503, "no model loaded yet", type_="not-ready", headers={"Retry-After": "1"}
                )
            return next(
                (s for s in self.models.values() if (s.engine.task.type == "qa") == qa),
                next(iter(self.models.values())),
            )
        served = self.models.get(name)
        if served is None:
            raise ProblemError(
                404,
                f"unknown model {name!r}; served: {', '.join(self.models) or 'none'}",
                type_="unknown-model",
            )
        return served

    def refresh_gauges(self) -> None:
        if self.monitor is not None:
            r = self.monitor.reading()
            M.CPU.set(r.cpu)
            M.CPU_THROTTLED.set(r.cpu_throttled)
            M.GPU.set(r.gpu)
        for name, s in self.models.items():
            M.QUEUE_DEPTH.labels(name).set(s.scheduler.depth)
            M.CONTENTION.labels(name).set(s.policy.contention())


# Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a thread
# pool, and that hop (queue, condition variable, thread wake-up) was the largest single cost of
# a request on the event loop (py-spy on the benchmark: ~9% of the loop's samples).
async def get_state(request: Request) -> AppState:
    return request.app.state.dynabert


StateDep = Annotated[AppState, Depends(get_state)]


def _number_header(request: Request, name: str) -> float | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        v = float(raw.strip())
    except ValueError:
        raise ProblemError(400, f"header {name}: {raw!r} is not a number", type_="bad-header") from None
    if not (v == v and v not in (float("inf"), float("-inf"))):
        raise ProblemError(400, f"header {name}: {raw!r} is not a finite number", type_="bad-header")
    return v


async def get_options(request: Request, state: StateDep) -> RequestOptions:
    """X-Latency-Budget-Ms, X-DynaBERT-Width, X-DynaBERT-Depth, X-Request-Timeout-Ms (400 when
    malformed)."""
    s = state.settings
    budget = _number_header(request, "X-Latency-Budget-Ms")
    if budget is None:
        budget = s.default_budget_ms
    elif not 0 < budget <= s.max_budget_ms:
        raise ProblemError(
            400,
            f"header X-Latency-Budget-Ms: {budget:g} must be > 0 and <= {s.max_budget_ms:g}",
            type_="bad-header",
        )
    width = _number_header(request, "X-DynaBERT-Width")
    depth = _number_header(request, "X-DynaBERT-Depth")
    for name, v in (("X-DynaBERT-Width", width), ("X-DynaBERT-Depth", depth)):
        if v is not None and not 0 < v <= 1:
            raise ProblemError(400, f"header {name}: {v:g} must be in (0, 1]", type_="bad-header")
    request.state.budget_ms = budget
    closed = _hang_up(request.receive) if s.cancel_on_disconnect else None
    timeout_ms = _timeout_ms(request, s.request_timeout_ms)
    if timeout_ms is not None:
        request.state.timeout_ms = timeout_ms
    timeout = None if timeout_ms is None else timeout_ms / 1e3
    return RequestOptions(budget / 1e3, width, depth, request.state.t0, closed, timeout)


TIMEOUT_HEADERS = ("X-Request-Timeout-Ms", "X-Envoy-Expected-Rq-Timeout-Ms")


def _timeout_ms(request: Request, default_ms: float) -> float | None:
    """The request's timeout: X-Request-Timeout-Ms, else the one Envoy announces to its upstream
    (X-Envoy-Expected-Rq-Timeout-Ms, its route timeout), else the setting (0: none)."""
    for name in TIMEOUT_HEADERS:
        v = _number_header(request, name)
        if v is not None:
            if v <= 0:
                raise ProblemError(400, f"header {name}: {v:g} must be > 0", type_="bad-header")
            return v
    return default_ms or None


def _hang_up(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns when the client has closed the connection. Called only
    once the route has read the body, so the next ASGI message is ``http.disconnect`` (on a hang-up,
    or when the answer has been sent)."""

    async def closed() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return closed


OptionsDep = Annotated[RequestOptions, Depends(get_options)]


# ---- the gate: request id, auth, content type, body size, metrics, access log ---------------


def inflate(raw: bytes, coding: str, limit: int) -> bytes | None:
    """``raw`` decoded from ``coding`` (a key of CODINGS), stopping past ``limit`` bytes (the
    caller refuses anything longer); None when it is not one whole stream of that coding."""
    for wbits in (CODINGS[coding], -15) if coding == "deflate" else (CODINGS[coding],):
        z = zlib.decompressobj(wbits)
        try:
            body = z.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(body) > limit or (z.eof and not z.unused_data):
            return body
    return None


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether a client's ``Accept-Encoding`` takes a gzip answer (RFC 9110 12.5.3): gzip (or
    x-gzip, or ``*`` when gzip is not named) with a q-value above 0, and not below identity's
    when the client names identity too. Absent or empty: no."""
    if not accept_encoding:
        return False
    q: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        coding = coding.strip().lower()
        q[coding] = max(weight, q.get(coding, 0.0))
    gz = max(q.get("gzip", -1.0), q.get("x-gzip", -1.0))
    if gz < 0:
        gz = q.get("*", 0.0)
    return gz > 0 and gz >= q.get("identity", 0.0)


# gzip level for answers: JSON of labels and scores shrinks 3-8x at level 5, and a 64-input
# answer (8 kB) takes about 0.1 ms; bodies over GZIP_IN_THREAD bytes are compressed off the event
# loop (zlib releases the GIL)
GZIP_LEVEL = 5
GZIP_IN_THREAD = 256 * 1024


class Gate:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, later: Later | None = None, direct: ASGIApp | None = None
    ) -> None:
        self.app, self.settings, self.later = app, settings, later or Later(0)
        # what answers an admitted POST /v1/classify or /v1/qa (service/routes.py's ``direct``);
        # None: the app behind the gate (FastAPI's routing)
        self.direct = direct
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        self.api_key = key.encode() if key else None
        self.in_flight = 0  # API requests admitted at the door and not yet answered (event loop only)

    def _reject(self, scope: Scope) -> Problem | None:
        seen: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in SINGLE_HEADERS:
                if seen.setdefault(name, value) != value:
                    values = f"{seen[name].decode('latin-1')!r} and {value.decode('latin-1')!r}"
                    return (
                        400,
                        f"header {SINGLE_HEADERS[name]} sent twice ({values}): send it once",
                        {},
                        "bad-header",
                    )
        h = Headers(scope=scope)
        if self.api_key is not None:
            auth = h.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                why = "missing" if not auth else "wrong"
                return (
                    401,
                    f"{why} API key: send 'Authorization: Bearer <key>'",
                    {"WWW-Authenticate": "Bearer"},
                    "unauthorized",
                )
        ctype = h.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return (
                415,
                f"content type {ctype or '(none)'!r}: send application/json",
                {"Accept-Post": "application/json"},
                "unsupported-media-type",
            )
        coding = h.get("content-encoding", "identity").strip().lower()
        if coding not in CODINGS and coding not in ("identity", ""):
            return (
                415,
                f"content coding {coding!r}: send the body as is, or with one of {ACCEPT_ENCODING}",
                {"Accept-Encoding": ACCEPT_ENCODING},
                "unsupported-content-encoding",
            )
        length = h.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, f"header Content-Length: {length!r} is not a number", {}, "bad-header"
            if int(length) > self.settings.max_body_bytes:
                return (
                    413,
                    f"body of {int(length)} bytes; at most {self.settings.max_body_bytes}",
                    {},
                    "body-too-large",
                )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        # the request's clock: from its first byte, when the protocol stamped it (service/protocol.py;
        # the event loop's lag before this call is the request's time too), else from here
        t0 = state.get("received") or time.perf_counter()
        h = Headers(scope=scope)
        rid = h.get("x-request-id")
        bad_rid = rid is not None and not _REQUEST_ID.match(rid)
        rid = uuid.uuid4().hex if rid is None or bad_rid else rid
        state["request_id"], state["t0"] = rid, t0
        status = 500
        # the response head waits for the body, whose size decides whether it is gzipped
        compress = self.settings.gzip_responses and scope["method"] != "HEAD"
        gzip_ok = compress and accepts_gzip(h.get("accept-encoding"))
        start: Message | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, start
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = rid
                if compress:
                    start = message
                    return
            elif start is not None:
                head, start = start, None
                message = await self._gzip(head, message, gzip_ok)
                await send(head)
            await send(message)

        path = scope["path"]
        endpoint = ENDPOINTS.get(path)
        admitted = False
        try:
            problem, extra = None, None
            if bad_rid:
                problem = (400, "header X-Request-Id: at most 128 of A-Z a-z 0-9 . _ : -", {}, "bad-header")
            elif scope["method"] == "POST" and path.startswith("/v1/"):
                problem = self._reject(scope)
                if problem is None and self.in_flight >= self.settings.max_in_flight:
                    problem, extra = self._full()  # before the body is read: the cheap answer
                if problem is None:
                    receive, problem = await self._body(scope, receive)
                # a place at the door is taken only once the body is in: clients that stall
                # mid-upload would otherwise fill it and shut everyone else out
                if problem is None and self.in_flight >= self.settings.max_in_flight:
                    problem, extra = self._full()
                if problem is None:
                    self.in_flight += 1
                    admitted = True
            if problem is not None and problem[0] == CLIENT_CLOSED_STATUS:
                status = CLIENT_CLOSED_STATUS  # gone before its body was in: nobody to answer
                M.CLIENT_CLOSED.labels("unknown", "body").inc()
            elif problem is not None:
                from starlette.requests import Request as _Req

                status_, detail, headers, type_ = problem
                resp = problem_response(
                    _Req(scope), status_, detail, headers=headers, type_=type_, extra=extra
                )
                await resp(scope, receive, send_with_id)
            elif admitted and endpoint is not None and self.direct is not None:
                await self.direct(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if start is not None:  # a head held for a body that never came: the app failed after
                status = 500  # its start, and the server answers 500 (nothing of the head went out)
            if admitted:
                self.in_flight -= 1
            if endpoint is not None:  # once the answer is out (service/later.py)
                self.later(self._record, state, endpoint, status, time.perf_counter() - t0, rid)

    async def _gzip(self, head: Message, message: Message, gzip_ok: bool) -> Message:
        """The first body message of a response whose head is ``head``, gzipped (and the head
        told so) when it is the whole body, at least ``gzip_min_bytes`` long, not encoded already
        and the client takes gzip. Such a body says ``Vary: Accept-Encoding`` either way, so that a
        cache keeps the two apart. A streamed body (more to come) passes as it is."""
        body = message.get("body", b"")
        if message.get("more_body", False) or len(body) < self.settings.gzip_min_bytes:
            return message
        headers = MutableHeaders(scope=head)
        if "content-encoding" in headers or head["status"] in (204, 304):
            return message
        headers.add_vary_header("Accept-Encoding")
        if not gzip_ok:
            return message
        if len(body) > GZIP_IN_THREAD:
            data = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL, mtime=0)
        else:
            data = gzip.compress(body, GZIP_LEVEL, mtime=0)
        headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(data))
        return {**message, "body": data}

    def _full(self) -> tuple[Problem, dict[str, Any]]:
        """The door is at ``max_in_flight``: turn the request away before its body is read, routed
        or tokenised. Under overload those steps, spent on requests that are then rejected (or
        answered after the client gave up), took the event loop from the requests it had admitted:
        with the forward pass negligible (a GPU, or the tiny test model here), a front end offered
        1300 req/s, twice what it serves, answered 203-217 req/s; with the door at 32, 306-606
        (docs/RESULTS.md). The model is not known yet (it is in the body): labelled unknown."""
        M.REJECTED.labels("unknown", "in_flight").inc()
        n, cap = self.in_flight, self.settings.max_in_flight
        detail = f"{n} requests in flight (DYNABERT_MAX_IN_FLIGHT={cap}); retry after 1 s"
        problem = (self.settings.queue_full_status, detail, {"Retry-After": "1"}, "overloaded")
        return problem, {"in_flight": n, "in_flight_capacity": cap, "retry_after_s": 1.0}

    async def _body(self, scope: Scope, receive: Receive) -> tuple[Receive, Problem | None]:
        """Read the whole body by ``body_timeout_s`` and up to ``max_body_bytes`` (inflated when it
        is compressed), and hand the route a ``receive`` that replays it. uvicorn sets no deadline
        on a body: a client that sends its headers and then stalls would hold its connection, and
        its place at the door, for ever."""
        chunks: list[bytes] = []
        h = Headers(scope=scope)
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                problem = await self._read(receive, chunks)
        except TimeoutError:
            M.CONNECTIONS_CLOSED.labels("body_timeout").inc()
            length = h.get("content-length")
            got = (
                f"{sum(map(len, chunks))} of {length if length is not None else 'an unknown number of'} bytes"
            )
            detail = f"the body did not arrive within {self.settings.body_timeout_s:g} s ({got})"
            return receive, (408, detail, {"Connection": "close"}, "body-timeout")
        if problem is not None:
            return receive, problem
        body = b"".join(chunks)
        coding = h.get("content-encoding", "identity").strip().lower()
        if coding in CODINGS:
            return await self._decode(scope, receive, coding, body)
        return self._replay(body, receive), None

    async def _read(self, receive: Receive, chunks: list[bytes]) -> Problem | None:
        """The body's chunks into ``chunks``, up to the limit; a 499 when the client hangs up first."""
        size, more = 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # http.disconnect
                return CLIENT_CLOSED_STATUS, "the client closed the connection before its body was in", {}, ""
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.settings.max_body_bytes:
                return 413, f"body over {self.settings.max_body_bytes} bytes", {}, "body-too-large"
        return None

    async def _decode(
        self, scope: Scope, receive: Receive, coding: str, raw: bytes
    ) -> tuple[Receive, Problem | None]:
        """A compressed body: inflate it to at most ``max_body_bytes`` (a small body that inflates
        without bound, a "zip bomb", stops at the limit), and hand the routes the plain body with
        headers that describe it."""
        limit = self.settings.max_body_bytes
        # off the event loop: up to the limit, inflating takes milliseconds (1.4 ms for 1 MB of
        # JSON, 3.4 ms for a zip bomb cut at 1 MB), which the other requests and /healthz would wait
        body = await asyncio.to_thread(inflate, raw, coding, limit)
        if body is None:
            return receive, (
                400,
                f"body is not valid {coding} data (Content-Encoding: {coding})",
                {},
                "bad-encoding",
            )
        if len(body) > limit:
            return receive, (413, f"body inflates past {limit} bytes", {}, "body-too-large")
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")
        ] + [(b"content-length", str(len(body)).encode())]
        return self._replay(body, receive), None

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _record(self, state: dict[str, Any], endpoint: str, status: int, seconds: float, rid: str) -> None:
        model = state.get("model") or "unknown"  # only configured names reach the labels
        M.REQUESTS.labels(model, endpoint, str(status)).inc()
        M.REQUEST_DURATION.labels(model, endpoint).observe(seconds)
        if self.settings.request_log:
            line = {
                "request_id": rid,
                "endpoint": endpoint,
                "model": state.get("model"),
                "width": state.get("width"),
                "depth": state.get("depth"),
                "reason": state.get("reason"),
                "budget_ms": state.get("budget_ms"),
                "budget_met": state.get("met"),
                "timeout_ms": state.get("timeout_ms"),
                "latency_ms": round(1e3 * seconds, 3),
                "predicted_ms": state.get("predicted_ms"),
                "chosen_ms": state.get("chosen_ms"),
                "contention": state.get("contention"),
                "tokenize_ms": state.get("tokenize_ms"),
                "queue_ms": state.get("queue_ms"),
                "infer_ms": state.get("infer_ms"),
                "forward_ms": state.get("forward_ms"),
                "inputs": state.get("inputs"),
                "batch": state.get("batch"),
                "status": status,
            }
            access_log.info(AccessLine(line))


# ---- the app ---------------------------------------------------------------------------------


def _load_model(
    name: str, path: Any, settings: Settings, executor: ThreadPoolExecutor, monitor: LoadMonitor
) -> Served:
    """Load, calibrate and wire one model (runs in a thread; the scheduler starts later)."""
    import torch

    t0 = time.perf_counter()
    # with several inference workers (settings.instances) the threads are split among them
    instances = settings.instances_for(torch.get_num_threads())
    threads = max(1, torch.get_num_threads() // instances)
    counts = thread_counts_to_calibrate(settings.device, threads, settings.adaptive_threads)
    calibration = (
        Calibration(settings.calibration_batches, settings.calibration_tokens, settings.profile_cache, counts)
        if settings.calibrate
        else None
    )
    workers: list[InferenceWorker] = []
    if settings.inference_worker == "process":

        def on_start(k: int) -> Callable[[int], None]:
            def started(pid: int) -> None:
                monitor.add_process(pid, name)  # its CPU is this server's, not another tenant's
                if workers[k].restarts:
                    M.WORKER_RESTARTS.labels(name).inc()

            return started

        for k in range(instances):
            workers.append(
                InferenceWorker(path, device=settings.device, threads=threads, on_start=on_start(k))
            )
            workers[k].spawn()  # it imports torch while this process loads the tokenizer and config below
    # with a worker process the forward passes run there, and this process only tokenises: its
    # copy of the weights stays on the CPU until dropped, so it never starts a CUDA context
    here = settings.device if settings.inference_worker == "thread" else "cpu"
    try:
        engine = Engine.load(path, name, here)
        keys = [s.key for s in engine.subnets]
        profile = flops_profile(engine.cfg, keys)
        if workers:
            M.WORKER_RESTARTS.labels(name)  # the series exists at 0 from the start: increase() sees the first
            measured = workers[0].start(calibration)  # loads the checkpoint and calibrates in the worker
            if measured is not None:
                profile = LatencyProfile.from_json(measured["json"], measured["source"])
            for w in workers[1:]:  # the same weights on the same cores: the first one's profile
                w.start(None)
            engine.drop_weights()  # the workers have their own copies; this one would only take memory
        elif calibration is not None:
            profile = load_or_calibrate(
                engine.model, keys, engine.ckpt.path, device=settings.device,
                batches=calibration.batches, tokens=calibration.tokens, use_cache=calibration.use_cache,
                threads=calibration.threads,
            )  # fmt: skip
    except BaseException:
        for w in workers:
            w.close(timeout_s=1.0)
        raise
    try:
        served = _wire(name, engine, profile, workers, settings, executor, monitor)
    except BaseException:  # leave no worker process behind a model that failed to start
        for w in workers:
            w.close(timeout_s=1.0)
        raise
    log.info(
        "model %r from %s: %s, %d sub-networks, profile %s, %s, ready in %.1f s",
        name, path, engine.task.type, len(keys), profile.source,
        f"{len(workers)} inference worker(s) of {threads} thread(s)" if workers else "in-process",
        time.perf_counter() - t0,
    )  # fmt: skip
    return served


def busy_poll_s(settings: Settings, threads: int, cores: float, reading: LoadReading, quiet: bool) -> float:
    """How long the event loop may busy-poll for the answer of a batch on ``threads`` intra-op
    threads (0: the worker's own count, taken as all cores) of ``cores`` (service/worker.py's
    ``busy_poll``): only when the batch is all the work there is (``quiet``, the scheduler's
    view) and a core is left free by the worker's threads (one on a GPU) and other processes.
    Polling on a core the forward pass or another process needs would slow them down."""
    if settings.busy_poll_ms <= 0 or not quiet:
        return 0.0
    used = 1 if settings.device.startswith("cuda") else threads or cores
    free = cores * (1.0 - reading.cpu_other) - used
    return settings.busy_poll_ms / 1e3 if free >= 0.75 else 0.0


def _wire(
    name: str,
    engine: Engine,
    profile: LatencyProfile,
    workers: list[InferenceWorker],
    settings: Settings,
    executor: ThreadPoolExecutor,
    monitor: LoadMonitor,
) -> Served:
    """The policy, runner and scheduler of a loaded model, warmed up. With several inference
    workers the scheduler runs a batch on each at once (its lanes), from the model's one queue."""
    import torch

    keys = [s.key for s in engine.subnets]
    cores = monitor.cores  # the affinity's and the CPU quota's (1.5 under a quota of 1.5), not the host's
    # batches at once: one per inference worker (the policy's and the scheduler's)
    lanes = max(1, len(workers))
    scheduler: Scheduler | None = None  # (made below; the runner's warm-up runs before it)

    def max_threads() -> int | None:
        return None  # any count the profile measured

    if settings.adaptive_threads and not settings.device.startswith("cuda"):
        base = torch.get_num_threads()
        seen: list = [None, base]  # (reading, its cap): the policy asks many times per request

        def max_threads() -> int | None:
            reading = monitor.reading(name)  # a new object each sample
            if reading is not seen[0]:
                seen[:] = [reading, threads_for(reading, base, cores)]
            return seen[1]

    def predict(width: float, depth: float, batch: int, tokens: int) -> float:
        """The profile's latency on the thread count the runner will pick under today's load."""
        return profile.best(width, depth, batch, tokens, max_threads())[1]

    # On the CPU the forward pass runs a padded batch's real tokens alone (DynaBertModel's
    # ``unpad``, on under inference_mode), so a batch costs its rows' mean length, not its longest
    packed = torch.device(settings.device).type == "cpu"
    policy = Policy(
        engine.subnets,
        predict,
        kind=settings.policy,
        fixed=(settings.fixed_width, settings.fixed_depth) if settings.policy == "fixed" else None,
        load=functools.partial(monitor.reading, name),  # other models' inference is contention
        on_gpu=settings.device.startswith("cuda"),
        packed=packed,
        overhead_s=0.001,  # a first guess; learned from requests
        wait_s=settings.max_wait_ms / 1e3,
        ewma_alpha=settings.ewma_alpha,
        feedback_window=settings.feedback_window,
        meet_window=settings.meet_window,
        feedback_quantile=settings.feedback_quantile,
        capacity_quantile=settings.capacity_quantile,
        idle_decay_s=settings.ewma_idle_decay_s,
        max_utilisation=settings.max_utilisation,
        margin_s=settings.budget_margin_ms / 1e3,
        max_batch=settings.max_batch_size,
        rate_tau_s=settings.arrival_rate_tau_s,
        shed_late=settings.shed_late,
        price_delay=settings.price_delay,
        price_queue=settings.price_queue,
        slack_window=settings.slack_window,
        track_tau_s=settings.track_tau_s,
        # the event loop's measured CPU per request, which the worker process's forward passes
        # share the cores with (cpu_front: 0, and unused, when the forward pass runs in-process)
        cores=cores if workers and packed else 0,
        lanes=lanes,
    )

    def on_batch(key: tuple[float, float], batch: int, tokens: int, seconds: float) -> None:
        M.INFERENCE_DURATION.labels(name, M.fmt(key[0]), M.fmt(key[1])).observe(seconds)
        M.BATCH_SIZE.labels(name).observe(batch)
        policy.observe(key, batch, tokens, seconds)
        monitor.add_busy(seconds, name)

    warming = True  # the warm-up below runs through the runner; it is not counted
    started_with = torch.get_num_threads()

    def ran_on(n: int) -> Any:  # 0: torch's count left as it was
        return M.INFERENCE_THREADS.labels(name, str(n or started_with))

    for n in profile.thread_counts:
        ran_on(n)  # each series exists at 0 from the start: increase() sees the first
    for stage in ("queued", "running"):
        M.CLIENT_CLOSED.labels(name, stage)  # likewise
    for stage in ("admission", "queued", "running"):
        M.DEADLINE_EXCEEDED.labels(name, stage)

    def pick_threads(key: tuple[float, float], batch: int, tokens: int) -> int:
        """The intra-op thread count for this batch: the one its profile predicts fastest among
        those the load allows (0: leave torch's as it is, for a profile from FLOPs)."""
        n = profile.best(key[0], key[1], batch, tokens, max_threads())[0]
        if not warming:
            ran_on(n).inc()
        return n

    runner: Runner
    if not workers:

        def runner(key: tuple[float, float], rows: list) -> Ran:  # on the inference thread
            threads = pick_threads(key, min(len(rows), PIECE_ROWS), max(len(r.input_ids) for r in rows))
            if threads and threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            return Ran(engine.run(key, rows), time.perf_counter() - t0)

    else:
        idle = collections.deque(workers)  # the scheduler runs at most one batch per worker at once

        async def runner(key: tuple[float, float], rows: list) -> Ran:  # on the event loop
            worker = idle.popleft()
            try:
                return await run_on(worker, key, rows)
            finally:
                idle.append(worker)

        async def run_on(worker: InferenceWorker, key: tuple[float, float], rows: list) -> Ran:
            out: list = []
            seconds = 0.0
            for piece in pieces(rows):  # Engine.run's pieces, each a round trip to the worker
                ids, mask, types = engine.pack(piece)
                threads = pick_threads(key, *ids.shape)
                quiet = scheduler is not None and scheduler.quiet()
                poll = busy_poll_s(settings, threads, cores, monitor.reading(name), quiet)
                t0 = time.perf_counter()
                logits, s = await worker.run_async(key, ids, mask, types, threads=threads, poll_s=poll)
                if poll:  # the loop's polling is not front-end work (LoadMonitor.cpu_front)
                    monitor.add_polling(min(poll, time.perf_counter() - t0))
                out += engine.unpack(logits, piece)
                seconds += s  # the worker's own time, summed over the pieces of a long QA context
            return Ran(out, seconds)

    # the first forward of each shape allocates: do it before traffic, through the runner itself
    if engine.task.type == "qa":
        rows = engine.encode_qa(["warm up?"], ["warm up"], 0)[0].rows
    else:
        rows = engine.encode_texts(["warm up"]).rows
    if not workers:
        for key in keys:
            runner(key, rows)
    else:

        async def warm_up() -> None:
            for worker in workers:  # every worker, every sub-network
                for key in keys:
                    await run_on(worker, key, rows)
                worker.detach()  # this loop ends here; the server's loop makes its own link

        asyncio.run(warm_up())  # (this is the loading thread: an event loop of its own)
    warming = False

    scheduler = Scheduler(
        runner,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1e3,
        max_queue=settings.max_queue,
        predict=lambda key, b, t: policy.predict_s(key, b, t),
        on_batch=on_batch,
        executor=executor,
        packed=packed,
        lanes=lanes,
    )
    return Served(engine, policy, scheduler, profile, workers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    specs = settings.model_dirs()  # fail early on duplicate names

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        threads_before = torch.get_num_threads()
        # the affinity's and the CPU quota's, not the host's: capacity in cores (1.5 under a quota
        # of 1.5) for the load readings and the policy, rounded up for thread counts
        capacity = settings.cpu_cores or cpu_capacity()
        cores = usable_cores(capacity)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        elif cores < threads_before:
            # torch counts the host's cores; in a container with a CPU quota (docker --cpus, a
            # Kubernetes limit) that many threads, and as many instances, would only be throttled
            log.info("torch threads: %d, the cores this process may use (of %d)", cores, threads_before)
            torch.set_num_threads(cores)
        state: AppState = app.state.dynabert
        monitor = LoadMonitor(settings.cpu_sample_interval_s, settings.device, cores=capacity)
        monitor.start()
        state.monitor = monitor
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynabert-infer")

        async def refresh() -> None:
            while True:
                state.refresh_gauges()
                await asyncio.sleep(settings.cpu_sample_interval_s)

        async def watch_workers() -> None:
            """Replace a dead inference worker now, not when the next batch finds it: /readyz
            says 503 meanwhile, so a load balancer sends the traffic elsewhere."""
            while True:
                await asyncio.sleep(1.0)
                for name, served in state.models.items():
                    for worker in served.workers:
                        if worker.alive():
                            continue
                        log.error("inference worker of %r is gone; starting a new one", name)
                        try:
                            await asyncio.to_thread(worker.ensure_running)
                        except Exception:  # the next batch tries again (and fails its requests)
                            log.exception("could not restart the inference worker of %r", name)

        refresher: asyncio.Task | None = None
        watchdog: asyncio.Task | None = None
        try:
            for name, path in specs:
                # on the inference thread itself: calibration then measures (and warms up) that thread
                served = await asyncio.get_running_loop().run_in_executor(
                    executor, _load_model, name, path, settings, executor, monitor
                )
                served.later = served.scheduler.defer = state.later
                served.scheduler.start()
                state.models[name] = served
                M.QUEUE_CAPACITY.labels(name).set(settings.max_queue)
                M.MODEL_READY.labels(name).set(1)
            # Everything loaded so far (torch, transformers, the models: hundreds of thousands of
            # objects) lives as long as the server. Freezing it moves it out of the collector's
            # generations, so a full collection triggered by request garbage walks only request
            # objects: without this, such collections stalled the event loop for tens of ms.
            gc.collect()
            gc.freeze()
            state.ready = True
            refresher = asyncio.create_task(refresh(), name="dynabert-gauges")
            watchdog = asyncio.create_task(watch_workers(), name="dynabert-workers")
            yield
        finally:  # also when a model failed to load: leave no thread behind
            state.ready = False
            if watchdog is not None:  # first: it would take a worker closed below for a dead one
                watchdog.cancel()
            for name, served in state.models.items():
                await served.scheduler.close()
                M.MODEL_READY.labels(name).set(0)
                for worker in served.workers:  # (waits for a restart the watchdog had begun)
                    worker.close(final=True)
            if refresher is not None:
                refresher.cancel()
            state.later.flush()  # the last requests' records
            monitor.stop()
            executor.shutdown(wait=True)
            torch.set_num_threads(threads_before)
            gc.unfreeze()
            M.mark_process_dead(os.getpid())

    app = FastAPI(
        title="DynaBERT Serve",
        version="0.1.0",
        summary="One DynaBERT checkpoint, twelve width x depth sub-networks, one chosen per request "
        "from its latency budget (X-Latency-Budget-Ms), the queue and the machine's load.",
        lifespan=lifespan,
    )
    app.state.dynabert = AppState(settings)
    errors.install(app)
    from service.routes import direct, router

    app.include_router(router)
    app.add_middleware(
        Gate,
        settings=settings,
        later=app.state.dynabert.later,
        direct=direct if settings.direct_routes else None,
    )
    if settings.cors_origins:  # outside the gate, so that its answers (401, 413, 503 ...) carry CORS too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
            max_age=600,
        )
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:create_app_from_env`` (settings from DYNABERT_*)."""
    return create_app(Settings())
