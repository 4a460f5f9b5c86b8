"""uvicorn's HTTP protocol with the limits uvicorn lacks on a request's headers: time and size.

uvicorn closes a kept-alive connection that stays idle between requests, but sets no limit on a
connection that never sends anything, nor on one that sends part of a request's headers and then
stalls ("slowloris"): each holds a socket for as long as its client likes. Nor, with httptools
(its default parser), on the size of a request's line and headers: 200 MB of headers were read
into memory in 0.4 s and answered 200 (docs/RESULTS.md), so a few clients could exhaust a pod's
memory. Here:

- a request's line and headers must arrive within ``header_timeout_s`` of the connection opening,
  or of the request's first byte when it follows another one on the same connection; past it the
  connection closes, with a 408 when a request had begun (nginx's ``client_header_timeout``, Go's
  ``ReadHeaderTimeout``);
- they may take at most ``max_header_bytes``; past it a 431 and the connection closes (Envoy's
  ``max_request_headers_kb``, 60 KiB by default; Go's ``MaxHeaderBytes``, 1 MB);
- bytes the parser refuses get the API's problem document (400 ``bad-http``), not uvicorn's plain
  text, and one answer: refused and past the limit in one read once got a second one written after
  the first's end of stream, which killed the transport (a flaky CI run).

h11 has a limit of its own (16 KiB by default) that answered 400 first, also to heads under ours;
it is raised above ours (``H11_SLACK_BYTES``).

It also stamps when a request's first byte was read (``scope["state"]["received"]``,
``time.perf_counter``), where the ASGI gate starts the request's clock: its budget, its
Server-Timing ``total``. Under load a parsed request waits for the event loop before the
application sees it; started there instead, the clock missed that wait, and the policy spent
budget it did not know was gone. (Most of what stays outside the clock is the client's and the
loopback's: end to end minus the server's total was p99 6-8 ms for the benchmark's asyncio
client at every load, docs/RESULTS.md.)

The body has its own deadline and limit, in the ASGI gate (service/app.py).

It wraps the protocol uvicorn would pick ("auto": httptools when installed, else h11) and relies
on what both keep: ``self.cycle`` (a new one per request, made when its headers are complete;
``more_body`` false once its body is in, ``response_complete`` once answered), ``self.transport``
and ``self.loop``. tests/service/test_service_http.py checks the behaviour end to end.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import metrics as M
from service.errors import PROBLEM_JSON, TYPE_BASE

try:  # uvicorn's "auto" choice: httptools when it is installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _problem_response(status: int, kind: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer in the API's problem shape (errors.problem_response's fields),
    written before any request exists."""
    rid, phrase = uuid.uuid4().hex, HTTPStatus(status).phrase
    body = json.dumps(
        {"type": TYPE_BASE + kind, "title": phrase, "status": status, "detail": detail, "request_id": rid}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"content-type: {PROBLEM_JSON}\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {rid}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


LINGER_S = 2.0


class HeaderLimits:
    """Mixin over a uvicorn HTTP protocol class: the deadline and the size limit on a request's
    line and headers."""

    def __init__(self, *args: Any, header_timeout_s: float, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.max_header_bytes = header_timeout_s, max_header_bytes
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the awaited request's line and headers so far
        self._lingering = False  # answered with an error and closing: what comes in is dropped
        self._received = 0.0  # perf_counter when the awaited request's first byte was read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        cycle = self.cycle  # type: ignore[attr-defined]
        # no request, or the current one's body is complete: these bytes begin the next request
        heading = cycle is None or not cycle.more_body
        if heading and not self._head_bytes:
            self._received = time.perf_counter()
        super().data_received(data)  # type: ignore[misc]
        if self._lingering:  # the parser refused these bytes and has been answered (400)
            return
        if self.cycle is not cycle:  # type: ignore[attr-defined]
            # a request's headers are complete: its clock starts at its first byte (with requests
            # pipelined in one read, the last one's; the others start theirs at the gate)
            self.cycle.scope.setdefault("state", {})["received"] = self._received  # type: ignore[attr-defined]
            self._disarm()
        elif heading and not self.transport.is_closing():  # type: ignore[attr-defined]
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._close(
                    431, "headers-too-large",
                    f"the request's line and headers pass {self.max_header_bytes} bytes "
                    "(DYNABERT_MAX_HEADER_BYTES)", "header_too_large",
                )  # fmt: skip
            elif self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # between requests (uvicorn's keep-alive timer stopped at this byte)

    def send_400_response(self, msg: str) -> None:
        """The parser refused the bytes (uvicorn's answer is plain text): the API's problem shape."""
        self._close(
            400, "bad-http",
            "not a valid HTTP/1.1 request (for instance both Content-Length and Transfer-Encoding, two "
            "Content-Lengths, or an unknown method)", "bad_http",
        )  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._head_bytes = 0

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self._head_bytes:  # nothing sent: just close, as uvicorn does an idle kept-alive one
            if not self.transport.is_closing():  # type: ignore[attr-defined]
                M.CONNECTIONS_CLOSED.labels("idle").inc()
                self.transport.close()  # type: ignore[attr-defined]
            return
        self._close(
            408, "header-timeout",
            f"the request's headers did not arrive within {self.header_timeout_s:g} s "
            "(DYNABERT_HEADER_TIMEOUT_S)", "header_timeout",
        )  # fmt: skip

    def _close(self, status: int, kind: str, detail: str, reason: str) -> None:
        """Answer ``status`` and close; only close when an earlier request on this connection is
        still being answered (its answer must come first, and this client pipelines abuse)."""
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing() or self._lingering:  # answered already: one answer per connection
            return
        self._disarm()
        M.CONNECTIONS_CLOSED.labels(reason).inc()
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is not None and not cycle.response_complete:
            transport.close()
            return
        # A lingering close (RFC 9112 section 9.6): a client still sending its headers would get a
        # reset, not this answer, were the socket closed with unread data in it. So: answer, end
        # our side, drop whatever else comes, and close after LINGER_S or when the client does.
        transport.write(_problem_response(status, kind, detail))
        self._lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)  # type: ignore[attr-defined]


# More than one read brings (uvloop reads at most 250 KB at a time, asyncio 256 KiB): h11's own
# limit on an unparsed head stays above ours, so ours, checked after each read, answers first.
H11_SLACK_BYTES = 1 << 20


class H11WithLimits(HeaderLimits, H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # h11 refuses a head past its max_incomplete_event_size (16 KiB unless uvicorn's config sets
        # it) with a 400: a 20,000-byte head at a 20,000-byte limit was refused, and one past the limit
        # that came in one read got 400, not 431. Ours decides; h11's stays as a backstop.
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.max_header_bytes + H11_SLACK_BYTES
        )


if HttpToolsProtocol is not None:

    class HttpToolsWithLimits(HeaderLimits, HttpToolsProtocol):
        pass


def protocol_class(header_timeout_s: float, max_header_bytes: int, parser: str = "auto") -> Any:
    """What to give ``uvicorn.Config(http=...)``: the protocol uvicorn's ``parser`` ("auto":
    httptools when installed, else h11) with the limits. A ``functools.partial`` of a module-level
    class, so it pickles into the worker processes of ``dynabert serve --workers N``."""
    if parser == "auto":
        parser = "httptools" if HttpToolsProtocol is not None else "h11"
    base = HttpToolsWithLimits if parser == "httptools" else H11WithLimits
    return functools.partial(base, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes)
