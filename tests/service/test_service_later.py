"""service/later.py: a request's bookkeeping runs once its answer is out, not in the step that
wrote it (so a client on the same host gets the core), and nothing is lost on the way."""

from __future__ import annotations

import asyncio
import logging

from service import metrics as M
from service.app import Gate
from service.later import Later
from service.settings import Settings


def test_calls_wait_for_the_timer_then_run_in_order():
    async def main() -> None:
        later, ran = Later(0.005), []
        later(ran.append, 1)
        later(ran.append, 2)
        assert ran == [] and later.pending == 2
        await asyncio.sleep(0)  # the loop's next step: still waiting
        assert ran == []
        await asyncio.sleep(0.05)
        assert ran == [1, 2] and later.pending == 0
        later(ran.append, 3)  # the next call starts a new timer
        assert ran == [1, 2]
        await asyncio.sleep(0.05)
        assert ran == [1, 2, 3]

    asyncio.run(main())


def test_flush_runs_everything_now_including_what_the_calls_defer():
    async def main() -> None:
        later, ran = Later(10.0), []
        later(ran.append, "a")
        later(lambda: later(ran.append, "deferred by a deferred call"))
        later.flush()
        assert ran == ["a", "deferred by a deferred call"] and later.pending == 0
        await asyncio.sleep(0.01)
        assert ran == ["a", "deferred by a deferred call"]  # nothing runs twice

    asyncio.run(main())


def test_a_failing_call_is_logged_and_the_rest_still_run(caplog):
    def broken() -> None:
        raise RuntimeError("a bug in a metric")

    later, ran = Later(10.0), []

    async def main() -> None:
        later(broken)
        later(ran.append, "after")
        later.flush()

    with caplog.at_level(logging.ERROR, logger="service.later"):
        asyncio.run(main())
    assert ran == ["after"] and "a bug in a metric" in caplog.text


def test_no_delay_or_no_loop_runs_at_once():
    ran: list[int] = []
    Later(0)(ran.append, 1)
    Later()(ran.append, 2)  # a synchronous caller: no loop to wait on
    assert ran == [1, 2]


def test_the_gate_counts_a_request_after_its_answer_has_gone_out():
    counter = M.REQUESTS.labels("unknown", "classify", "200")

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def main() -> None:
        gate = Gate(app, Settings(), later=Later(0.01))
        seen: list[float] = []

        async def send(message) -> None:
            if message["type"] == "http.response.body":
                seen.append(counter._value.get())

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "path": "/v1/classify", "headers": [], "query_string": b""}
        before = counter._value.get()
        await gate(scope, receive, send)
        assert seen == [before] and counter._value.get() == before  # answered, not counted yet
        await asyncio.sleep(0.05)
        assert counter._value.get() == before + 1

    asyncio.run(main())
