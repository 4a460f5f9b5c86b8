"""One error shape for every failure: RFC 9457 ``application/problem+json``
(type, title, status, detail) plus the request id, with 4xx for every client mistake. A request
whose client hung up before its answer ends with a bare 499 that only the metrics and the access
log see; one whose timeout passed (or would have) before its answer, with a 504."""

from __future__ import annotations

import inspect
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.scheduler import ClientClosed, DeadlineExceeded, Withdrawn

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:dynabert:problem:"  # the kinds are listed in docs/API.md
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request"; no reason phrase in the standard


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document. ``decision``: the policy's
    choice when it is the policy that turned the request away (a shed request), for the access log."""

    def __init__(
        self, status: int, detail: str, *, type_: str | None = None, headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None, decision: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers or {}, extra or {}
        self.type = type_ or HTTPStatus(status).phrase.lower().replace(" ", "-")
        self.decision = decision


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or request.headers.get("x-request-id", "")


def problem_response(
    request: Request, status: int, detail: str, *, type_: str | None = None,
    headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
) -> JSONResponse:  # fmt: skip
    rid = request_id_of(request)
    body: dict[str, Any] = {
        "type": TYPE_BASE + (type_ or HTTPStatus(status).phrase.lower().replace(" ", "-")),
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": rid,
        **(extra or {}),
    }
    h = {"X-Request-Id": rid, **(headers or {})}
    return JSONResponse(body, status_code=status, headers=h, media_type=PROBLEM_JSON)


async def respond(request: Request, exc: Exception) -> Response:
    """The answer the app's exception handlers give ``exc``, looked up along its class's MRO as
    Starlette's ExceptionMiddleware does: for a request served outside FastAPI's routing
    (service/routes.py's ``direct``), which fails with the same exceptions."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            response = handler(request, exc)
            return await response if inspect.isawaitable(response) else response
    raise exc


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def _loc(loc: tuple[Any, ...]) -> str:
    """A field path for people: text[2], not body.text.list[str].2 (union branch tags dropped)."""
    parts = [
        str(p)
        for p in loc
        if p != "body"
        and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or p.startswith("function")))
    ]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _methods_of(request: Request) -> list[str]:
    """Every method some route answers on the request's path (asked of the routes themselves:
    FastAPI keeps an included router's routes inside it)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _unparsable(cause: BaseException) -> str | None:
    """Why FastAPI could not parse a body, which its own 400 does not say: bytes that are not text
    of the encoding JSON's rules detect (UTF-8 unless a byte order mark or NULs say UTF-16/32), or
    nesting past the parser's recursion limit."""
    if isinstance(cause, UnicodeDecodeError):
        at = cause.start
        near = bytes(cause.object[max(0, at - 8) : at + 8])
        return (
            f"body is not {cause.encoding.upper()} text: {cause.reason} at byte {at} (near {near!r}); "
            "send JSON as UTF-8 (RFC 8259)"
        )
    if isinstance(cause, RecursionError):
        return "body is JSON nested too deeply to parse"
    return None


def _note_routing(request: Request, exc: Withdrawn | ProblemError) -> None:
    """For the access log: where a request that left before its answer had been routed, or what
    the policy predicted for one it shed (reason ``shed``)."""
    d = exc.decision
    if d is not None:
        st = request.state
        st.width, st.depth, st.reason = d.width, d.depth, d.reason
        st.predicted_ms, st.chosen_ms = round(1e3 * d.predicted_s, 3), round(1e3 * d.elapsed_s, 3)
        st.contention = round(d.contention, 3)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into a problem document."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        _note_routing(request, exc)
        return problem_response(
            request, exc.status, exc.detail, type_=exc.type, headers=exc.headers, extra=exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors, seen = [], set()
        for e in exc.errors():
            if e.get("type") == "json_invalid":  # FastAPI's loc is (body, offset), its msg generic
                loc = e.get("loc", ())
                at = loc[-1] if loc else -1
                why = (e.get("ctx") or {}).get("error", "not JSON")
                where = f" (at character {at})" if isinstance(at, int) and at >= 0 else ""
                e = {**e, "loc": ("body",), "msg": f"invalid JSON: {why}{where}"}
            field = _loc(tuple(e.get("loc", ())))
            if field not in seen:  # a union reports each branch; one line per field is enough
                seen.add(field)
                errors.append({"field": field, "message": e.get("msg", ""), "type": e.get("type", "")})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "invalid request"
        return problem_response(request, 422, detail, type_="invalid-request", extra={"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI: "an error parsing the body"
            detail = _unparsable(exc.__cause__) or detail
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and detail == "Method Not Allowed":
            # Starlette's Allow names the methods of the first route of the path; a path served by
            # two routes (GET and HEAD /healthz) has more
            allow = ", ".join(_methods_of(request))
            headers["Allow"] = allow
            detail = f"{request.method} {request.url.path}: this route answers {allow}"
        return problem_response(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(ClientClosed)
    async def _closed(request: Request, exc: ClientClosed) -> Response:
        # nobody reads this answer; its status is for the gate's metrics and access log (499,
        # "client closed request", as nginx logs it), which also says where it had been routed
        _note_routing(request, exc)
        return Response(status_code=CLIENT_CLOSED_STATUS)

    @app.exception_handler(DeadlineExceeded)
    async def _expired(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        _note_routing(request, exc)
        st = request.state
        timeout_ms = getattr(st, "timeout_ms", None)
        extra: dict[str, Any] = {"stage": exc.stage, "timeout_ms": timeout_ms}
        if exc.decision is not None:
            extra["width"], extra["depth"] = exc.decision.width, exc.decision.depth
        if exc.start_s is not None and exc.finish_s is not None:
            extra["predicted_start_ms"] = round(1e3 * exc.start_s, 3)
            extra["predicted_finish_ms"] = round(1e3 * exc.finish_s, 3)
        model = getattr(st, "model", "")
        return problem_response(
            request,
            504,
            f"model {model!r}: {exc} (timeout {timeout_ms:g} ms)" if timeout_ms else str(exc),
            type_="deadline-exceeded",
            extra=extra,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # a bug on our side
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return problem_response(
            request, 500, f"internal error ({type(exc).__name__})", type_="internal-error"
        )
