"""The batching scheduler with a plain runner function (the scheduler is generic: it batches
whatever rows it is given). Structure-based checks only: which inputs ran together, in what
order, and what the queue reports; no wall-clock assertions."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.policy import merge_tokens
from service.scheduler import ClientClosed, DeadlineExceeded, QueueFull, Ran, Scheduler

A, B = (1.0, 1.0), (0.5, 0.5)


class Recorder:
    """Runs 'inference' (doubles each input), records each batch; can be held on a gate."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[tuple[tuple[float, float], list[int]]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, key, items):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append((key, list(items)))
        return [2 * x for x in items]


async def wait_for(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition never became true"
        await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(coro)


async def held(
    first_key=A, first_items=(1,), tokens: int = 5, **kw
) -> tuple[Recorder, Scheduler, asyncio.Task]:
    """A started scheduler (``kw``: its limits) whose runner holds its first batch, ``first_items``
    for ``first_key``, until ``rec.gate`` is set; returns (rec, scheduler, that request's task)."""
    rec = Recorder(hold=True)
    s = Scheduler(rec, **kw)
    s.start()
    first = asyncio.create_task(s.submit(first_key, list(first_items), tokens))
    await wait_for(rec.entered.is_set)
    return rec, s, first


def test_requests_for_the_same_subnetwork_queued_while_busy_run_as_one_batch():
    async def main():
        rec, s, first = await held(max_batch_size=8, max_wait_s=0.0)
        rest = [asyncio.create_task(s.submit(A, [10 + i, 20 + i], 7)) for i in range(3)]
        other = asyncio.create_task(s.submit(B, [99], 3))
        await wait_for(lambda: s.depth == 5)
        rec.gate.set()
        out = await asyncio.gather(first, *rest, other)
        await s.close()
        return rec, out

    rec, out = run(main())
    assert rec.batches == [(A, [1]), (A, [10, 20, 11, 21, 12, 22]), (B, [99])]
    (o1, t1), *rest, (o_other, t_other) = out
    assert o1 == [2] and t1.batch_size == 1
    assert [o for o, _ in rest] == [[20, 40], [22, 42], [24, 44]]
    assert all(t.batch_size == 6 for _, t in rest)
    assert o_other == [198] and t_other.batch_size == 1
    assert all(t.queue_s >= 0 and t.infer_s >= 0 for _, t in out)


def test_max_batch_size_splits_and_keeps_requests_whole():
    async def main():
        rec, s, first = await held(A, (0,), 1, max_batch_size=4, max_wait_s=0.0)
        tasks = [asyncio.create_task(s.submit(A, [i] * 3, 1)) for i in (1, 2, 3)]
        await wait_for(lambda: s.depth == 4)
        rec.gate.set()
        await asyncio.gather(first, *tasks)
        await s.close()
        return rec

    rec = run(main())
    assert [items for _, items in rec.batches] == [[0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]


def test_max_wait_gathers_a_batch_even_when_idle():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch_size=3, max_wait_s=5.0)  # long wait; the batch fills first
        s.start()
        outs = await asyncio.gather(*(s.submit(A, [i], 1) for i in range(3)))
        await s.close()
        return rec, outs

    rec, outs = run(main())
    assert rec.batches == [(A, [0, 1, 2])]
    assert [o for o, _ in outs] == [[0], [2], [4]]


def test_a_lone_request_at_low_load_does_not_wait_for_a_batch_that_will_not_form():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch_size=8, max_wait_s=30.0)  # a wait this long would time out below
        s.start()
        out = await asyncio.wait_for(s.submit(A, [7], 1), 10.0)
        await s.close()
        return rec, out

    rec, (out, timing) = run(main())
    assert rec.batches == [(A, [7])] and out == [14] and timing.batch_size == 1


def test_the_wait_is_kept_when_the_arrival_rate_promises_company():
    s = Scheduler(lambda key, items: items, max_wait_s=0.002)
    assert not s.worth_waiting(0.002)  # no arrivals seen: nothing to wait for
    for i in range(20):  # 1000 req/s: one every millisecond
        s._note_arrival(i * 0.001)
    assert s.worth_waiting(0.002) and s.worth_waiting(0.0005)
    assert not s.worth_waiting(0.0003) and not s.worth_waiting(0.0)
    for i in range(20):  # then 10 req/s
        s._note_arrival(1.0 + i * 0.1)
    assert not s.worth_waiting(0.002)


def test_queue_bound_raises_with_retry_after_from_predicted_work():
    async def main():
        rec, s, t1 = await held(A, (1,), 1, max_batch_size=2, max_queue=2, predict=lambda key, b, t: 1.5 * b)
        t2 = asyncio.create_task(s.submit(A, [2, 3], 1))
        await wait_for(lambda: s.depth == 2)
        assert s.work_ahead_s() == pytest.approx(1.5 + 3.0, abs=0.1)  # running (1 input) + queued (2)
        with pytest.raises(QueueFull) as e:
            await s.submit(B, [4], 1)
        rec.gate.set()
        await asyncio.gather(t1, t2)
        await s.close()
        return e.value

    err = run(main())
    assert err.depth == 2 and err.capacity == 2 and not err.closing
    assert err.retry_after_s == pytest.approx(4.5, abs=0.1) and err.retry_after == 5


def pend(look) -> tuple[int, int]:
    return look.inputs, look.tokens


def test_the_outlook_describes_the_queue():
    async def main():
        rec, s, t0 = await held(
            B, (0,), 1, max_batch_size=4, predict=lambda key, b, t: {A: 1.0, B: 0.1}[key] * b
        )
        tasks = [
            asyncio.create_task(s.submit(A, [1, 2, 3, 4, 5], 9)),
            asyncio.create_task(s.submit(B, [6], 4)),
        ]
        await wait_for(lambda: s.depth == 3)
        look = s.outlook(1)
        view = (look(A).ahead_s, pend(look(A)), look(B).ahead_s, pend(look(B)), pend(look((0.25, 0.5))))
        assert look((0.25, 0.5)).ahead_s == pytest.approx(look(B).ahead_s + 0.1, abs=0.01) == s.work_ahead_s()
        rec.gate.set()
        await asyncio.gather(t0, *tasks)
        await s.close()
        return view

    ahead_a, pend_a, ahead_b, pend_b, pend_none = run(main())
    # A's group is oldest, and its one request of 5 inputs runs as one batch (whole jobs; the first
    # always): a new A request cannot join it, so it waits for the running B batch (<= 0.1 s) and
    # that batch of 5, and starts its own
    assert 5.0 <= ahead_a <= 5.1 and pend_a == (0, 0)
    # a new B request joins B's group, behind the whole A group
    assert 5.0 <= ahead_b <= 5.1 and pend_b == (1, 4)
    assert pend_none == (0, 0)


def test_the_queue_view_predicts_the_batches_the_loop_runs():
    """outlook cuts a group as _loop does (whole requests while
    they fit), for a newcomer of the size asked about: two requests of 3 inputs with room for 4
    run as two batches, and a newcomer of 1 joins the second while one of 2 starts a third."""

    async def main():
        rec, s, running = await held(
            B, (0,), 1, max_batch_size=4, max_wait_s=0.0, predict=lambda key, b, t: 1.0 * b
        )
        now = time.perf_counter()
        tasks = [
            asyncio.create_task(s.submit(A, [1, 2, 3], 8, deadline=now + 5)),
            asyncio.create_task(s.submit(A, [4, 5, 6], 6, deadline=now + 3)),
        ]
        await wait_for(lambda: s.depth == 3)
        one, two = s.outlook(1)(A), s.outlook(2)(A)
        tasks += [asyncio.create_task(s.submit(A, [7], 1)), asyncio.create_task(s.submit(A, [8, 9], 1))]
        await wait_for(lambda: s.depth == 5)
        rec.gate.set()
        await asyncio.gather(running, *tasks)
        await s.close()
        return one, two, [items for key, items in rec.batches if key == A]

    one, two, ran = run(main())
    assert ran == [[1, 2, 3], [4, 5, 6, 7], [8, 9]]  # what the predictions below must describe
    ahead, *pending, slack = one  # joins [4, 5, 6] (6 tokens), behind [1, 2, 3]
    assert 3.0 <= ahead <= 4.0 and pending == [3, 6] and 2.5 < slack <= 3.0
    ahead, *pending, slack = two  # too big for the room left: behind both, a batch of its own
    assert 6.0 <= ahead <= 7.0 and pending == [0, 0] and slack == float("inf")


@pytest.mark.parametrize("first_due", [3.5, -1.0])
def test_a_batch_is_cut_before_rows_that_would_make_a_request_in_it_late(first_due):
    """Predicted 1 s per row: a request due in 3.5 s caps its batch at 3 rows (a fourth would end
    it at about 4 s), and the rest run next; a request already late, or one without a deadline,
    does not cut, so then the batch takes everything that fits."""

    async def main():
        rec, s, running = await held(
            B, (0,), 1, max_batch_size=8, max_wait_s=0.0, predict=lambda key, b, t: 1.0 * b
        )
        now = time.perf_counter()
        deadlines = [now + first_due, now + 100, now + 100, None, None, None]
        tasks = [asyncio.create_task(s.submit(A, [i], 1, deadline=d)) for i, d in enumerate(deadlines)]
        await wait_for(lambda: s.depth == 7)
        rec.gate.set()
        await asyncio.gather(running, *tasks)
        await s.close()
        return [items for key, items in rec.batches if key == A]

    ran = run(main())
    assert ran == ([[0, 1, 2], [3, 4, 5]] if first_due > 0 else [[0, 1, 2, 3, 4, 5]])


def test_group_slack_is_the_earliest_deadline_in_the_batch_a_newcomer_would_join():
    async def main():
        rec = Recorder(hold=True)
        s = Scheduler(rec, max_batch_size=4)
        s.start()
        running = asyncio.create_task(s.submit(B, [0], 1, deadline=time.perf_counter() - 1))
        await wait_for(rec.entered.is_set)
        now = time.perf_counter()
        # A: a full batch of 4 (deadlines +1 s and +5 s), then an unfilled one of 2 (+3 s, +2 s)
        tasks = [
            asyncio.create_task(s.submit(A, [1, 2, 3], 1, deadline=now + 1)),
            asyncio.create_task(s.submit(A, [4], 1, deadline=now + 5)),
            asyncio.create_task(s.submit(A, [5], 1, deadline=now + 3)),
            asyncio.create_task(s.submit(A, [6], 1, deadline=now + 2)),
            asyncio.create_task(s.submit(B, [7, 8, 9, 10], 1)),  # a full batch, no deadline
        ]
        await wait_for(lambda: s.depth == 6)
        look = s.outlook()
        view = (look(A).slack_s, look(B).slack_s, look((0.25, 0.5)).slack_s)
        rec.gate.set()
        await asyncio.gather(running, *tasks)
        await s.close()
        return view

    slack_a, slack_b, slack_none = run(main())
    # a newcomer for A joins the batch of [5] and [6], not the full one ahead: +2 s, not +1 s
    assert 1.9 < slack_a <= 2.0
    # B's group fills a batch: a newcomer starts a batch of its own, with no one to make late
    assert slack_b == slack_none == float("inf")


def test_a_runner_may_report_its_forward_time_apart_from_the_batch_time():
    def runner(key, items):
        time.sleep(0.02)  # the hand-off to a worker and back: in infer, not in forward
        return Ran([x * 2 for x in items], 0.005)

    async def main():
        s = Scheduler(runner, max_batch_size=4)
        s.start()
        out = await s.submit(A, [1, 2], 1)
        plain = Scheduler(lambda key, items: items, max_batch_size=4)
        plain.start()
        out2 = await plain.submit(A, [3], 1)
        await s.close()
        await plain.close()
        return out, out2

    (out, timing), (out2, timing2) = run(main())
    assert out == [2, 4] and timing.forward_s == 0.005 and timing.infer_s >= 0.02
    assert out2 == [3] and timing2.forward_s is None  # a runner returning a plain list


def test_runner_errors_reach_every_request_of_the_batch_and_the_loop_survives():
    def runner(key, items):
        if 13 in items:
            raise RuntimeError("boom")
        return items

    async def main():
        s = Scheduler(runner, max_batch_size=4)
        s.start()
        with pytest.raises(RuntimeError, match="boom"):
            await s.submit(A, [13], 1)
        ok = await s.submit(A, [1], 1)
        await s.close()
        return ok

    assert run(main())[0] == [1]


def test_close_finishes_queued_work_then_refuses_new_work():
    async def main():
        rec = Recorder(hold=True)
        s = Scheduler(rec, max_batch_size=1)
        s.start()
        tasks = [asyncio.create_task(s.submit(A, [i], 1)) for i in range(3)]
        await wait_for(lambda: s.depth == 3)
        closing = asyncio.create_task(s.close())
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as e:
            await s.submit(A, [9], 1)
        rec.gate.set()
        outs = await asyncio.gather(*tasks)
        await closing
        return outs, e.value

    outs, err = run(main())
    assert [o for o, _ in outs] == [[0], [2], [4]]
    assert err.closing and "shutting down" in str(err)


class HangUp:
    """A client's ``closed`` watch: returns once ``hang_up`` is called; counts how often it was
    awaited."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.watched = 0

    async def __call__(self) -> None:
        self.watched += 1
        await self.event.wait()

    def hang_up(self) -> None:
        self.event.set()


@pytest.mark.parametrize("group", [A, B], ids=["its own group", "a group of its own"])
@pytest.mark.parametrize("how", ["hang-up", "timeout"])
def test_a_request_withdrawn_while_queued_is_never_run(group, how):
    """Its client hangs up, or its timeout passes. Withdrawn from a group another request waits
    in too, or from a group it alone was in (the oldest waiting one: the loop must move on to the
    next)."""

    async def main():
        rec, s, first = await held(max_batch_size=8, max_wait_s=0.0)
        client = HangUp()
        soon = time.perf_counter() + 0.05
        if how == "hang-up":
            gone = asyncio.create_task(s.submit(group, [2], 5, closed=client))
        else:
            gone = asyncio.create_task(s.submit(group, [2], 5, expires=soon))
        later = time.perf_counter() + 60  # both watches on the one that stays
        kept = asyncio.create_task(s.submit(A, [3], 5, closed=HangUp(), expires=later))
        await wait_for(lambda: s.depth == 3)
        if how == "hang-up":
            await wait_for(lambda: client.watched == 1)
            client.hang_up()
        with pytest.raises(ClientClosed if how == "hang-up" else DeadlineExceeded) as e:
            await gone
        assert e.value.stage == "queued"
        if how == "timeout":
            assert time.perf_counter() >= soon
        # the queue forgot it at once
        assert s.depth == 2 and set(s.outlook().groups) == {A} and pend(s.outlook()(A)) == (1, 5)
        rec.gate.set()
        out = await asyncio.gather(first, kept)
        await s.close()
        return rec, out

    rec, out = run(main())
    assert rec.batches == [(A, [1]), (A, [3])]  # 2 never reached the runner
    assert [o for o, _ in out] == [[2], [6]]


def test_a_hang_up_during_the_forward_pass_drops_only_that_answer():
    async def main():
        gates = [threading.Event(), threading.Event()]
        entered: list[list[int]] = []

        def runner(key, items):
            entered.append(list(items))
            if len(entered) <= len(gates):
                gates[len(entered) - 1].wait(10)
            return [2 * x for x in items]

        s = Scheduler(runner, max_batch_size=8, max_wait_s=0.0)
        s.start()
        first = asyncio.create_task(s.submit(A, [1], 5))
        await wait_for(lambda: len(entered) == 1)
        client = HangUp()
        gone = asyncio.create_task(s.submit(A, [2], 5, closed=client))
        mate = asyncio.create_task(s.submit(A, [3], 5))
        await wait_for(lambda: s.depth == 3)
        gates[0].set()
        await wait_for(lambda: len(entered) == 2)  # 2 and 3 run together now
        client.hang_up()
        with pytest.raises(ClientClosed) as e:
            await gone
        assert e.value.stage == "running"
        gates[1].set()
        out = await asyncio.gather(first, mate)
        after = await s.submit(B, [4], 5)  # the loop goes on
        await s.close()
        return entered, out, after

    entered, out, after = run(main())
    assert entered == [[1], [2, 3], [4]]
    assert [o for o, _ in out] == [[2], [6]] and after[0] == [8]


def test_a_request_with_nothing_ahead_is_not_watched():
    async def main():
        s = Scheduler(Recorder(), max_batch_size=8, max_wait_s=0.0)
        s.start()
        client = HangUp()
        out, _ = await s.submit(A, [5], 5, closed=client)
        await s.close()
        return out, client.watched

    assert run(main()) == ([10], 0)


def test_a_timeout_during_the_forward_pass_answers_at_once_and_the_batch_goes_on():
    async def main():
        rec = Recorder(hold=True)
        s = Scheduler(rec, max_batch_size=8, max_wait_s=0.0)
        s.start()
        late = asyncio.create_task(s.submit(A, [1], 5, expires=time.perf_counter() + 0.05))
        with pytest.raises(DeadlineExceeded) as e:
            await late
        assert e.value.stage == "running" and rec.entered.is_set() and not rec.batches
        rec.gate.set()
        after = await s.submit(B, [4], 5, expires=time.perf_counter() + 60)  # the loop goes on
        await s.close()
        return rec, after

    rec, after = run(main())
    assert rec.batches == [(A, [1]), (B, [4])] and after[0] == [8]


def test_a_request_predicted_to_start_after_its_timeout_is_refused_without_queuing():
    async def main():
        rec, s, first = await held(max_batch_size=1, max_wait_s=0.0, predict=lambda key, b, t: 0.1)
        waiting = asyncio.create_task(s.submit(A, [2], 5))
        await wait_for(lambda: s.depth == 2)
        # about 0.1 s of the running batch left + 0.1 s for 2: a 50 ms timeout cannot be met
        with pytest.raises(DeadlineExceeded) as e:
            await s.submit(A, [3], 5, expires=time.perf_counter() + 0.05)
        assert e.value.stage == "admission" and 0.1 <= e.value.start_s <= 0.2
        assert e.value.finish_s == pytest.approx(e.value.start_s + 0.1)  # its own batch: 0.1 s more
        assert s.depth == 2
        # a timeout that the predicted start fits is queued (and met: nothing is slow here)
        fits = asyncio.create_task(s.submit(A, [4], 5, expires=time.perf_counter() + 30))
        await wait_for(lambda: s.depth == 3)
        rec.gate.set()
        out = await asyncio.gather(first, waiting, fits)
        await s.close()
        return rec, out

    rec, out = run(main())
    assert [items for _, items in rec.batches] == [[1], [2], [4]]
    assert [o for o, _ in out] == [[2], [4], [8]]


def test_a_request_whose_own_batch_would_end_after_its_timeout_is_refused_with_nothing_ahead():
    async def main():
        rec = Recorder()
        s = Scheduler(
            rec, max_batch_size=8, max_wait_s=0.0, predict=lambda key, b, t: 0.1 if key == A else 0.01
        )
        s.start()
        with pytest.raises(DeadlineExceeded) as e:  # A's forward pass alone outlasts 50 ms
            await s.submit(A, [1], 5, expires=time.perf_counter() + 0.05)
        out, _ = await s.submit(B, [2], 5, expires=time.perf_counter() + 0.05)  # B's fits
        await s.close()
        return e.value, rec.batches, out

    refused, batches, out = run(main())
    assert refused.stage == "admission" and (refused.start_s, refused.finish_s) == (0.0, 0.1)
    assert batches == [(B, [2])] and out == [4]


def test_a_timeout_already_past_is_refused_at_admission_even_with_nothing_ahead():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch_size=8, max_wait_s=0.0)
        s.start()
        with pytest.raises(DeadlineExceeded) as e:
            await s.submit(A, [1], 5, expires=time.perf_counter() - 0.001)
        out, _ = await s.submit(A, [2], 5, expires=time.perf_counter() + 30)
        await s.close()
        return e.value.stage, rec.batches, out

    assert run(main()) == ("admission", [(A, [2])], [4])


def test_bad_limits():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Scheduler(lambda k, x: x, max_batch_size=0)
    with pytest.raises(ValueError, match="lanes=0"):
        Scheduler(lambda k, x: x, lanes=0)


# ---- several lanes: batches from one queue, run at once -----------------------------------------


class Lanes:
    """An async runner (as an inference worker pool's) that holds every batch until released, and
    records when each started and how many ran at once."""

    def __init__(self) -> None:
        self.started: list[tuple[tuple[float, float], list]] = []
        self.gates: list[asyncio.Event] = []
        self.active = self.most = 0

    async def run(self, key, items):
        gate = asyncio.Event()
        self.started.append((key, list(items)))
        self.gates.append(gate)
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await gate.wait()
        finally:
            self.active -= 1
        return [2 * x for x in items]


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_batches_from_one_queue_run_as_many_at_once_as_there_are_lanes(lanes):
    async def main():
        runner = Lanes()
        s = Scheduler(runner.run, lanes=lanes, max_wait_s=0.0, max_batch_size=4)
        s.start()
        keys = [A, B, (0.25, 0.5), (0.75, 0.75)]  # four groups: four batches
        tasks = [asyncio.create_task(s.submit(k, [i], 5)) for i, k in enumerate(keys)]
        await wait_for(lambda: len(runner.started) == lanes)
        await asyncio.sleep(0.01)  # time for the loop to start one too many, if it would
        busy, depth = len(runner.started), s.depth
        while len(runner.gates) < len(keys) or not all(g.is_set() for g in runner.gates):
            for g in runner.gates:
                g.set()
            await asyncio.sleep(0.001)
        outs = [out for out, _ in await asyncio.gather(*tasks)]
        await s.close()
        return busy, depth, runner.most, outs, [k for k, _ in runner.started]

    busy, depth, most, outs, order = run(main())
    assert busy == most == lanes  # never more than the lanes, and all of them used
    assert depth == 4  # running or waiting, all counted
    assert outs == [[0], [2], [4], [6]] and order == [A, B, (0.25, 0.5), (0.75, 0.75)]  # oldest first


def test_the_outlook_places_the_queued_batches_on_the_lane_that_comes_free_first():
    """Two lanes busy for about 1 s and 2 s; queued for A: a full batch (2 inputs, 2 s) and one of 1
    input (1 s). The full batch takes the lane free at 1 s (until 3 s); a newcomer to A joins the
    second batch, which starts on the other lane at 2 s; a new group would start at 3 s."""

    async def main():
        runner = Lanes()
        s = Scheduler(runner.run, lanes=2, max_wait_s=0.0, max_batch_size=2, predict=lambda k, b, t: 1.0 * b)
        s.start()
        x = asyncio.create_task(s.submit(B, [10], 5))  # lane 1: 1 s
        y = asyncio.create_task(s.submit((0.25, 0.5), [20, 21], 5))  # lane 2: 2 s
        await wait_for(lambda: len(runner.started) == 2)
        a1 = asyncio.create_task(s.submit(A, [1, 2], 5))
        a2 = asyncio.create_task(s.submit(A, [3], 5))
        await wait_for(lambda: s.depth == 4)
        look = s.outlook(1)
        # the same queue on one lane
        one_lane = Scheduler(runner.run, lanes=1, max_batch_size=2, predict=lambda k, b, t: 1.0 * b)
        one_lane._groups, one_lane._running = s._groups, s._running[:1]
        serial = one_lane.outlook(1)
        runner.gates[0].set()  # lane 1 free: A's first batch starts on it
        await wait_for(lambda: len(runner.started) == 3)
        runner.gates[1].set()  # lane 2 free: A's second batch
        await wait_for(lambda: len(runner.started) == 4)
        for g in runner.gates:
            g.set()
        await asyncio.gather(x, y, a1, a2)
        await s.close()
        return look, serial, runner.started

    look, serial, started = run(main())
    assert look(A).ahead_s == pytest.approx(2.0, abs=0.05) and pend(look(A)) == (1, 5)
    assert look.rest.ahead_s == pytest.approx(3.0, abs=0.05)
    # one lane (busy for 1 s): the same batches one after the other
    assert serial(A).ahead_s == pytest.approx(3.0, abs=0.05) and serial.rest.ahead_s == pytest.approx(
        4.0, abs=0.05
    )
    assert [items for _, items in started] == [[10], [20, 21], [1, 2], [3]]


def test_close_with_several_lanes_finishes_the_batches_running():
    async def main():
        runner = Lanes()
        s = Scheduler(runner.run, lanes=2, max_wait_s=0.0)
        s.start()
        tasks = [asyncio.create_task(s.submit(k, [i], 5)) for i, k in enumerate((A, B))]
        await wait_for(lambda: len(runner.started) == 2)
        closing = asyncio.create_task(s.close(timeout_s=10))
        await asyncio.sleep(0.01)
        still_closing = not closing.done()
        for g in runner.gates:
            g.set()
        await closing
        with pytest.raises(QueueFull, match="shutting down"):
            await s.submit(A, [9], 5)
        return still_closing, [out for out, _ in await asyncio.gather(*tasks)]

    still_closing, outs = run(main())
    assert still_closing and outs == [[0], [2]]


# ---- the outlook against what the loop runs (hypothesis) ---------------------------------------

KEYS = [A, B, (0.25, 0.5)]


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 5)), max_size=10),
    newcomer=st.tuples(st.sampled_from(KEYS), st.integers(1, 5)),
    max_batch=st.integers(1, 8),
)
def test_the_outlook_predicts_the_batch_a_newcomer_runs_in_and_the_work_before_it(jobs, newcomer, max_batch):
    """For any queue: the newcomer runs in a batch of ``look.inputs`` + its own inputs, after
    exactly ``look.ahead_s`` of predicted work (1 s per input here; the running batch's second)."""
    key, n = newcomer

    async def main():
        rec, s, running = await held(B, (0,), 1, max_batch_size=max_batch, max_wait_s=0.0,
                                     predict=lambda k, b, t: float(b))  # fmt: skip
        tasks = [
            asyncio.create_task(s.submit(k, [f"{i}.{j}" for j in range(m)], 1))
            for i, (k, m) in enumerate(jobs)
        ]
        await wait_for(lambda: s.depth == 1 + len(jobs))
        look = s.outlook(n)(key)
        tasks.append(asyncio.create_task(s.submit(key, ["new"] * n, 1)))
        await wait_for(lambda: s.depth == 2 + len(jobs))
        rec.gate.set()
        await asyncio.gather(running, *tasks)
        await s.close()
        return look, rec.batches

    look, batches = run(main())
    at = next(i for i, (k, items) in enumerate(batches) if "new" in items)
    assert batches[at][0] == key and len(batches[at][1]) == look.inputs + n
    before = sum(len(items) for _, items in batches[1:at])  # the held batch (1 input) is running
    assert before <= look.ahead_s <= before + 1.0 + 1e-6


def test_a_batch_s_bookkeeping_goes_through_defer_after_its_answers():
    from service.later import Later

    async def main():
        seen: list[tuple] = []
        later = Later(0.01)
        s = Scheduler(Recorder(), max_wait_s=0.0, on_batch=lambda *a: seen.append(a), defer=later)
        s.start()
        out, _ = await s.submit(A, [3], 7)
        assert out == [6] and seen == [] and later.pending == 1  # answered; the feedback waits
        await wait_for(lambda: seen)
        await s.close()
        return seen

    ((key, n, tokens, seconds),) = run(main())
    assert (key, n, tokens) == (A, 1, 7) and seconds >= 0


@pytest.mark.parametrize("packed", [False, True])
def test_a_batch_costs_its_longest_row_padded_and_its_mean_row_unpadded(packed):
    """The tokens the scheduler predicts (and reports) a batch with: every row at the longest
    one's length for a padded forward pass, the rows' mean length for an unpadded one (the CPU's):
    requests of 1 x 60 tokens and 3 x 20 tokens make (4 rows, 60) padded and (4 rows, 30) packed,
    in the queue's outlook, in the batch cut and in the batch that runs."""
    asked: list[tuple[int, int]] = []
    ran: list[tuple[int, int]] = []

    def predict(key, b, t):
        asked.append((b, t))
        return 0.001

    async def main():
        rec, s, running = await held(
            B,
            (0,),
            1,
            max_batch_size=8,
            max_wait_s=0.0,
            predict=predict,
            on_batch=lambda key, n, t, sec: ran.append((n, t)),
            packed=packed,
        )
        now = time.perf_counter()
        tasks = [
            asyncio.create_task(s.submit(A, [1], 60, deadline=now + 100)),
            asyncio.create_task(s.submit(A, [2, 3, 4], 20, deadline=now + 100)),
        ]
        await wait_for(lambda: s.depth == 3)
        look = s.outlook(1)(A)
        asked.clear()
        s.predicted_span_s(A, 2, 10)
        span = list(asked)
        asked.clear()
        rec.gate.set()
        await asyncio.gather(running, *tasks)
        await s.close()
        return look, span

    look, span = run(main())
    want = 30 if packed else 60
    assert (look.inputs, look.tokens) == (4, want)
    assert (4, want) in asked  # the batch cut priced it so
    assert ran[-1] == (4, want)
    # a newcomer of 2 rows of 10 tokens joining those 4 rows: (6, 23.3 -> 24) packed, (6, 60) padded
    assert span[-1] == (6, 24 if packed else 60)
    assert merge_tokens(4, want, 2, 10, packed) == (24 if packed else 60)
    assert merge_tokens(0, 0, 3, 17, packed) == 17


def test_quiet_means_the_running_batch_is_all_the_work_at_a_low_arrival_rate():
    # the condition under which the server's event loop busy-polls for a batch's answer
    async def main():
        predicted = 0.010  # every batch is predicted at 10 ms
        rec, s, first = await held(predict=lambda key, b, t: predicted)
        t0 = s._last_arrival
        for i in range(1, 21):  # 1 req/s lately: the next request is not due before the batch ends
            s._note_arrival(t0 + i * 1.0)
        quiet_alone = s.quiet()
        second = asyncio.create_task(s.submit(B, [2], 5))  # now one waits behind it
        await wait_for(lambda: s.depth == 2)
        quiet_with_one_waiting = s.quiet()
        rec.gate.set()
        await asyncio.gather(first, second)
        t0 = s._last_arrival
        for i in range(1, 41):  # 1000 req/s: the next one comes within the batch
            s._note_arrival(t0 + i * 0.001)
        s._running = [[1, time.perf_counter(), predicted]]  # (as _loop sets it)
        quiet_busy_rate = s.quiet()
        t0 = s._last_arrival
        for i in range(1, 41):  # back to 1 req/s, but two batches run (two lanes)
            s._note_arrival(t0 + i * 1.0)
        s._running = [[1, time.perf_counter(), predicted], [1, time.perf_counter(), predicted]]
        quiet_two_running = s.quiet()
        s._running = [[1, time.perf_counter(), predicted]]
        assert s.quiet()  # (the rate alone would allow it)
        s._running = []
        idle = s.quiet()
        await s.close()
        return quiet_alone, quiet_with_one_waiting, quiet_busy_rate, quiet_two_running, idle

    alone, one_waiting, busy_rate, two_running, idle = run(main())
    assert alone and not one_waiting and not busy_rate and not two_running and not idle
