"""uvicorn's HTTP protocol with the deadline uvicorn lacks: on a request's headers.

uvicorn closes a kept-alive connection that stays idle between requests, but sets no limit on a
connection that never sends anything, nor on one that sends part of a request's headers and then
stalls ("slowloris"). Each holds a socket and a file descriptor for as long as its client likes.
Here a connection must deliver a request's line and headers within ``header_timeout_s`` of
opening, or of that request's first byte when it follows another one on the same connection.
Past it the connection is closed, with a 408 when a request had begun (nginx's
``client_header_timeout`` and Go's ``ReadHeaderTimeout`` do the same). The body has its own
deadline, in the ASGI gate (service/app.py), where a too-slow body gets a problem document.

It wraps the protocol uvicorn would pick ("auto": httptools when installed, else h11).
It relies on three things both of uvicorn's protocols keep: ``self.cycle`` (a new one per request,
made when its headers are complete; ``response_complete`` once answered), ``self.transport`` and
``self.loop``; the tests in tests/service/test_service_http.py check the behaviour end to end.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service import metrics as M

try:  # uvicorn's "auto" choice: httptools when it is installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _timeout_response(seconds: float) -> bytes:
    rid = uuid.uuid4().hex
    body = json.dumps(
        {
            "type": "urn:dynabert:problem:header-timeout",
            "title": "Request Timeout",
            "status": 408,
            "detail": f"the request's headers did not arrive within {seconds:g} s (DYNABERT_HEADER_TIMEOUT_S)",
            "request_id": rid,
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {rid}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderDeadline:
    """Mixin over a uvicorn HTTP protocol class: the deadline on a request's headers."""

    header_timeout_s: float

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._began = False  # a byte of the awaited request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[attr-defined]
            self._disarm()  # a request's headers are complete
        elif cycle is None or cycle.response_complete:  # between requests: these bytes begin one
            self._began = True
            if self._header_timer is None:
                self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._began = False

    def _too_slow(self) -> None:
        self._header_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        M.SLOW_CLIENTS.labels("headers" if self._began else "idle").inc()
        if self._began:
            transport.write(_timeout_response(self.header_timeout_s))
        transport.close()


class H11WithDeadline(HeaderDeadline, H11Protocol):
    pass


if HttpToolsProtocol is not None:

    class HttpToolsWithDeadline(HeaderDeadline, HttpToolsProtocol):
        pass


def protocol_class(header_timeout_s: float) -> Any:
    """What to give ``uvicorn.Config(http=...)``: the protocol uvicorn's "auto" would pick, with the
    deadline. A ``functools.partial`` of a module-level class, so it pickles into the worker
    processes of ``dynabert serve --workers N``."""
    base = HttpToolsWithDeadline if HttpToolsProtocol is not None else H11WithDeadline
    return functools.partial(base, header_timeout_s=header_timeout_s)
