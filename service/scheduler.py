"""Dynamic batching of concurrent requests that chose the same sub-network.

Requests wait in per-sub-network groups, oldest group first. When the inference worker is free,
the oldest group runs as soon as it holds ``max_batch_size`` inputs or its oldest request has
waited ``max_wait_s`` (the usual dynamic-batching rule of TF-Serving, Triton and Clipper), with one
refinement: the wait is skipped when the recent arrival rate makes another request unlikely to come
within it (fewer than half an expected arrival), so a lone request at low load is not delayed by a
batch that will not form. Under load the worker is busy when requests arrive, groups fill while
they wait for it, and batches form without any waiting. A batch is cut short, though, before
requests whose rows would make it end after the deadline of a request already in it that would
otherwise meet it (:meth:`Scheduler._dispatch_end`). The
runner is either a coroutine function (it awaits the inference worker process, so the event loop
waits for its answer without a thread hop) or a plain function run in a worker thread
(``run_in_executor``); either way the event loop keeps answering ``/healthz`` and ``/metrics``
while the model works. The queue is bounded: past ``max_queue``
requests (waiting + running) ``submit`` raises :class:`QueueFull` with the predicted time until
the queue drains, which becomes the response's ``Retry-After``.

With ``lanes`` > 1 that many batches run at once, each on a runner call of its own (the runner
then holds that many inference workers, one per call: Triton's instance groups, TorchServe's
workers per model), fed from the one queue, so the batches stay as large as one worker's would
be. A batch starts on the first lane to come free, the oldest group first as before, and
:meth:`Scheduler.outlook` predicts where each newcomer would start by placing the queued batches on
the lanes in that order. One lane (the default) runs each batch on the scheduler's own task.

A request whose client hangs up while it waits is withdrawn from its group before its batch runs
(:class:`ClientClosed`): under overload, clients that time out and retry would otherwise leave the
worker computing answers nobody reads, ahead of the requests whose clients still wait. vLLM's
server aborts a request when its client disconnects in the same spirit. Only a request that has
work ahead of it is watched (a request the worker takes at once gains nothing from it, and watching
costs the event loop a task).

A request may also carry a *timeout*: the time after which its client no longer wants the answer
(``X-Request-Timeout-Ms``, or the timeout a proxy such as Envoy announces). One whose batch is
predicted to end only after its timeout (the work ahead plus its own batch) is refused at once;
one whose timeout passes while it waits leaves its group unrun, and one whose batch is running
loses its answer; each ends as :class:`DeadlineExceeded`, at its timeout or sooner. This is the
queue policy of Triton's dynamic batcher (a per-request timeout, REJECT on expiry) and gRPC's
deadline propagation, for clients that cannot hang up: one behind a proxy that keeps the upstream
connection open, or one that sends and waits on a pool of connections.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.policy import Outlook, QueueOutlook, merge_tokens

log = logging.getLogger(__name__)

SubnetKey = tuple[float, float]
# (sub-network, inputs) -> one output per input; a coroutine function, or a plain one run in a thread
Runner = Callable[[SubnetKey, list[Any]], "list[Any] | Ran | Awaitable[list[Any] | Ran]"]


@dataclass(frozen=True)
class Ran:
    """What a runner may return instead of a plain list: the outputs and the seconds of the
    forward pass alone (without the hand-off to the worker and back)."""

    outputs: list[Any]
    forward_s: float


class QueueFull(Exception):
    def __init__(self, depth: int, capacity: int, retry_after_s: float, closing: bool = False) -> None:
        self.depth, self.capacity, self.retry_after_s, self.closing = depth, capacity, retry_after_s, closing
        why = "the server is shutting down" if closing else f"queue full ({depth} of {capacity} requests)"
        super().__init__(f"{why}; retry after {retry_after_s:.3f} s")

    @property
    def retry_after(self) -> int:
        """Whole seconds for the Retry-After header (at least 1)."""
        return max(1, math.ceil(self.retry_after_s))


class Withdrawn(Exception):
    """A request that leaves before its answer: ``stage`` is ``queued`` (taken out of its group
    before its forward pass: the work is saved) or ``running`` (its batch was already running; its
    answer is dropped)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        self.decision: Any = None  # the policy's choice, set by whoever routed the request
        super().__init__(message)


class ClientClosed(Withdrawn):
    """The client closed the connection before its answer."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage, f"the client closed the connection while its request was {stage}")


class DeadlineExceeded(Withdrawn):
    """The request's timeout passed before its answer (``queued``, ``running``), or its answer was
    predicted to come only after it (``admission``: never queued). ``start_s``, ``finish_s``: the
    predicted seconds until its batch would have started and ended, for an ``admission`` refusal."""

    def __init__(self, stage: str, start_s: float | None = None, finish_s: float | None = None) -> None:
        self.start_s, self.finish_s = start_s, finish_s
        why = {
            "admission": "its answer is predicted only after its timeout (the work queued ahead plus its own batch)",
            "queued": "its timeout passed while it waited in the queue; it was not run",
            "running": "its timeout passed while its batch was running; the answer was dropped",
        }
        super().__init__(stage, why.get(stage, f"its timeout passed ({stage})"))


@dataclass(frozen=True)
class JobTiming:
    queue_s: float  # from submit to the start of its batch's forward pass
    infer_s: float  # its batch, as the scheduler sees it (dispatch, worker round trip, forward)
    batch_size: int  # inputs in that batch
    forward_s: float | None = None  # the forward pass alone, when the runner reports it


@dataclass(eq=False)  # compared by identity: a job is found in its group by ``is``
class _Job:
    key: SubnetKey
    items: list[Any]
    tokens: int  # per row, as its forward pass costs them (see Scheduler.packed)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf  # perf_counter time its answer is due (inf: no budget)


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.002,
        max_queue: int = 64,
        predict: Callable[[SubnetKey, int, int], float] = lambda key, b, t: 0.0,
        on_batch: Callable[[SubnetKey, int, int, float], None] | None = None,
        executor: Executor | None = None,
        defer: Callable[..., None] | None = None,
        packed: bool = False,
        lanes: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or lanes < 1:
            raise ValueError(
                f"bad scheduler limits: max_batch_size={max_batch_size}, max_queue={max_queue}, "
                f"max_wait_s={max_wait_s}, lanes={lanes}"
            )
        self.runner, self.max_batch_size, self.max_wait_s = runner, max_batch_size, max_wait_s
        self._async = inspect.iscoroutinefunction(runner)
        self.max_queue, self.predict, self.on_batch, self.executor = max_queue, predict, on_batch, executor
        self.defer = defer  # how on_batch is put off until after the answers (None: loop.call_soon)
        # whether the runner's forward pass costs a batch's rows their own tokens (unpadded, the
        # CPU) rather than its longest row's each: how jobs' tokens combine (merge_tokens)
        self.packed = packed
        self._groups: dict[SubnetKey, list[_Job]] = {}  # insertion order = age of each group's oldest job
        self.lanes = lanes  # batches that may run at once
        # the batches running: [requests, start, predicted seconds] each (one list per batch)
        self._running: list[list[Any]] = []
        self._batch_tasks: set[asyncio.Task] = set()  # with lanes > 1: the batches' own tasks
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batches_run = 0
        self._last_arrival: float | None = None
        self._gap_s = math.inf  # EWMA of the time between submits (arrival rate = 1 / gap)

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap_s = gap if math.isinf(self._gap_s) else 0.8 * self._gap_s + 0.2 * gap
        self._last_arrival = now

    def worth_waiting(self, wait_s: float) -> bool:
        """Whether at least half an arrival is expected within ``wait_s`` at the recent rate."""
        return wait_s > 0 and wait_s >= 0.5 * self._gap_s

    # ---- queue state (read by the policy and the metrics) -----------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return sum(len(g) for g in self._groups.values()) + sum(r[0] for r in self._running)

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """``jobs`` cut into the batches ``_loop`` will run, in order (see :meth:`_batch_end`)."""
        out, start = [], 0
        while start < len(jobs):
            end = self._batch_end(jobs, start)
            out.append(jobs[start:end])
            start = end
        return out

    def _tokens(self, jobs: list[_Job]) -> int:
        """Tokens per row that one forward pass of ``jobs`` costs."""
        if not self.packed:
            return max(j.tokens for j in jobs)
        rows = sum(len(j.items) for j in jobs)
        return -(-sum(len(j.items) * j.tokens for j in jobs) // rows)

    def _batch_s(self, key: SubnetKey, batch: list[_Job]) -> float:
        """Predicted seconds of one batch of ``batch``'s jobs."""
        return self.predict(key, sum(len(j.items) for j in batch), self._tokens(batch))

    def _lanes_free(self, now: float) -> list[float]:
        """Predicted seconds from ``now`` until each lane is free: 0 for an idle lane, a running
        batch's predicted rest for a busy one; a heap (the soonest first)."""
        busy = [max(0.0, start + predicted - now) for _, start, predicted in self._running]
        lanes = [0.0] * max(0, self.lanes - len(busy)) + busy
        heapq.heapify(lanes)
        return lanes

    def outlook(self, inputs: int = 1) -> QueueOutlook:
        """What a new request of ``inputs`` inputs would find, for every sub-network, each group
        cut into batches once (the policy reads this once per request, for all its candidates).

        Groups run oldest first, each to its end: a newcomer waits for the running batch, every
        group older than its own, and its own group's batches before the one it joins. It joins
        the group's last batch when that still has room for all its inputs (``_loop`` cuts
        batches from whole jobs, so a newcomer too big for the room left waits for the next one).
        A sub-network without a group runs after all the work queued.

        With several lanes each batch, in that order, starts on the lane that comes free first,
        and a newcomer's batch starts when the lane it would take comes free."""
        now = time.perf_counter()
        lanes = self._lanes_free(now)

        def place(seconds: float) -> None:  # the next batch, on the soonest free lane
            heapq.heappush(lanes, heapq.heappop(lanes) + seconds)

        groups: dict[SubnetKey, Outlook] = {}
        for key, jobs in self._groups.items():
            if not jobs:
                continue
            batches = self._batches(jobs)
            last = batches[-1]
            n = sum(len(j.items) for j in last)
            if n + inputs <= self.max_batch_size:
                for b in batches[:-1]:
                    place(self._batch_s(key, b))
                tokens = self._tokens(last)
                groups[key] = Outlook(lanes[0], n, tokens, min(j.deadline for j in last) - now)
                place(self.predict(key, n, tokens))
            else:
                for b in batches:
                    place(self._batch_s(key, b))
                groups[key] = Outlook(lanes[0])
        return QueueOutlook(groups, Outlook(lanes[0]))

    def quiet(self) -> bool:
        """Whether the one batch now running is all the work there is: no other batch runs, no
        request waits, and at the recent arrival rate the next one is not expected before the
        batch is predicted to end (low load: the event loop has nothing to do until its answer)."""
        if len(self._running) != 1 or any(self._groups.values()):
            return False
        _, _, predicted = self._running[0]
        return self._gap_s > predicted

    def work_ahead_s(self) -> float:
        """Predicted seconds until the queue drains (a 503's ``Retry-After``)."""
        return self.outlook().rest.ahead_s

    def predicted_span_s(self, key: SubnetKey, inputs: int, tokens: int) -> tuple[float, float]:
        """Predicted seconds until the batch a new request of ``inputs`` inputs (``tokens`` long)
        for ``key`` would run in starts, and until it ends."""
        look = self.outlook(inputs)(key)
        tokens = merge_tokens(look.inputs, look.tokens, inputs, tokens, self.packed)
        return look.ahead_s, look.ahead_s + self.predict(key, look.inputs + inputs, tokens)

    def _batch_end(self, jobs: list[_Job], start: int = 0) -> int:
        """Where the batch beginning at ``jobs[start]`` ends: whole jobs in order while they fit
        ``max_batch_size`` inputs (the first one always, however big)."""
        end, count = start, 0
        while end < len(jobs) and (end == start or count + len(jobs[end].items) <= self.max_batch_size):
            count += len(jobs[end].items)
            end += 1
        return end

    def _dispatch_end(self, key: SubnetKey, jobs: list[_Job], now: float) -> int:
        """Where the batch that starts ``now`` ends: :meth:`_batch_end`'s whole jobs, but not past a
        job whose rows would make the batch end (predicted) after the deadline of a job already in
        it that would meet its deadline without them. Under a backlog, a batch grown to the size
        limit took long enough to make every one of its requests late (16 rows of the smallest
        sub-network, padded to the longest, took 40-55 ms on two busy cores against a 50 ms
        budget; docs/RESULTS.md); cut short, its first requests still make it and the rest run in
        the next batch. Jobs that are late whatever the batch (or have no deadline) do not cut:
        then the batch is as large as it may be, as before."""
        limit = self._batch_end(jobs)
        if limit == 1:  # (a lone request at low load: nothing to cut, no prediction to make)
            return 1
        rows, tokens = len(jobs[0].items), jobs[0].tokens
        due = jobs[0].deadline if now + self.predict(key, rows, tokens) <= jobs[0].deadline else math.inf
        for k in range(1, limit):
            job = jobs[k]
            rows += len(job.items)
            end = now + self.predict(key, rows, self._tokens(jobs[: k + 1]))  # (k < max batch: cheap)
            if end > due:
                return k
            if end <= job.deadline:
                due = min(due, job.deadline)
        return limit

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynabert-scheduler")

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting work, finish what is queued and running, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning(
                    "scheduler: %d requests still queued after %.0f s; cancelling", self.depth, timeout_s
                )
                self._task.cancel()

    # ---- work ------------------------------------------------------------------------------

    async def submit(
        self,
        key: SubnetKey,
        items: list[Any],
        tokens: int,
        deadline: float | None = None,
        closed: Callable[[], Awaitable[Any]] | None = None,
        expires: float | None = None,
    ) -> tuple[list[Any], JobTiming]:
        """Queue ``items`` for sub-network ``key``; returns their outputs and timings. ``deadline``
        (a ``time.perf_counter`` time) is when the answer is due, read by :meth:`outlook` (``slack_s``).
        ``closed`` returns when the client has gone away (an ASGI ``http.disconnect``); when it does
        before the answer, this raises :class:`ClientClosed`, and a request still waiting is taken
        out of the queue. It is awaited only when work is ahead of the request. ``expires`` (a
        ``time.perf_counter`` time) is the request's timeout: :class:`DeadlineExceeded` is raised
        right away when its batch is predicted to end after it, else when it passes."""
        if not items:
            raise ValueError("submit needs at least one input")
        if self._closing or self.depth >= self.max_queue:
            raise QueueFull(self.depth, self.max_queue, self.work_ahead_s(), closing=self._closing)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        if expires is not None:
            start_s, finish_s = self.predicted_span_s(key, len(items), int(tokens))
            if finish_s >= expires - time.perf_counter():
                raise DeadlineExceeded("admission", start_s, finish_s)
        job = _Job(key, list(items), int(tokens), loop.create_future())
        if deadline is not None:
            job.deadline = deadline
        self._note_arrival(job.enqueued)
        ahead = len(self._running) >= self.lanes or any(self._groups.values())
        self._groups.setdefault(key, []).append(job)
        self._wakeup.set()
        if expires is not None:
            timer = loop.call_later(
                max(0.0, expires - time.perf_counter()), self._withdraw, job, DeadlineExceeded
            )
        watch = None
        if closed is not None and ahead:
            watch = asyncio.ensure_future(closed())
            watch.add_done_callback(lambda w: self._client_closed(job, w))
        try:
            return await job.future
        finally:
            if watch is not None:
                watch.cancel()
            if timer is not None:
                timer.cancel()

    def _client_closed(self, job: _Job, watch: asyncio.Future) -> None:
        """``job``'s client went away (unless ``watch`` was cancelled: the answer came first)."""
        if not watch.cancelled() and watch.exception() is None:
            self._withdraw(job, ClientClosed)

    def _withdraw(self, job: _Job, why: Callable[[str], Withdrawn]) -> None:
        """End ``job`` with ``why(stage)`` unless its answer came first: a job still waiting leaves
        its group and its forward pass is never run; one in the running batch loses its answer."""
        if job.future.done():
            return
        group = self._groups.get(job.key)
        if group is not None and job in group:
            group.remove(job)
            if not group:
                del self._groups[job.key]
            job.future.set_exception(why("queued"))
            self._wakeup.set()  # the group the loop is waiting on may be gone
        else:  # the batch goes on
            job.future.set_exception(why("running"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._groups = {k: [j for j in g if not j.future.done()] for k, g in self._groups.items()}
            self._groups = {k: g for k, g in self._groups.items() if g}
            if not self._groups and self._closing:
                break
            if not self._groups or len(self._running) >= self.lanes:  # nothing to run, or no lane
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, group = next(iter(self._groups.items()))
            n = sum(len(j.items) for j in group)
            wait = self.max_wait_s - (time.perf_counter() - group[0].enqueued)
            if n < self.max_batch_size and self.worth_waiting(wait) and not self._closing:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                continue
            end = self._dispatch_end(key, group, time.perf_counter())
            take = group[:end]
            del group[:end]
            if not group:
                del self._groups[key]
            # the lane is taken now, before the loop looks for another free one
            rows = sum(len(j.items) for j in take)
            running = [len(take), time.perf_counter(), self.predict(key, rows, self._tokens(take))]
            self._running.append(running)
            if self.lanes == 1:  # one batch at a time, on this task (no task per batch)
                await self._dispatch(loop, key, take, running)
            else:
                task = loop.create_task(self._dispatch(loop, key, take, running))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_done)
        if self._batch_tasks:  # closing: the batches still running finish
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batch_tasks.discard(task)
        self._wakeup.set()  # a lane is free

    async def _dispatch(
        self, loop: asyncio.AbstractEventLoop, key: SubnetKey, jobs: list[_Job], running: list[Any]
    ) -> None:
        try:
            await self._run(loop, key, jobs, running)
        except Exception as e:  # a bug here must not stop the queue: fail this batch, go on
            log.exception("scheduler: batch for %s failed outside inference", key)
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
        finally:
            self._release(running)  # (_run frees it as the runner returns; this, if _run failed first)

    def _release(self, running: list[Any]) -> None:
        """Its lane is free (the entry found by identity: two batches' entries may be equal)."""
        self._running = [r for r in self._running if r is not running]

    async def _run(
        self, loop: asyncio.AbstractEventLoop, key: SubnetKey, jobs: list[_Job], running: list[Any]
    ) -> None:
        """Run one batch on a lane: ``running`` is its entry in ``_running`` (requests, start,
        predicted seconds), its start set here and the entry taken out when the runner returns."""
        items = [x for j in jobs for x in j.items]
        tokens = self._tokens(jobs)
        start = running[1] = time.perf_counter()
        try:
            if self._async:  # the runner awaits its worker process itself
                outputs = await self.runner(key, items)
            else:
                outputs = await loop.run_in_executor(self.executor, self.runner, key, items)
            forward_s = None
            if isinstance(outputs, Ran):
                outputs, forward_s = outputs.outputs, outputs.forward_s
            if len(outputs) != len(items):
                raise RuntimeError(f"runner returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as e:  # the server's fault: every request of the batch gets it
            log.exception("inference failed for sub-network %s, batch of %d", key, len(items))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self._release(running)
        infer_s = time.perf_counter() - start
        self.batches_run += 1
        i = 0
        for j in jobs:
            out = outputs[i : i + len(j.items)]
            i += len(j.items)
            if not j.future.done():
                j.future.set_result((out, JobTiming(start - j.enqueued, infer_s, len(items), forward_s)))
        if self.on_batch is not None:  # after the answers: the requests' own steps run first
            (self.defer or loop.call_soon)(self._after_batch, key, len(items), tokens, infer_s)

    def _after_batch(self, key: SubnetKey, n: int, tokens: int, infer_s: float) -> None:
        assert self.on_batch is not None
        try:
            self.on_batch(key, n, tokens, infer_s)
        except Exception:  # metrics/feedback must never lose an answer
            log.exception("on_batch callback failed")
