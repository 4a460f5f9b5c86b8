"""HTTP routes: parse, call service.serving, set the response headers. No logic of their own."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from service import errors, serving
from service import metrics as M
from service.app import AppState, OptionsDep, StateDep, get_options
from service.errors import PROBLEM_JSON
from service.policy import Decision
from service.scheduler import JobTiming
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelsResponse,
    QARequest,
    QAResponse,
    SubnetInfo,
)
from service.serving import Outcome, RequestOptions, Served


class DuplicateKeyError(json.JSONDecodeError):
    """A JSON object names a key twice: which value the client meant is unknown (RFC 8259 leaves
    it to the parser, and most keep the last one silently), so the request is refused, as a
    single-valued header sent twice is."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # the parser's offset is unknown here: -1
            raise DuplicateKeyError(f"key {key!r} given twice", "", -1)
        out[key] = value
    return out


class StrictJSONRequest(Request):
    """A request whose JSON body may not repeat a key. The check rides on the one parse FastAPI
    makes (``object_pairs_hook``: one call per JSON object; a request body holds one)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_keys)
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose handlers read the body through :class:`StrictJSONRequest` (FastAPI's
    documented hook for a custom request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))

        return strict


router = APIRouter(route_class=StrictJSONRoute)

_problem = {"content": {PROBLEM_JSON: {}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "bad header (or a single-valued one sent twice), a pinned sub-network the model "
        "does not serve, or a body that is not UTF-8 text, or not valid data of its Content-Encoding",
        **_problem,
    },
    401: {"description": "API key missing or wrong (when DYNABERT_API_KEY is set)", **_problem},
    404: {"description": "unknown model", **_problem},
    408: {
        "description": "the body did not arrive within DYNABERT_BODY_TIMEOUT_S of the headers (the "
        "connection closes)",
        **_problem,
    },
    413: {
        "description": "too many inputs, body too large, also once inflated (or text too long, by setting)",
        **_problem,
    },
    415: {
        "description": "content type is not application/json, or a Content-Encoding other than gzip or "
        "deflate (see Accept-Encoding)",
        **_problem,
    },
    422: {"description": "invalid body; `errors[].field` names the field", **_problem},
    429: {"description": "queue full (by setting); see Retry-After", **_problem},
    503: {"description": "queue full or shutting down; see Retry-After", **_problem},
    504: {
        "description": "the request's timeout (X-Request-Timeout-Ms) passed before its answer, or the "
        "answer was predicted after it (the work queued ahead plus its own batch); `stage` says which",
        **_problem,
    },
}


def _header(name: str, description: str, example: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}, "example": example}  # fmt: skip


# read by service.app.get_options (and the gate, for the id), not by FastAPI's parameter
# injection: listed here so that /docs shows them
REQUEST_HEADERS = {
    "parameters": [
        _header("X-Latency-Budget-Ms", "latency budget in ms (default DYNABERT_DEFAULT_BUDGET_MS); the "
                "policy picks the most accurate sub-network predicted to answer within it", "50"),
        _header("X-Request-Timeout-Ms", "how long the client waits for the answer, in ms (default "
                "DYNABERT_REQUEST_TIMEOUT_MS, or Envoy's X-Envoy-Expected-Rq-Timeout-Ms); past it the "
                "request is answered 504 and its work dropped", "200"),
        _header("X-DynaBERT-Width", "pin the width multiplier (0.25, 0.5, 0.75, 1.0)", "0.5"),
        _header("X-DynaBERT-Depth", "pin the depth multiplier (0.5, 0.75, 1.0)", "1.0"),
        _header("X-Request-Id", "echoed in the response and the access log (generated when absent)", "req-42"),
    ]
}  # fmt: skip
SLA_HEADERS = {
    "X-DynaBERT-Width": {
        "description": "width of the sub-network that answered",
        "schema": {"type": "string"},
    },
    "X-DynaBERT-Depth": {
        "description": "depth of the sub-network that answered",
        "schema": {"type": "string"},
    },
    "X-Latency-Budget-Ms": {"description": "the request's budget", "schema": {"type": "string"}},
    "X-Latency-Budget-Met": {
        "description": "true/false: server time within the budget",
        "schema": {"type": "string"},
    },
    "Server-Timing": {
        "description": "tokenize (the texts into token rows), queue, infer (the batch as the server "
        "sees it), forward (the model's forward pass alone, in the inference worker) and total "
        "durations in ms",
        "schema": {"type": "string"},
    },
    "X-Request-Id": {"description": "the request's id (echoed or generated)", "schema": {"type": "string"}},
    "X-DynaBERT-Truncated": {
        "description": "inputs cut to the model's maximum length",
        "schema": {"type": "string"},
    },
}


def _headers(request: Request, served: Served, opts: RequestOptions, out: Outcome) -> dict[str, str]:
    """An answer's SLA headers, and the per-request record read by the gate's metrics and access log."""
    d, t = out.decision, out.timing
    total = time.perf_counter() - request.state.t0
    met = total <= opts.budget_s
    served.later(_account, served, d, opts.budget_s, total, t)  # once the answer is out
    h = {
        "X-DynaBERT-Width": M.fmt(d.width),
        "X-DynaBERT-Depth": M.fmt(d.depth),
        "X-Latency-Budget-Ms": f"{request.state.budget_ms:g}",
        "X-Latency-Budget-Met": "true" if met else "false",
        "Server-Timing": serving.server_timing(t.queue_s, t.infer_s, total, t.forward_s, out.tokenize_s),
    }
    if out.truncated:
        h["X-DynaBERT-Truncated"] = str(out.truncated)
    st = request.state
    st.width, st.depth, st.reason, st.met = d.width, d.depth, d.reason, met
    st.predicted_ms, st.contention = round(1e3 * d.predicted_s, 3), round(d.contention, 3)
    st.chosen_ms = round(1e3 * d.elapsed_s, 3)
    st.queue_ms, st.infer_ms, st.batch = round(1e3 * t.queue_s, 3), round(1e3 * t.infer_s, 3), t.batch_size
    st.forward_ms = round(1e3 * t.forward_s, 3) if t.forward_s is not None else None
    st.tokenize_ms = round(1e3 * out.tokenize_s, 3)
    return h


def _account(served: Served, d: Decision, budget_s: float, total: float, t: JobTiming) -> None:
    """An answered request's budget outcome in metrics, and its times fed back to the policy."""
    M.BUDGET.labels(served.name, "true" if total <= budget_s else "false").inc()
    served.policy.observe_overhead(total - t.queue_s - t.infer_s, d.elapsed_s)
    served.policy.observe_request(d, budget_s, total)


def _reply(
    request: Request,
    served: Served,
    opts: RequestOptions,
    out: Outcome,
    schema: type[ClassifyResponse] | type[QAResponse],
    *,
    exclude_none: bool = False,
) -> Response:
    """The answer: its headers (the server's total taken first), then the body, validated once
    here. Returning a Response skips FastAPI's second pass through response_model (validate and
    serialise again), which the OpenAPI schema still documents."""
    headers = _headers(request, served, opts, out)
    d = out.decision
    body = schema(model=served.name, width=d.width, depth=d.depth, results=out.outputs)
    return Response(
        body.model_dump_json(exclude_none=exclude_none), media_type="application/json", headers=headers
    )


async def answer_classify(
    body: ClassifyRequest, request: Request, state: AppState, opts: RequestOptions
) -> Response:
    """POST /v1/classify once its body and headers are read (by FastAPI or by :func:`direct`)."""
    served = state.get(body.model)
    request.state.model = served.name
    texts, pairs = body.texts()
    request.state.inputs = len(texts)
    out = await serving.classify(served, texts, pairs, opts, state.settings)
    return _reply(request, served, opts, out, ClassifyResponse, exclude_none=True)


async def answer_qa(body: QARequest, request: Request, state: AppState, opts: RequestOptions) -> Response:
    """POST /v1/qa once its body and headers are read (by FastAPI or by :func:`direct`)."""
    served = state.get(body.model, qa=True)
    request.state.model = served.name
    questions, contexts = body.pairs()
    request.state.inputs = len(questions)
    out = await serving.qa(served, questions, contexts, opts, state.settings)
    return _reply(request, served, opts, out, QAResponse)


# ---- the same two endpoints, straight from the gate --------------------------------------------


MISSING = object()  # an empty body (FastAPI: "Field required"), as opposed to JSON null


async def _read_json(request: StrictJSONRequest) -> Any:
    """The body parsed as FastAPI parses a JSON body parameter, failing with the exception its would
    (so the same handler gives the same problem document); ``MISSING`` for an empty body."""
    if not await request.body():
        return MISSING
    try:
        return await request.json()
    except json.JSONDecodeError as e:  # a duplicate key too (DuplicateKeyError)
        error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {},
                 "ctx": {"error": e.msg}}  # fmt: skip
        raise RequestValidationError([error], body=e.doc) from e
    except Exception as e:  # not text in JSON's encodings, or nested too deeply
        raise StarletteHTTPException(400, "There was an error parsing the body") from e


def _validate(model: type[BaseModel], data: Any) -> Any:
    """``data`` as ``model``, or FastAPI's RequestValidationError (error locations under ``body``)."""
    if data is MISSING:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        return model.model_validate(data, from_attributes=True)  # as FastAPI validates a body
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors, body=data) from None


Answer = Callable[[Any, Request, AppState, RequestOptions], Awaitable[Response]]
DIRECT: dict[str, tuple[type[BaseModel], Answer]] = {
    "/v1/classify": (ClassifyRequest, answer_classify),
    "/v1/qa": (QARequest, answer_qa),
}


async def direct(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/classify or /v1/qa, called by the gate once it has admitted the request and read
    its body. The steps of the routes below in their order (the body parsed, the headers read, the
    body validated, then the same ``answer_*``), and every failure answered by the app's own
    exception handlers, without FastAPI's per-request machinery: its middleware tower, routing,
    dependency solving and a second Request object. That machinery was about a sixth of the event
    loop's busy time under load (py-spy, docs/RESULTS.md). The routes stay for the OpenAPI schema
    and for ``DYNABERT_DIRECT_ROUTES=false``; tests/service/test_service_direct.py holds the two
    paths to the same answers."""
    model, answer = DIRECT[scope["path"]]
    request = StrictJSONRequest(scope, receive)
    try:
        data = await _read_json(request)
        state: AppState = request.app.state.dynabert
        opts = await get_options(request, state)
        response = await answer(_validate(model, data), request, state, opts)
    except Exception as exc:
        response = await errors.respond(request, exc)
    await response(scope, receive, send)


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses={**ERRORS, 200: {"headers": SLA_HEADERS}},
    openapi_extra=REQUEST_HEADERS,
    summary="Classify one text, a list of texts, or text pairs",
    tags=["inference"],
)
async def classify(
    body: ClassifyRequest, request: Request, state: StateDep, opts: OptionsDep
) -> ClassifyResponse:
    return await answer_classify(body, request, state, opts)  # type: ignore[return-value]


@router.post(
    "/v1/qa",
    response_model=QAResponse,
    responses={**ERRORS, 200: {"headers": SLA_HEADERS}},
    openapi_extra=REQUEST_HEADERS,
    summary="Extractive question answering over one or more contexts",
    tags=["inference"],
)
async def qa(body: QARequest, request: Request, state: StateDep, opts: OptionsDep) -> QAResponse:
    return await answer_qa(body, request, state, opts)  # type: ignore[return-value]


@router.get(
    "/v1/models", response_model=ModelsResponse, tags=["models"], summary="Served models and sub-networks"
)
async def models(state: StateDep) -> ModelsResponse:
    out = []
    for name, s in state.models.items():
        eng = s.engine
        subs = [
            SubnetInfo(
                width=n.width,
                depth=n.depth,
                params=n.params,
                flops=n.flops,
                metric=n.metric,
                latency_ms=round(1e3 * s.profile.predict(n.width, n.depth, 1, 128), 3),
                latency_ms_batch8=round(1e3 * s.profile.predict(n.width, n.depth, 8, 128), 3),
                pareto=n.key in s.policy.front,
            )
            for n in eng.subnets
        ]
        out.append(
            ModelInfo(
                name=name,
                default=state.get(None, qa=eng.task.type == "qa") is s,
                task=eng.task.type,
                task_name=eng.task.name,
                labels=list(eng.task.labels),
                text_fields=list(eng.task.text_fields),
                metric_name=eng.metric_name,
                max_seq_length=eng.max_length,
                profile=s.profile.source,
                subnetworks=subs,
            )
        )
    return ModelsResponse(models=out)


# HEAD too (not in the schema): load balancers and uptime checkers that probe with HEAD get the
# status without a body
@router.get("/healthz", tags=["ops"], summary="Alive")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", tags=["ops"], summary="Loaded and calibrated", responses={503: {"description": "not ready"}}
)
@router.head("/readyz", include_in_schema=False)
async def readyz(state: StateDep) -> JSONResponse:
    down = [n for n, s in state.models.items() if not all(w.alive() for w in s.workers)]
    ready = state.ready and not down
    body: dict = {"ready": ready, "models": {n: s.profile.source for n, s in state.models.items()}}
    if down:
        body["workers_restarting"] = down  # an inference worker died; the server is replacing it
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> Response:
    state.later.flush()  # every request answered so far is counted (service/later.py)
    state.refresh_gauges()
    body, ctype = M.exposition()
    # Prometheus asks for gzip, and the gate gzips the page (a histogram per sub-network; about
    # tenfold smaller) as it does every large answer
    return Response(body, media_type=ctype)
