"""Bookkeeping after the answer, once the event loop has let go of the CPU.

What a request leaves to do once its answer is written (its Prometheus series, its access-log
line, the policy's latency feedback from its batch) used to run in the same event-loop step as the
write, or in the next one. Nobody waits for it, but a client on the same host did: a loopback (or
Unix-socket) write wakes the reader with a *sync* wake-up, and Linux then tends to place the reader
on the writer's own core, expecting the writer to sleep soon. The server did not sleep; it went on
with its bookkeeping, and the client waited for it while the other core was idle. Measured on the
two-core VM (perf_counter stamps in the server and the client, docs/RESULTS.md "2026-12-02"): the
client read its answer 0.55-0.65 ms after the server wrote it; with the client pinned to the other
core, 0.13 ms. A sidecar proxy (Envoy, nginx) in the same pod is such a client.

:class:`Later` queues those calls and runs them together from a timer ``delay_s`` later (1 ms), so
the loop goes to sleep right after the answer when it has nothing else to do. Under load the loop
never sleeps and nothing is gained, but nothing is lost either: the calls run in one batch a
millisecond late. Readers that must see every finished request (``/metrics``, shutdown) call
:meth:`flush` first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

AFTER_ANSWER_S = 0.001  # libuv's timers count whole milliseconds: less would be due at once


class Later:
    """Calls deferred until ``delay_s`` after the first of them (0: run at once)."""

    def __init__(self, delay_s: float = AFTER_ANSWER_S) -> None:
        self.delay_s = delay_s
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.delay_s <= 0:
            _run(fn, args)
            return
        self._calls.append((fn, args))
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): nothing to wait for
                self.flush()
                return
            self._timer = loop.call_later(self.delay_s, self.flush)

    @property
    def pending(self) -> int:
        return len(self._calls)

    def flush(self) -> None:
        """Run every queued call now, in order (a failing one is logged; the rest still run)."""
        while self._calls:  # calls deferred by these calls run in this flush too
            calls, self._calls = self._calls, []
            for fn, args in calls:
                _run(fn, args)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:  # metrics and logs must never take an answer, or the loop, down
        log.exception("deferred bookkeeping %s failed", getattr(fn, "__qualname__", fn))
