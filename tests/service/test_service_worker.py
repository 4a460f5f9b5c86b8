"""The inference worker process (service/worker.py): the forward pass of a served model in a
child process, against the tiny real checkpoints of tests/conftest.py.

Each worker start spawns a Python that imports torch (seconds), so the tests share workers
where they can."""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient

from model.checkpoint import CheckpointError
from service import worker as wire
from service.app import create_app
from service.engine import Engine
from service.load import LoadMonitor, LoadReading, affinity, cpu_ticks, other_share
from service.profile import LatencyProfile
from service.settings import Settings
from service.worker import Calibration, InferenceWorker, WorkerDied

TEXTS = ["a gripping, beautifully made film", "dull", "it is neither good nor bad, just long"]


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def cls_worker(tiny_cls_checkpoint):
    started: list[int] = []
    w = InferenceWorker(tiny_cls_checkpoint, threads=1, on_start=started.append)
    profile = w.start(Calibration(batches=(1, 2), tokens=(8, 16), use_cache=False, threads=(1, 2)))
    yield w, profile, started
    w.close()


def test_worker_calibrates_in_its_own_process_and_matches_the_in_process_forward(
    cls_worker, tiny_cls_checkpoint
):
    w, profile, started = cls_worker
    assert started == [w.pid] and w.pid != os.getpid() and w.alive()
    engine = Engine.load(tiny_cls_checkpoint)
    keys = [s.key for s in engine.subnets]
    # the profile was measured by the worker: every sub-network, the requested grid, at each
    # thread count asked for
    assert profile is not None and profile["source"] == "calibrated"
    rows = profile["json"]["subnetworks"]
    assert {(r["width"], r["depth"], r["threads"]) for r in rows} == {
        (w, d, n) for w, d in keys for n in (1, 2)
    }
    assert all({(b, t) for b, t, _ in r["points"]} == {(1, 8), (1, 16), (2, 8), (2, 16)} for r in rows)
    assert LatencyProfile.from_json(profile["json"]).thread_counts == (1, 2)
    rows = engine.encode_texts(TEXTS).rows
    for key in keys:
        got, seconds = w.run(key, *engine.pack(rows), threads=1)
        assert 0 < seconds < 10  # timed inside the worker
        want = np.stack(engine.run(key, rows))
        np.testing.assert_allclose(np.stack(engine.run(key, rows, chunk=2)), want, rtol=1e-5, atol=1e-6)
        assert got.shape == want.shape == (3, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_failing_batch_is_an_error_and_the_worker_keeps_serving(cls_worker, tiny_cls_checkpoint):
    w, _, started = cls_worker
    engine = Engine.load(tiny_cls_checkpoint)
    ids, mask, types = engine.pack(engine.encode_texts(TEXTS).rows)
    with pytest.raises(RuntimeError, match="inference failed in the worker: IndexError"):
        w.run((1.0, 1.0), ids + 10**6, mask, types)  # token ids past the vocabulary
    with pytest.raises(RuntimeError, match="inference failed in the worker"):
        w.run((1.5, 1.0), ids, mask, types)  # not a width at all
    assert w.run((1.0, 1.0), ids, mask, types)[0].shape == (3, 2)
    assert w.restarts == 0 and len(started) == 1


def test_the_wire_format_carries_batches_and_answers_exactly_and_refuses_anything_else():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30_000, size=(3, 7))
    mask = (rng.random((3, 7)) > 0.3).astype(np.int64)
    for types in (np.zeros_like(ids), None):
        msg = wire.encode_batch((0.25, 0.5), 2, ids, mask, types)
        key, threads, ids2, mask2, types2 = wire.decode_batch(msg)
        assert key == (0.25, 0.5) and threads == 2
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(mask2, mask)
        assert (types2 is None) == (types is None)
        assert ids2.flags.writeable and ids2.dtype == np.int64  # torch.from_numpy wants writable
        with pytest.raises(wire.WireError, match="cannot be"):
            wire.decode_batch(msg[:-8])
    # logits of classification (B, C) and QA (B, T, 2), float32 exactly
    for out in (rng.standard_normal((3, 2)), rng.standard_normal((2, 9, 2))):
        status, (got, seconds) = wire.decode_answer(wire.encode_result(out, 0.0125))
        assert status == "ok" and seconds == 0.0125 and got.shape == out.shape
        np.testing.assert_array_equal(got, out.astype(np.float32))
    assert wire.decode_answer(wire.encode_json(wire.READY, {"json": {"a": [1, 2]}})) == (
        "ready", {"json": {"a": [1, 2]}},
    )  # fmt: skip
    assert wire.decode_answer(wire.ERROR + b"IndexError: x") == ("error", "IndexError: x")
    # a pickle is not a message: nothing on this socket is unpickled
    for bad in (pickle.dumps(("ok", (np.zeros(2), 0.1))), b"", wire.OK + b"\x00" * 3):
        with pytest.raises(wire.WireError):
            wire.decode_answer(bad)
        with pytest.raises(wire.WireError):
            wire.decode_batch(bad)


def test_the_worker_answers_a_message_it_cannot_read_with_an_error_and_keeps_serving(
    cls_worker, tiny_cls_checkpoint
):
    w, _, started = cls_worker
    engine = Engine.load(tiny_cls_checkpoint)
    packed = engine.pack(engine.encode_texts(TEXTS).rows)
    with w._lock:  # what a pickling sender would have written: refused, never unpickled
        w._conn.send_bytes(pickle.dumps(((1.0, 1.0), 0, *packed)))
        status, message = wire.decode_answer(w._conn.recv_bytes())
    assert status == "error" and message.startswith("WireError: not a batch message")
    assert w.run((1.0, 1.0), *packed)[0].shape == (3, 2)
    assert w.restarts == 0 and len(started) == 1


def test_batches_and_answers_larger_than_the_socket_buffer_cross_whole(tiny_qa_checkpoint):
    # the server's event loop (uvloop) reads answers through a transport, which makes the socket
    # (and the blocking path's descriptor, a duplicate of it) non-blocking: a message larger than
    # the socket's buffer (a big QA batch: about 2 MB out and 0.7 MB back here) must still be
    # written and read whole, arriving over many reads, and the blocking path must work after it
    import uvloop

    rng = np.random.default_rng(1)
    b, t = 512, 160
    ids = rng.integers(1000, 2000, size=(b, t))
    mask, types = np.ones_like(ids), np.zeros_like(ids)
    w = InferenceWorker(tiny_qa_checkpoint, threads=1)

    async def scenario() -> list[np.ndarray]:
        outs = [(await w.run_async((0.25, 0.5), ids, mask, types))[0] for _ in range(3)]
        w.detach()  # the socket's transport closes with this loop, not after it
        return outs

    try:
        w.start(None)
        outs = uvloop.run(scenario())
        outs.append(w.run((0.25, 0.5), ids, mask, types)[0])  # and the blocking path after it
        assert w.restarts == 0
    finally:
        w.close()
    assert outs[0].shape == (b, t, 2)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_the_link_reassembles_answers_however_the_reads_split_them():
    # the event loop hands _Link whatever each read returned: one answer over many reads, many
    # answers in one read, the 2 GiB header form (-1, then 8 bytes); each completes its batch
    rng = np.random.default_rng(7)
    msgs = [b"O" + rng.bytes(n) for n in (0, 3, 1, 100, 70_000)]
    frames = [wire._LEN.pack(len(m)) + m for m in msgs]
    frames[2] = wire._LEN.pack(-1) + wire._LEN64.pack(len(msgs[2])) + msgs[2]
    stream = b"".join(frames)

    class Collect(wire._Link):  # the framing alone (one batch in flight takes one answer)
        def _answer(self, msg: bytes) -> None:
            got.append(msg)

    def feed(cuts: list[int]) -> list[bytes]:
        got.clear()
        link = Collect(None, None, None)  # type: ignore[arg-type]
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            link.data_received(stream[a:b])
        assert not link.buf
        return list(got)

    got: list[bytes] = []
    splits = [[], list(range(1, len(stream))), [2], [4], [5], [13], [len(frames[0]) + 2]]
    splits += [
        sorted(rng.choice(np.arange(1, len(stream)), size=k, replace=False).tolist()) for k in (3, 30, 300)
    ]
    for cuts in splits:
        assert feed(cuts) == msgs, cuts


def test_a_worker_that_dies_during_a_batch_fails_it_at_once_and_a_stray_answer_resets_the_link(
    tiny_cls_checkpoint,
):
    engine = Engine.load(tiny_cls_checkpoint)
    packed = engine.pack(engine.encode_texts(TEXTS).rows)
    w = InferenceWorker(tiny_cls_checkpoint, threads=1, batch_timeout_s=600.0)

    async def scenario() -> None:
        want, _ = await w.run_async((0.5, 0.75), *packed)
        # killed while it holds a batch (stopped first, so that the batch surely waits): the
        # closed socket fails the batch at once (not at the 600 s timeout) and the retry on a
        # new worker answers it
        doomed = w.pid
        os.kill(doomed, signal.SIGSTOP)
        task = asyncio.create_task(w.run_async((0.5, 0.75), *packed))
        await asyncio.sleep(0.2)
        assert not task.done()
        os.kill(doomed, signal.SIGKILL)
        np.testing.assert_array_equal((await asyncio.wait_for(task, 120))[0], want)
        assert w.restarts == 1 and w.pid != doomed
        # an answer no batch asked for (the stream out of step): the link closes, and the next
        # batch starts a new worker instead of reading that answer as its own
        first = w.pid
        w._link._answer(b"O")
        np.testing.assert_array_equal((await w.run_async((0.5, 0.75), *packed))[0], want)
        assert w.restarts == 2 and w.pid != first
        w.detach()

    try:
        w.start(None)
        asyncio.run(scenario())
        # a second event loop (the server's after its warm-up loop), then the blocking path
        want = w.run((0.5, 0.75), *packed)[0]

        async def again() -> np.ndarray:
            out = (await w.run_async((0.5, 0.75), *packed))[0]
            w.detach()
            return out

        import uvloop

        np.testing.assert_array_equal(uvloop.run(again()), want)
        np.testing.assert_array_equal(asyncio.run(again()), want)
        np.testing.assert_array_equal(w.run((0.5, 0.75), *packed)[0], want)
        assert w.restarts == 2
    finally:
        w.close()


def test_the_worker_ignores_termination_signals_meant_for_the_server(cls_worker, tiny_cls_checkpoint):
    # Ctrl-C and `kill -TERM -PGID` reach the whole process group; the server finishes its
    # in-flight requests first and then closes the worker itself
    w, _, _ = cls_worker
    engine = Engine.load(tiny_cls_checkpoint)
    packed = engine.pack(engine.encode_texts(TEXTS).rows)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(w.pid, sig)
    time.sleep(0.3)
    assert w.alive() and w.run((1.0, 1.0), *packed)[0].shape == (3, 2)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling classes")
def test_every_worker_thread_yields_the_core_on_wake_up_and_the_server_does_not(
    cls_worker, tiny_cls_checkpoint
):
    # SCHED_BATCH (service.worker.batch_scheduling): a batch sent to the worker must not preempt
    # the event loop that sent it. The OpenMP threads a 2-thread batch starts inherit the class.
    w, _, _ = cls_worker
    engine = Engine.load(tiny_cls_checkpoint)
    assert w.run((1.0, 1.0), *engine.pack(engine.encode_texts(TEXTS * 8).rows), threads=2)[0].shape == (24, 2)
    tids = [t.id for t in psutil.Process(w.pid).threads()]
    assert len(tids) >= 2
    assert {tid: os.sched_getscheduler(tid) for tid in tids} == {tid: os.SCHED_BATCH for tid in tids}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the server's own threads keep theirs


def test_a_dead_or_hung_worker_fails_its_batch_and_is_replaced(tiny_qa_checkpoint):
    started: list[int] = []
    w = InferenceWorker(tiny_qa_checkpoint, threads=1, on_start=started.append)
    try:
        assert w.start(None) is None  # no calibration asked: no profile
        engine = Engine.load(tiny_qa_checkpoint)
        enc, _ = engine.encode_qa(["who?"], ["a long context " * 20], doc_stride=16)
        ids, mask, types = engine.pack(enc.rows)
        first, _ = w.run((1.0, 1.0), ids, mask, types)
        assert first.shape == (*ids.shape, 2)  # QA: start and end logits per token
        np.testing.assert_allclose(first, np.stack(engine.run((1.0, 1.0), enc.rows)), rtol=1e-5, atol=1e-6)
        old = w.pid
        os.kill(old, signal.SIGKILL)
        assert wait_dead(old)
        # the next batch finds it gone: a new worker answers it
        np.testing.assert_allclose(w.run((1.0, 1.0), ids, mask, types)[0], first, rtol=1e-5, atol=1e-6)
        assert w.restarts == 1 and w.pid != old and started == [old, w.pid]
        # a worker that stops answering is killed after the batch timeout; its batch fails
        w.batch_timeout_s = 1.0
        hung = w.pid
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(WorkerDied, match="no answer within 1 s"):
            w.run((1.0, 1.0), ids, mask, types)
        assert wait_dead(hung)
        assert w.run((1.0, 1.0), ids, mask, types)[0].shape == first.shape
        assert w.restarts == 2 and len(started) == 3
    finally:
        w.close()
    assert not w.alive() and wait_dead(started[-1])


def test_the_event_loop_waits_for_the_worker_without_blocking_and_survives_its_failures(
    tiny_cls_checkpoint,
):
    # run_async (the server's path): the same logits as run; the loop keeps running while the
    # worker works; death, a hang and a cancelled batch each leave a working worker behind
    engine = Engine.load(tiny_cls_checkpoint)
    packed = engine.pack(engine.encode_texts(TEXTS).rows)
    started: list[int] = []
    w = InferenceWorker(tiny_cls_checkpoint, threads=1, on_start=started.append)

    async def scenario() -> None:
        want, _ = w.run((0.5, 0.75), *packed)
        got, seconds = await w.run_async((0.5, 0.75), *packed)
        np.testing.assert_array_equal(got, want)
        assert 0 < seconds < 10
        # a stopped worker: the loop goes on ticking while the batch waits for it
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        os.kill(w.pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(0.5, os.kill, w.pid, signal.SIGCONT)
        got, _ = await w.run_async((0.5, 0.75), *packed)
        ticker.cancel()
        np.testing.assert_array_equal(got, want)
        assert ticks >= 20, ticks
        # killed between batches: replaced, and the batch answered
        old = w.pid
        os.kill(old, signal.SIGKILL)
        assert wait_dead(old)
        np.testing.assert_array_equal((await w.run_async((0.5, 0.75), *packed))[0], want)
        assert w.restarts == 1 and w.pid != old
        # hung past the batch timeout: killed, the batch fails, the next one gets a new worker
        patience, w.batch_timeout_s = w.batch_timeout_s, 1.0
        hung = w.pid
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(WorkerDied, match="no answer within 1 s"):
            await w.run_async((0.5, 0.75), *packed)
        w.batch_timeout_s = patience  # 1 s was for the hung one, not a new one's first batch under load
        assert wait_dead(hung)
        np.testing.assert_array_equal((await w.run_async((0.5, 0.75), *packed))[0], want)
        assert w.restarts == 2
        # a batch cancelled in flight (a shutdown past its timeout): its answer must not be read
        # as the next batch's, so that worker is killed and the next batch starts a new one
        slow = w.pid
        os.kill(slow, signal.SIGSTOP)  # the batch surely waits for its answer when cancelled
        task = asyncio.create_task(w.run_async((0.5, 0.75), *packed))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wait_dead(slow)
        np.testing.assert_array_equal((await w.run_async((0.5, 0.75), *packed))[0], want)
        assert w.restarts == 3 and len(started) == 4
        # found dead by the batch while not yet reapable (a killed worker's socket closes before
        # its process can be waited for, and wait_dead already sees it as a zombie: the kills
        # above race the next batch so): the retry must start a new worker, not find this one
        # again. Made certain here: the worker is gone, its socket closed, and a process that is
        # still running stands in for it
        dead = w.pid
        os.kill(dead, signal.SIGKILL)
        assert wait_dead(dead) and w._proc is not None
        w._proc.wait(10)
        dying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        w._proc = dying
        try:
            assert w.alive()
            np.testing.assert_array_equal((await w.run_async((0.5, 0.75), *packed))[0], want)
            assert w.restarts == 4 and len(started) == 5 and w.pid not in (dead, dying.pid)
            assert dying.poll() is not None  # reaped (killed: it would not exit), not left running
        finally:
            dying.kill()
            dying.wait()
        # a failing batch is an error, not a death
        with pytest.raises(RuntimeError, match="inference failed in the worker"):
            await w.run_async((1.5, 1.0), *packed)
        assert w.restarts == 4
        w.detach()

    try:
        w.start(None)
        asyncio.run(scenario())
    finally:
        w.close()
    assert all(wait_dead(pid) for pid in started)


def test_a_worker_spawned_early_is_the_one_started_and_one_never_started_exits(tiny_cls_checkpoint):
    """spawn() starts the process (it imports torch) before the server has loaded its own side;
    start() then configures that same process. Closed without a start, it exits cleanly."""
    w = InferenceWorker(tiny_cls_checkpoint, threads=1)
    w.spawn()
    early = w._spawned[0]
    assert early.poll() is None and not w.alive()  # running, but not serving: /readyz stays 503
    try:
        assert w.start(None) is None and w.pid == early.pid and w.alive()
        ids, mask = np.array([[101, 2204, 102]]), np.ones((1, 3), dtype=np.int64)
        logits, seconds = w.run((1.0, 1.0), ids, mask, None)
        assert logits.shape == (1, 2) and seconds > 0
    finally:
        w.close()
    unused = InferenceWorker(tiny_cls_checkpoint, threads=1)
    unused.spawn()
    proc = unused._spawned[0]
    unused.close(timeout_s=30)
    assert proc.returncode == 0 and unused._spawned is None


def test_a_worker_that_cannot_load_says_why(tmp_path):
    w = InferenceWorker(tmp_path / "not-a-checkpoint", threads=1)
    with pytest.raises(WorkerDied, match="failed to start: .*not-a-checkpoint"):
        w.start(None)
    assert not w.alive()


def _spin_on(cpu: int | None = None) -> subprocess.Popen:
    """A process spinning on one core (pinned to ``cpu`` when given) for up to 30 s."""
    pin = f"os.sched_setaffinity(0, {{{cpu}}})\n" if cpu is not None else ""
    code = f"import os, time\n{pin}t = time.time()\nwhile time.time() - t < 30: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def _sleeper() -> subprocess.Popen:
    """A process that sleeps for 30 s: an idle inference worker's stand-in."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_the_load_monitor_counts_worker_processes_as_the_servers_own_cpu():
    # a process burning one core, registered as a worker: not "another tenant" (cpu_other),
    # not the server's front end (cpu_front), but part of the machine's use
    burn = _spin_on()
    try:
        monitor = LoadMonitor(interval_s=10.0)  # sampled by hand below
        monitor.sample()
        monitor.add_process(burn.pid)
        time.sleep(1.0)
        r = monitor.sample()
        share = 1 / monitor.cores  # one core's share of the cores the server may use
        assert r.cpu >= 0.7 * share, r
        assert r.cpu_front < 0.3 * share, r
        assert r.cpu_other <= r.cpu - 0.7 * share, r
    finally:
        burn.kill()
        burn.wait()


def test_the_app_serves_from_worker_processes_and_stops_them_on_shutdown(tiny_cls_checkpoint):
    def settings(mode: str) -> Settings:
        return Settings(
            checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=1, inference_worker=mode
        )

    pin = {"X-DynaBERT-Width": "0.5", "X-DynaBERT-Depth": "0.75"}
    with TestClient(create_app(settings("thread"))) as c:
        assert c.app.state.dynabert.get(None).workers == []
        want = c.post("/v1/classify", json={"text": TEXTS}, headers=pin).json()["results"]
    app = create_app(settings("process"))
    with TestClient(app) as c:
        state = app.state.dynabert
        worker = state.get(None).workers[0]
        assert worker is not None and worker.alive() and worker.pid != os.getpid()
        pid = worker.pid
        restarts_before = _restarts_metric(c)  # process-wide: other tests' apps count too
        assert state.get(None).engine.model is None  # the server keeps no second copy of the weights
        # the load monitor counts the worker's CPU as the server's own, not another tenant's
        assert pid in state.monitor.pids(state.get(None).engine.name)
        r = c.post("/v1/classify", json={"text": TEXTS}, headers=pin)
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["label"] for g in got] == [x["label"] for x in want]
        for g, x in zip(got, want, strict=True):
            assert g["scores"] == pytest.approx(x["scores"], abs=1e-6)
        # the worker dies: /readyz turns 503 while the server's watchdog starts a new one, then
        # 200 again without any request having asked; the restart is counted
        os.kill(pid, signal.SIGKILL)
        assert wait_dead(pid)
        # (its main thread can show as a zombie while its other threads still exit, and it is
        # only reapable, so not yet gone to the server, after them: wait for the server to see it)
        end = time.monotonic() + 10
        while (r := c.get("/readyz")).status_code == 200 and time.monotonic() < end:
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["workers_restarting"] == ["tiny-sst2"]
        end = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.2)
        assert c.get("/readyz").status_code == 200 and worker.alive()
        assert worker.pid != pid and worker.restarts == 1
        r = c.post("/v1/classify", json={"text": TEXTS}, headers=pin)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["scores"] == pytest.approx(want[0]["scores"], abs=1e-6)
        assert worker.restarts == 1  # the request did not need another
        assert _restarts_metric(c) == restarts_before + 1
        pid = worker.pid
    assert wait_dead(pid)
    # shutting down closes the worker; the watchdog (stopped first) must not take that for a death
    time.sleep(1.5)
    assert worker.restarts == 1 and not worker.alive() and worker.closing


def _restarts_metric(c: TestClient) -> float:
    m = re.search(r'dynabert_worker_restarts_total\{model="tiny-sst2"\} ([0-9.]+)', c.get("/metrics").text)
    assert m is not None
    return float(m.group(1))


def test_a_model_that_fails_to_load_in_the_server_leaves_no_worker_behind(tiny_cls_checkpoint, tmp_path):
    """The worker is spawned before the server loads its side of the model; when that load
    fails, the spawned worker is closed with it."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cls_checkpoint, broken)
    (broken / "tokenizer.json").write_text("{not json")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    app = create_app(
        Settings(checkpoints=[str(broken)], calibrate=False, torch_threads=1, inference_worker="process")
    )
    with pytest.raises(CheckpointError, match=r"broken: tokenizer files unreadable"), TestClient(app):
        pass
    spawned = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert all(wait_dead(p.pid) for p in spawned), [p.cmdline() for p in spawned]


def test_busy_poll_keeps_the_loop_awake_until_the_answer_or_its_limit_then_lets_it_sleep():
    # the event loop's thread burns CPU while it polls (it does not sleep in epoll), and none
    # once the answer is in or the limit has passed
    async def cpu_share(awaitable) -> float:
        """The loop thread's CPU time over the wall time of awaiting ``awaitable``."""
        t, c = time.perf_counter(), time.thread_time()
        await awaitable
        return (time.thread_time() - c) / (time.perf_counter() - t)

    async def main(poll_s: float) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        wire.busy_poll(loop, answered, poll_s)
        loop.call_later(0.1, answered.set_result, b"")
        during = await cpu_share(answered)
        after = await cpu_share(asyncio.sleep(0.1))
        return during, after

    during, after = asyncio.run(main(poll_s=5.0))
    assert during > 0.5 and after < 0.2, (during, after)

    # a limit shorter than the wait: polling stops at it, long before the answer
    async def limited() -> float:
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        wire.busy_poll(loop, answered, 0.01)
        loop.call_later(0.2, answered.set_result, b"")
        await asyncio.sleep(0.05)  # past the limit
        return await cpu_share(answered)

    assert asyncio.run(limited()) < 0.2

    # and without polling the loop sleeps through the same wait
    async def sleeping() -> float:
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        loop.call_later(0.1, answered.set_result, b"")
        return await cpu_share(answered)

    assert asyncio.run(sleeping()) < 0.2


def test_a_batch_answered_while_the_loop_busy_polls_is_the_same_batch(cls_worker, tiny_cls_checkpoint):
    w = cls_worker[0]
    eng = Engine.load(tiny_cls_checkpoint)
    packed = eng.pack(eng.encode_texts(TEXTS).rows)
    want, _ = w.run((0.5, 0.75), *packed)

    async def main():
        try:
            return await w.run_async((0.5, 0.75), *packed, poll_s=5.0)
        finally:
            w.detach()

    got, seconds = asyncio.run(main())
    np.testing.assert_array_equal(got, want)
    assert seconds > 0


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1"
)
def test_the_load_monitor_reads_other_tenants_on_the_cores_the_server_may_use_only():
    # real spinning processes pinned to one core, read by monitors of different CPU sets: load on
    # a CPU outside the server's cpuset, or on one its CPU quota leaves to the others, is no
    # contention (read over the whole host it was half the cores busy, a 1.5x slow-down)
    def read(monitor: LoadMonitor) -> LoadReading:
        monitor.sample()
        time.sleep(1.0)
        return monitor.sample()

    hog = _spin_on(1)
    try:
        time.sleep(0.2)  # (pinned and spinning)
        assert read(LoadMonitor(interval_s=10.0, cpus=frozenset({0}), cores=1)).cpu_other < 0.3
        assert read(LoadMonitor(interval_s=10.0, cpus=frozenset({0, 1}), cores=1)).cpu_other < 0.3  # quota 1
        both = read(LoadMonitor(interval_s=10.0, cpus=frozenset({0, 1}), cores=2))
        assert 0.35 < both.cpu_other < 0.8 and 0.35 < both.cpu < 0.8, both  # no quota: one core of two
        on_ours = read(LoadMonitor(interval_s=10.0, cpus=frozenset({1}), cores=1))
        assert on_ours.cpu_other > 0.7 and on_ours.cpu > 0.7, on_ours  # the hog's core is the server's
    finally:
        hog.kill()
        hog.wait()


def test_a_model_s_load_reading_counts_the_other_models_inference_as_contention():
    # two served models' workers (real processes): the QA model's is spinning, the classifier's
    # idle. For the classifier's policy the busy QA worker takes a core as another tenant would;
    # for the QA model, and for the server as a whole (the gauges), it is the server's own work
    burn = _spin_on()
    idle = _sleeper()
    try:
        monitor = LoadMonitor(interval_s=10.0)  # sampled by hand
        monitor.add_process(burn.pid, "squad")
        monitor.add_process(idle.pid, "sst2")
        assert monitor.pids("squad") == {burn.pid} and monitor.pids() == {burn.pid, idle.pid}
        monitor.sample()
        time.sleep(1.0)
        server = monitor.sample()
        share = 1 / monitor.cores  # one core's share of the cores the server may use
        assert monitor.reading() is server and monitor.reading("not-a-model") is server
        sst2, squad = monitor.reading("sst2"), monitor.reading("squad")
        assert sst2.cpu_other - server.cpu_other >= 0.7 * share, (sst2, server)  # the QA worker's core
        assert squad.cpu_other == pytest.approx(server.cpu_other, abs=0.1 * share)  # its own, and an idle one
        # the device's busy time likewise (a GPU at 90%, all of it the QA model's batches)
        monitor._gpu.read = lambda: 0.9
        monitor.add_busy(60.0, "squad")
        monitor.sample()
        assert monitor.reading("squad").gpu_other == 0.0 and monitor.reading().gpu_other == 0.0
        assert monitor.reading("sst2").gpu_other == pytest.approx(0.9)
    finally:
        for p in (burn, idle):
            p.kill()
            p.wait()


def test_models_served_side_by_side_register_their_workers_under_their_names(
    tiny_cls_checkpoint, tiny_qa_checkpoint
):
    app = create_app(
        Settings(
            checkpoints=[f"cls={tiny_cls_checkpoint}", f"squad={tiny_qa_checkpoint}"],
            calibrate=False, torch_threads=1, inference_worker="process",
        )
    )  # fmt: skip
    with TestClient(app):
        state = app.state.dynabert
        for name in ("cls", "squad"):
            assert state.monitor.pids(name) == {w.pid for w in state.models[name].workers} != set()
        state.monitor.sample()
        for name in ("cls", "squad"):  # each policy reads its model's view of the load
            assert state.models[name].policy._load() is state.monitor.reading(name)


def test_other_tenants_fill_the_cores_a_cpu_quota_leaves_them_before_they_compete():
    assert other_share(busy_cores=1.5, own_cores=0.5, cpus=2, usable=2) == 0.5  # no quota: all compete
    assert other_share(busy_cores=40.0, own_cores=2.0, cpus=64, usable=2) == 0.0  # 26 cores idle
    assert other_share(busy_cores=63.0, own_cores=0.0, cpus=64, usable=2) == 0.5  # 63 others: 1 on ours
    assert other_share(busy_cores=64.0, own_cores=0.0, cpus=64, usable=2) == 1.0
    assert other_share(busy_cores=0.5, own_cores=1.0, cpus=2, usable=2) == 0.0  # (sampling skew)
    # a quota of 1.5 cores on two: the others' first half core is the quota's leftover
    assert other_share(busy_cores=2.0, own_cores=1.0, cpus=2, usable=1.5) == pytest.approx(1 / 3)
    assert other_share(busy_cores=1.4, own_cores=1.0, cpus=2, usable=1.5) == 0.0


def test_cpu_ticks_reads_the_asked_cpus_by_number_with_steal_as_busy(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 6 300 3 0 0 9 0 0\n"
        "cpu0 10 0 2 100 1 0 0 3 0 0\n"
        "cpu2 20 0 4 200 2 0 0 6 5 0\n"  # cpu1 offline: numbers, not positions
        "intr 12345\nctxt 678\n"
    )
    assert cpu_ticks(frozenset({2}), stat) == {2: (30, 232)}  # user+system+steal; guest within user
    assert cpu_ticks(frozenset({0, 1, 2}), stat) == {0: (15, 116), 2: (30, 232)}
    assert set(cpu_ticks(affinity())) == affinity()  # this machine's /proc/stat (or psutil's times)


def test_the_load_monitor_leaves_the_event_loop_s_polling_out_of_the_front_end_s_cpu():
    # this process burns CPU in a thread (the "event loop") with a registered worker beside it,
    # so cpu_front is measured; time reported as polling is taken back out of it
    idle = _sleeper()

    def burn(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    try:
        monitor = LoadMonitor(interval_s=10.0)  # sampled by hand
        share = 1 / monitor.cores
        monitor.add_process(idle.pid)
        monitor.sample()
        burn(0.5)
        busy = monitor.sample()
        burn(0.5)
        monitor.add_polling(0.5)  # the same burn, reported as polling
        polled = monitor.sample()
        assert busy.cpu_front > 0.6 * share, busy
        assert polled.cpu_front < 0.3 * share, polled
    finally:
        idle.kill()
        idle.wait()


def test_the_default_instance_count_is_one_per_torch_thread_up_to_four_on_a_cpu_with_processes():
    import pydantic

    auto = Settings()  # instances 0: decided from the threads
    assert auto.inference_worker == "process" and auto.instances == 0
    assert [auto.instances_for(t) for t in (1, 2, 3, 4, 8, 16)] == [1, 2, 3, 4, 4, 4]
    assert Settings(inference_worker="thread").instances_for(8) == 1  # one batch at a time anyway
    assert Settings(device="cuda").instances_for(8) == 1  # the GPU runs the forward passes
    assert Settings(instances=3).instances_for(2) == 3  # a given count is kept
    with pytest.raises(pydantic.ValidationError, match="instances=2 needs inference_worker='process'"):
        Settings(inference_worker="thread", instances=2)


def test_the_cpu_quota_is_the_lowest_of_a_cgroup_and_its_parents_in_either_cgroup_version(tmp_path):
    from service.load import cpu_quota_cores

    def tree(cgroups: str, files: dict[str, str]) -> tuple[Path, Path]:
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "self").write_text(cgroups)
        return root / "fs", root / "self"

    # v2 (a Kubernetes pod): the container's own limit is the lowest; the pod's and "max" above it
    v2 = {"fs/kubepods/cpu.max": "max 100000\n", "fs/kubepods/pod1/cpu.max": "300000 100000\n",
          "fs/kubepods/pod1/ctr/cpu.max": "150000 100000\n"}  # fmt: skip
    assert cpu_quota_cores(*tree("0::/kubepods/pod1/ctr\n", v2)) == 1.5
    assert cpu_quota_cores(*tree("0::/\n", {"fs/cpu.max": "max 100000\n"})) is None  # no quota
    assert cpu_quota_cores(*tree("0::/\n", {"fs/cpu.max": "200000 100000\n"})) == 2.0  # a cgroup namespace
    # v1 (docker --cpus 2): the cpu controller's tree, other controllers ignored; -1 is no quota
    v1 = {"fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
          "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}  # fmt: skip
    assert cpu_quota_cores(*tree("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", v1)) == 2.0
    none = {"fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota_cores(*tree("1:cpu:/\n", none)) is None
    assert (
        cpu_quota_cores(*tree("garbage\n0::/\n", {"fs/cpu.max": "50000 100000"})) == 0.5
    )  # odd lines skipped
    assert cpu_quota_cores(tmp_path / "nowhere", tmp_path / "nowhere" / "cgroup") is None  # not Linux


def test_throttling_is_read_from_the_cpu_stat_of_the_cgroup_whose_quota_binds(tmp_path):
    """The kernel counts a quota's periods and the throttled ones in the ``cpu.stat`` of the
    cgroup that set it: the container's own (the lowest), not the pod's above it; the keys are the
    same in both versions (v1 adds throttled_time, v2 throttled_usec). No quota: no file, share 0."""
    from service.load import cpu_stat_file, throttle_counts, throttled_share

    root = tmp_path / "fs"
    for rel, text in {
        "kubepods/pod1/cpu.max": "300000 100000\n",
        "kubepods/pod1/cpu.stat": "usage_usec 9\nnr_periods 900\nnr_throttled 1\nthrottled_usec 5\n",
        "kubepods/pod1/ctr/cpu.max": "150000 100000\n",
        "kubepods/pod1/ctr/cpu.stat": "usage_usec 7\nnr_periods 400\nnr_throttled 100\nthrottled_usec 3\n",
        "cpu/docker/abc/cpu.cfs_quota_us": "50000\n",
        "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
        "cpu/docker/abc/cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 123456\n",
        "cpu/cpu.cfs_quota_us": "-1\n",
        "cpu/cpu.cfs_period_us": "100000\n",
        "cpu/cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "v2").write_text("0::/kubepods/pod1/ctr\n")
    (tmp_path / "v1").write_text("4:cpu:/docker/abc\n")
    (tmp_path / "none").write_text("4:cpu:/\n")
    v2 = cpu_stat_file(root, tmp_path / "v2")
    assert v2 == root / "kubepods/pod1/ctr/cpu.stat"
    assert throttle_counts(v2) == (400, 100)
    assert throttle_counts(cpu_stat_file(root, tmp_path / "v1")) == (10, 4)
    assert cpu_stat_file(root, tmp_path / "none") is None and throttle_counts(None) is None
    (root / "cpu/docker/abc/cpu.stat").write_text("garbage\n")
    assert throttle_counts(root / "cpu/docker/abc/cpu.stat") is None  # unreadable: no reading
    assert throttled_share((400, 100), (500, 150)) == 0.5  # 50 of the 100 periods since
    assert throttled_share((400, 100), (400, 100)) == 0.0  # idle: no period with work passed
    assert throttled_share(None, (500, 150)) == throttled_share((400, 100), None) == 0.0


def test_the_load_monitor_reports_the_share_of_periods_throttled_since_its_last_sample(tmp_path):
    stat = tmp_path / "cpu.stat"
    stat.write_text("nr_periods 1000\nnr_throttled 10\nthrottled_usec 1\n")
    monitor = LoadMonitor(interval_s=60, cpu_stat=stat)
    stat.write_text("nr_periods 1040\nnr_throttled 40\nthrottled_usec 2\n")
    assert monitor.sample().cpu_throttled == 0.75  # 30 of the 40 periods since it started
    assert monitor.sample().cpu_throttled == 0.0  # no period since
    assert LoadMonitor(interval_s=60, cpu_stat=tmp_path / "none").sample().cpu_throttled == 0.0


def test_a_real_cgroup_with_a_cpu_quota_reads_throttled(tmp_path):
    """A spinning process in a real cgroup (v1's cpu controller, where this host lets us make one)
    with a quota of a fifth of a core: the kernel throttles it in nearly every period, and the
    reading for that process says so; the same reading of this process (no quota here) is 0."""
    from service.load import cpu_stat_file, throttle_counts, throttled_share

    parent = Path("/sys/fs/cgroup/cpu")
    group = parent / f"dynabert-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup under {parent} here ({e})")
    spin = _spin_on()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("20000")
        (group / "cgroup.procs").write_text(str(spin.pid))
        stat = cpu_stat_file(cgroups=Path(f"/proc/{spin.pid}/cgroup"))
        assert stat == group / "cpu.stat"
        before = throttle_counts(stat)
        time.sleep(1.0)
        assert throttled_share(before, throttle_counts(stat)) > 0.8
    finally:
        spin.kill()
        spin.wait()
        for _ in range(50):  # the cgroup can be removed once its last task has gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.mark.parametrize("quota, setting", [(1.0, None), (None, 1.0), (1.5, None), (None, 1.5)])
def test_a_cpu_quota_below_torchs_threads_sets_the_threads_the_instances_and_the_capacity(
    tiny_cls_checkpoint, monkeypatch, caplog, quota, setting
):
    """In a container limited to one core on a bigger host, torch counts the host's cores: the
    server takes the quota's count instead, so the default runs one single-thread worker. Under a
    fractional quota (1.5: docker --cpus 1.5, a Kubernetes limit of 1500m) the threads round up
    (two single-thread workers) while the load readings and the policy count 1.5 cores, the CPU
    time the kernel lets them have. DYNABERT_CPU_CORES says the same where no quota can be read."""
    import torch

    from service import app as app_module
    from service import load as load_module

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if quota is not None:
            monkeypatch.setattr(load_module, "cpu_quota_cores", lambda: quota)
            monkeypatch.setattr(load_module, "affinity", lambda: frozenset(range(4)))
            monkeypatch.setattr(app_module, "cpu_capacity", load_module.cpu_capacity)
        want = quota or setting
        caplog.set_level("INFO", logger="service.app")
        app = create_app(Settings(checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, cpu_cores=setting))
        with TestClient(app) as c:
            served = app.state.dynabert.get(None)
            # one thread: one worker (two threads would have made two); 1.5: two of one thread
            assert [w.threads for w in served.workers] == [1] * math.ceil(want)
            assert app.state.dynabert.monitor.cores == served.policy.cores == want
            assert c.post("/v1/classify", json={"text": "fine"}).status_code == 200
        if want == 1.0:
            assert "torch threads: 1, the cores this process may use (of 2)" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_cpu_capacity_is_the_affinity_capped_by_the_quota_and_the_threads_round_up(monkeypatch):
    from service import load as load_module
    from service.load import cpu_capacity, usable_cores

    monkeypatch.setattr(load_module, "affinity", lambda: frozenset({0, 1, 2, 3}))
    for quota, capacity, threads in (
        (None, 4.0, 4),
        (1.5, 1.5, 2),
        (2.0, 2.0, 2),
        (0.5, 0.5, 1),
        (8.0, 4.0, 4),
    ):
        monkeypatch.setattr(load_module, "cpu_quota_cores", lambda q=quota: q)
        assert cpu_capacity() == capacity and usable_cores() == threads
    assert usable_cores(1.0) == 1 and usable_cores(1.01) == 2


def test_instances_run_the_batches_of_one_queue_on_several_worker_processes(tiny_cls_checkpoint):
    """Two torch threads and the default instance count: two inference worker processes per model,
    one thread each, the scheduler and the policy on two lanes; consecutive batches go to the
    worker that is free (both, here), the answers are the thread mode's, and shutdown stops both."""

    def settings(mode: str) -> Settings:
        return Settings(
            checkpoints=[str(tiny_cls_checkpoint)], calibrate=False, torch_threads=2, inference_worker=mode
        )  # fmt: skip

    pins = [
        {"X-DynaBERT-Width": w, "X-DynaBERT-Depth": d}
        for w, d in (("1", "1"), ("0.5", "0.75"), ("0.25", "0.5"))
    ]
    with TestClient(create_app(settings("thread"))) as c:
        want = [c.post("/v1/classify", json={"text": TEXTS}, headers=p).json()["results"] for p in pins]
    app = create_app(settings("process"))
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        workers = served.workers
        pids = [w.pid for w in workers]
        assert len(workers) == 2 and len(set(pids)) == 2 and all(w.alive() for w in workers)
        assert all(w.threads == 1 for w in workers)  # torch_threads=2 split between two workers
        assert served.scheduler.lanes == 2 and served.policy.lanes == 2
        assert set(pids) <= app.state.dynabert.monitor.pids(served.engine.name)  # the server's own CPU
        read = [psutil.Process(p).io_counters().read_chars for p in pids]
        for _ in range(2):
            for pin, expected in zip(pins, want, strict=True):
                r = c.post("/v1/classify", json={"text": TEXTS}, headers=pin)
                assert r.status_code == 200, r.text
                for g, x in zip(r.json()["results"], expected, strict=True):
                    assert g["label"] == x["label"] and g["scores"] == pytest.approx(x["scores"], abs=1e-6)
        grew = [psutil.Process(p).io_counters().read_chars - r0 for p, r0 in zip(pids, read, strict=True)]
        assert all(g > 0 for g in grew), grew  # both workers read batches from their sockets
        assert c.get("/readyz").status_code == 200
    assert all(wait_dead(p) for p in pids)
