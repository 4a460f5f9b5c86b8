"""A lean HTTP/1.1 transport for the load generator's ``httpx.AsyncClient``.

The benchmark shares the machine's cores with the server it measures, so every millisecond of
CPU the *client* spends per request is taken from the server and shows up as server latency.
httpx's default transport (httpcore) does work proportional to its open connections on every
request: measured here at ~2 ms of client CPU per request with 200 in flight even when spread over
32 clients. This transport keeps httpx's API (requests, responses, timeouts, errors) and replaces
only the wire: a stack of idle keep-alive connections per origin, the request written in one
``write`` and the response read with ``readuntil``/``readexactly``. It speaks just what a JSON API
over loopback needs: plain ``http``, Content-Length or chunked bodies, keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
MAX_HEADER_BYTES = 64 * 1024


def parse_head(raw: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """An HTTP/1.1 response head (status line and header lines, with or without the blank line
    that ends it) -> (version, status, [(name, value)] with surrounding whitespace stripped)."""
    lines = raw.rstrip(b"\r\n").split(b"\r\n")
    version, status, *_ = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip(), v.strip()))
    return version, int(status), headers


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_idle_per_origin: int = 1024) -> None:
        self.max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._all: set[asyncio.StreamWriter] = set()

    async def _connect(self, origin: tuple[str, int]) -> _Conn:
        idle = self._idle.get(origin)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            self._drop(writer)
        try:
            reader, writer = await asyncio.open_connection(*origin, limit=MAX_HEADER_BYTES)
        except OSError as e:
            raise httpx.ConnectError(f"{origin[0]}:{origin[1]}: {e}") from e
        self._all.add(writer)
        return reader, writer

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._all.discard(writer)
        writer.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http, not {url.scheme!r}")
        origin = (url.host, url.port or 80)
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1".encode()]
        head += [k + b": " + v for k, v in request.headers.raw]
        if body and "content-length" not in request.headers:
            head.append(b"Content-Length: " + str(len(body)).encode())
        payload = b"\r\n".join(head) + b"\r\n\r\n" + body
        timeout = (request.extensions.get("timeout") or {}).get("read")
        reader, writer = await self._connect(origin)
        try:
            async with asyncio.timeout(timeout):
                writer.write(payload)
                status, headers, content, keep = await self._read_response(reader, request.method)
        except TimeoutError as e:
            self._drop(writer)
            raise httpx.ReadTimeout(f"{origin[0]}:{origin[1]}: no answer within {timeout} s") from e
        except asyncio.CancelledError:  # cancelled mid-request: the connection is unusable
            self._drop(writer)
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self._drop(writer)
            raise httpx.ReadError(f"{origin[0]}:{origin[1]}: {e!r}") from e
        if keep and len(self._idle.setdefault(origin, [])) < self.max_idle:
            self._idle[origin].append((reader, writer))
        else:
            self._drop(writer)
        return httpx.Response(status, headers=headers, content=content, request=request)

    @staticmethod
    async def _read_response(
        reader: asyncio.StreamReader, method: str
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        version, status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        length, chunked, keep = None, False, version == b"HTTP/1.1"
        for k, v in headers:
            lk = k.lower()
            if lk == b"content-length":
                length = int(v)
            elif lk == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
            elif lk == b"connection":
                keep = v.lower() == b"keep-alive" or (keep and v.lower() != b"close")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", keep
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            return status, headers, b"".join(parts), keep
        if length is None:  # body until the server closes
            return status, headers, await reader.read(), False
        return status, headers, await reader.readexactly(length), keep

    async def aclose(self) -> None:
        writers = list(self._all)
        for writer in writers:
            self._drop(writer)
        for writer in writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._idle.clear()


class BlockingClient:
    """One keep-alive HTTP/1.1 connection over a plain blocking socket, for sequential requests.

    The low-load overhead measurement asks what the *server* adds to a request; with httpx on
    asyncio the client's own request building, parsing and event-loop hops (about 1 ms per request
    on this machine's cores) land in the end-to-end time too. This client does next to nothing
    per request: one ``sendall`` of prebuilt bytes, then the head and a Content-Length body read
    off the socket (chunked bodies are not spoken: a JSON API answers with Content-Length).
    ``received_at`` is when the last answer's final bytes came off the socket (``time.perf_counter``),
    before the client parsed them: with :meth:`prepare` and :meth:`send`, a request can be timed
    from its first byte sent to its answer's last byte received, as wrk times one, without the
    client's own Python on either side."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.received_at = 0.0

    def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body)."""
        self.send(self.prepare(method, path, body, headers))
        return self.answer()

    @staticmethod
    def prepare(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """A request's bytes, to send once or many times."""
        head = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def answer(self) -> tuple[int, dict, bytes]:
        """The next answer on the connection: (status, headers with lower-case names, body). Also
        for requests written to ``sock`` directly (the tests' raw and pipelined ones)."""
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        raw, self._buf = self._buf.split(b"\r\n\r\n", 1)
        _, status, pairs = parse_head(raw)
        fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in pairs}
        if "chunked" in fields.get("transfer-encoding", ""):
            raise ValueError("BlockingClient reads Content-Length bodies only")
        n = int(fields.get("content-length", "0"))
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return status, fields, out

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        self.received_at = time.perf_counter()
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
