"""The load generator's lean httpx transport, against a real asyncio HTTP server on loopback that
answers with hand-written bytes (so each framing case is exercised exactly)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bench.transport import LeanTransport


class Origin:
    """A loopback server: records each request (connection number, head, body) and answers
    with ``respond(head, body) -> bytes``."""

    def __init__(self, respond) -> None:
        self.respond, self.requests, self.connections = respond, [], 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append((conn, head, body))
                answer = self.respond(head, body)
                if answer is None:  # hang: never answer
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body,
    )  # fmt: skip


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=LeanTransport(), timeout=5.0, trust_env=False)


def test_keep_alive_reuses_one_connection_and_bodies_arrive_intact():
    async def main():
        async with Origin(lambda head, body: ok(body, b"X-Echo: yes\r\n")) as o, client() as c:
            rs = []
            for i in range(3):
                rs.append(
                    await c.post(o.url + "/v1/classify?x=1", json={"text": f"n{i}"}, headers={"X-A": "b"})
                )
            return o, rs

    o, rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert [r.json() for r in rs] == [{"text": "n0"}, {"text": "n1"}, {"text": "n2"}]
    assert rs[0].headers["x-echo"] == "yes" and rs[0].headers["content-type"] == "application/json"
    assert o.connections == 1 and [conn for conn, _, _ in o.requests] == [1, 1, 1]
    head = o.requests[0][1].decode()
    assert head.startswith("POST /v1/classify?x=1 HTTP/1.1\r\n") and "X-A: b" in head
    assert json.loads(o.requests[2][2]) == {"text": "n2"}


def test_concurrent_requests_open_their_own_connections():
    async def main():
        async with Origin(lambda head, body: ok(b"{}")) as o, client() as c:
            rs = await asyncio.gather(*(c.get(o.url + "/healthz") for _ in range(5)))
            return o, rs

    o, rs = asyncio.run(main())
    assert all(r.status_code == 200 for r in rs) and len(o.requests) == 5


def test_chunked_bodies_and_connection_close():
    chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunked += b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n"

    async def main():
        async with Origin(lambda head, body: chunked) as o, client() as c:
            a = await c.get(o.url + "/")
            b = await c.get(o.url + "/")
            return o, a, b

    o, a, b = asyncio.run(main())
    assert a.status_code == 503 and a.content == b"hello, world" and b.content == b"hello, world"
    assert o.connections == 2  # the server closed the first connection: the second is new


def test_timeouts_and_refused_connections_raise_httpx_errors():
    async def main():
        async with Origin(lambda head, body: None) as o:
            async with httpx.AsyncClient(transport=LeanTransport(), timeout=0.2, trust_env=False) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await c.get(o.url + "/")
            url = o.url
        o.server.close()
        await o.server.wait_closed()
        async with client() as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(url + "/")
            with pytest.raises(httpx.UnsupportedProtocol):
                await c.get("https://127.0.0.1:1/")

    asyncio.run(main())


def test_blocking_client_reads_content_length_answers_on_one_connection():
    import threading

    from bench.transport import BlockingClient

    def respond(head, body):
        payload = json.dumps({"echo": body.decode(), "path": head.split(b" ")[1].decode()}).encode()
        return (
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Thing:  v \r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )

    origin = Origin(respond)
    ready, port, stop = threading.Event(), [], []

    def serve() -> None:
        async def main() -> None:
            server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            while not stop:
                await asyncio.sleep(0.01)
            server.close()

        asyncio.run(main())

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert ready.wait(10)
        with BlockingClient("127.0.0.1", port[0]) as c:
            for i in range(3):
                status, fields, body = c.request("POST", f"/p{i}", f"b{i}".encode(), {"X-A": "1"})
                assert status == 201 and fields["x-thing"] == "v"
                assert json.loads(body) == {"echo": f"b{i}", "path": f"/p{i}"}
            # a request built once and sent as bytes; the answer's arrival is stamped before parsing
            raw = BlockingClient.prepare("POST", "/p3", b"b3", {"X-A": "1"})
            sent = time.perf_counter()
            c.send(raw)
            status, _, body = c.answer()
            parsed = time.perf_counter()
            assert status == 201 and json.loads(body) == {"echo": "b3", "path": "/p3"}
            assert sent < c.received_at <= parsed
        assert origin.connections == 1 and len(origin.requests) == 4  # keep-alive: one connection
        assert b"X-A: 1" in origin.requests[0][1] and b"Content-Length: 2" in origin.requests[0][1]
    finally:
        stop.append(True)
        t.join(10)
