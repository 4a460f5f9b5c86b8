"""The forward pass in a separate process: one inference worker process per served model.

Why a process and not a thread: the server's event loop (HTTP parsing, FastAPI, tokenising, the
policy, JSON) and the forward pass are both Python, and in one process they share one GIL. Eager
PyTorch gives the GIL back at every operator and has to win it back for the next one; while the
event loop is busy, each of those hand-offs can wait for the interpreter's switch interval (5 ms).
A small sub-network's forward pass is about a hundred operators, so under load it ran several
times slower than calibrated (the policy's contention factor read 3-4x on two cores at twice the
full network's capacity), exactly when the service most needs the small sub-networks to be fast.
In its own process the forward pass has its own interpreter and the two only share the cores.
Triton, TorchServe and Ray Serve also keep the model in worker processes, apart from the front end.

Protocol: ``python -m service.worker FD`` talks over one end of a socket pair, one request at a
time (the scheduler runs one batch at a time per model anyway). Each message is one frame of a
``multiprocessing.connection.Connection`` (``send_bytes``/``recv_bytes``: a length, then the bytes)
whose first byte says what it is; the rest is JSON or packed numbers, never a pickle (see "The
wire format" below). The first message is the configuration (checkpoint folder, device, threads,
calibration grid); the worker loads the checkpoint itself (safetensors + JSON, as everywhere),
calibrates the latency profile in its own process (the one that will run the batches) and answers
ready with the profile's JSON. Then the parent sends batches (sub-network, thread count, int64
ids, mask and token types) and the worker answers each with its float32 logits and the seconds of
its forward pass alone (Server-Timing ``forward``), or with an error message; an exit message
asks it to exit. It ignores SIGINT/SIGTERM (the parent shuts it down after
finishing in-flight requests) and exits when the socket closes, so it never outlives the server.
Its threads run in Linux's SCHED_BATCH class (``batch_scheduling``): a batch the server sends does
not preempt the server's event loop.
When it dies anyway, the batch in flight fails (a 500 for those requests: the server's fault)
and the next batch starts a new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SubnetKey = tuple[float, float]


@dataclass(frozen=True)
class Calibration:
    """How the worker measures the latency profile (service/profile.py's load_or_calibrate)."""

    batches: tuple[int, ...]
    tokens: tuple[int, ...]
    use_cache: bool = True
    threads: tuple[int, ...] = ()  # intra-op thread counts to measure (empty: the worker's own)


# ---- the wire format -------------------------------------------------------------------------
# Bytes only: a tag byte, then JSON (configuration, ready, error) or numbers packed with struct.
# Pickle (multiprocessing's default) took 0.33 ms of every batch's round trip on two cores, after
# the few milliseconds of idle that precede a request at low load: pickling three small int64
# arrays alone took 0.15-0.2 ms there, against 0.035 ms for the packing below (docs/RESULTS.md).
# And nothing on this socket can be turned into code (DESIGN.md: no pickle anywhere).
CONFIG, BATCH, EXIT = b"C", b"B", b"X"  # server -> worker
READY, OK, ERROR = b"R", b"O", b"E"  # worker -> server
_BATCH = struct.Struct("<ddHBII")  # width, depth, threads, has token types, B, T; then the arrays
_RESULT = struct.Struct("<dB")  # forward seconds, ndim; then ndim uint32 sizes and the logits


class WireError(ValueError):
    """A message that does not parse (a bug on one side, never a client's input)."""


def encode_batch(
    key: SubnetKey, threads: int, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None
) -> bytes:
    """A padded (B, T) batch for sub-network ``key`` on ``threads`` threads (0: the worker's own)."""
    b, t = ids.shape
    arrays = (ids, mask) if types is None else (ids, mask, types)
    head = _BATCH.pack(key[0], key[1], threads, types is not None, b, t)
    return b"".join([BATCH, head, *(np.ascontiguousarray(a, dtype="<i8").tobytes() for a in arrays)])


def decode_batch(msg: bytes) -> tuple[SubnetKey, int, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`encode_batch`'s message back; the arrays are writable (torch.from_numpy wants that)."""
    if msg[:1] != BATCH or len(msg) < 1 + _BATCH.size:
        raise WireError(f"not a batch message ({len(msg)} bytes, tag {msg[:1]!r})")
    w, d, threads, has_types, b, t = _BATCH.unpack_from(msg, 1)
    n = 3 if has_types else 2
    if len(msg) != 1 + _BATCH.size + n * b * t * 8:
        raise WireError(f"a ({b}, {t}) batch of {n} arrays cannot be {len(msg)} bytes")
    arrays = np.frombuffer(bytearray(msg[1 + _BATCH.size :]), dtype="<i8").reshape(n, b, t)
    return (w, d), threads, arrays[0], arrays[1], arrays[2] if has_types else None


def encode_result(out: np.ndarray, seconds: float) -> bytes:
    """A batch's logits ((B, C) or (B, T, 2)) and the seconds of its forward pass."""
    sizes = struct.pack(f"<{out.ndim}I", *out.shape)
    return b"".join(
        (OK, _RESULT.pack(seconds, out.ndim), sizes, np.ascontiguousarray(out, dtype="<f4").tobytes())
    )


def encode_json(tag: bytes, obj: Any) -> bytes:
    return tag + json.dumps(obj).encode()


def decode_answer(msg: bytes) -> tuple[str, Any]:
    """A worker's answer: ("ok", (logits, seconds)), ("ready", profile JSON or None) or
    ("error", message). The logits are a read-only view of the message."""
    tag = msg[:1]
    if tag == OK and len(msg) >= 1 + _RESULT.size:
        seconds, ndim = _RESULT.unpack_from(msg, 1)
        at = 1 + _RESULT.size + 4 * ndim
        shape = struct.unpack_from(f"<{ndim}I", msg, 1 + _RESULT.size)
        if len(msg) == at + 4 * math.prod(shape):  # (np.prod: 40 us a batch, in numpy's reduction machinery)
            return "ok", (np.frombuffer(msg, dtype="<f4", offset=at).reshape(shape), seconds)
    elif tag == READY:
        return "ready", json.loads(msg[1:])
    elif tag == ERROR:
        return "error", msg[1:].decode(errors="replace")
    raise WireError(f"not an answer from the inference worker ({len(msg)} bytes, tag {tag!r})")


class WorkerDied(RuntimeError):
    """The worker process exited or stopped answering."""


class _Gone(WorkerDied):
    """The worker process exited (as opposed to hanging)."""


def batch_scheduling() -> bool:
    """Put every thread of this process in Linux's ``SCHED_BATCH`` class (threads started later,
    such as OpenMP's pool, inherit it); False where there is no such class.

    Why: sending a batch wakes this process, and the kernel's wake-up preemption then tends to
    run the woken thread at once, on the core of the thread that woke it, so the server's event
    loop was stuck inside its ``write`` to the socket until the worker gave the core back: 14%
    of the event loop's samples at 180 req/s on two cores (py-spy; docs/RESULTS.md). A
    ``SCHED_BATCH`` thread is never favoured on wake-up, so the event loop finishes its step and
    the worker starts on a free core, or as soon as the loop waits. Its share of the CPU is
    unchanged: the class only gives up the wake-up bonus, and needs no privileges."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not os.path.isdir("/proc/self/task"):
        return False
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
    except OSError as e:  # a sandbox that forbids it: the worker runs as before
        log.warning("inference worker: SCHED_BATCH not available (%s)", e)
        return False
    return True


def _serve(conn: Connection) -> None:
    """The worker process's main loop: the first message is its configuration."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # parent finishes in-flight work, then closes us
    batch_scheduling()  # before torch starts its threads, which inherit it
    import gc

    import torch

    from model.checkpoint import load_checkpoint
    from service.engine import forward
    from service.profile import load_or_calibrate

    try:
        first = conn.recv_bytes()
        if first[:1] != CONFIG:  # an exit before it was configured (the server's start-up failed)
            return
        cfg = json.loads(first[1:])
        path, device, threads, calibration = cfg["path"], cfg["device"], cfg["threads"], cfg["calibration"]
        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(Path(path), device="cpu").model.to(device).eval()
        keys = [(float(w), float(d)) for w, d in model.cfg.subnetworks()]
        profile = None
        if calibration is not None:
            prof = load_or_calibrate(
                model, keys, Path(path), device=device, batches=tuple(calibration["batches"]),
                tokens=tuple(calibration["tokens"]), use_cache=calibration["use_cache"],
                threads=tuple(calibration.get("threads", ())),
            )  # fmt: skip
            profile = {"json": prof.to_json(), "source": prof.source}
        gc.collect()
        gc.freeze()  # the loaded model is permanent: keep it out of the collector's walks
        conn.send_bytes(encode_json(READY, profile))
    except (EOFError, OSError):  # the server went away during start-up
        return
    except Exception as e:  # report whatever stopped the start-up
        conn.send_bytes(ERROR + f"{type(e).__name__}: {e}".encode())
        return
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the server went away
            return
        if msg[:1] == EXIT:
            return
        try:
            key, n_threads, ids, mask, types = decode_batch(msg)
            if n_threads and n_threads != torch.get_num_threads():
                torch.set_num_threads(n_threads)
            t0 = time.perf_counter()
            out = forward(model, key, ids, mask, types)
            seconds = time.perf_counter() - t0
        except Exception as e:  # a bad batch must not stop the worker
            conn.send_bytes(ERROR + f"{type(e).__name__}: {e}".encode())
        else:
            conn.send_bytes(encode_result(out, seconds))


def main(argv: list[str] | None = None) -> None:
    """``python -m service.worker FD``: serve forward passes over the connection on file descriptor FD."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    _serve(Connection(int(args[0])))


_LEN = struct.Struct("!i")  # multiprocessing.connection's frame: a big-endian length,
_LEN64 = struct.Struct("!Q")  # or -1 and then this for a message of 2 GiB or more


class _Link(asyncio.Protocol):
    """The worker's socket as the event loop reads it (:meth:`InferenceWorker.run_async`).

    The worker writes each answer with ``Connection.send_bytes``; this reassembles those frames
    from whatever the loop's reads return and completes the waiting batch's future with each.
    The socket stays registered with the loop from one batch to the next. Waiting with
    ``add_reader`` per batch instead, then reading the answer with blocking calls, cost per
    batch a poll handle made and freed, six ``epoll_ctl`` calls (three of them failing) and two
    ``ioctl`` (uvloop's non-blocking flag, and ours back), a half-second timer, and two ``read``
    calls: 37 system calls per request in the server process at low load, 28 now (strace), and
    0.13-0.19 ms of a 0.55 ms round trip (docs/RESULTS.md). The worker exiting closes its end,
    so ``connection_lost`` fails the batch at once instead of at the next half-second check."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen, conn: Connection) -> None:
        self.loop, self.proc, self.conn = loop, proc, conn
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, msg: bytes) -> None:
        assert self.transport is not None
        n = len(msg)
        head = _LEN.pack(n) if n <= 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(n)
        self.transport.writelines((head, msg))

    def data_received(self, data: bytes) -> None:
        if not self.buf and len(data) >= 4 and _LEN.unpack_from(data)[0] == len(data) - 4:
            self._answer(data[4:])  # the usual case: one whole answer in one read
            return
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            n, at = _LEN.unpack_from(buf)[0], 4
            if n == -1:
                if len(buf) < 12:
                    return
                n, at = _LEN64.unpack_from(buf, 4)[0], 12
            if len(buf) < at + n:
                return
            with memoryview(buf) as view:
                msg = bytes(view[at : at + n])
            del buf[: at + n]
            self._answer(msg)

    def _answer(self, msg: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # nothing asked for it: the stream is out of step
            log.error("inference worker sent an answer no batch waits for; closing its socket")
            assert self.transport is not None
            self.transport.close()  # the next batch finds the link lost and starts a new worker
            return
        waiter.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Gone(f"inference worker exited (code {self.proc.poll()}) during a batch"))


def busy_poll(loop: asyncio.AbstractEventLoop, until: asyncio.Future, for_s: float) -> None:
    """Keep ``loop`` polling, not sleeping, until ``until`` is done or ``for_s`` has passed: a chain
    of ``call_soon`` callbacks, so each turn of the loop polls its sockets without blocking and
    runs whatever else is ready as usual.

    Why: at low load the event loop has nothing to do while the worker runs a batch, so it sleeps
    in ``epoll_wait`` and its core idles. On the small VMs measured here an idle vCPU is slow
    to come back, and the Python that runs after it (the answer's decoding, the response) runs
    cold: the same ``GET /healthz`` took 0.21 ms back to back, 0.51 ms 5 ms apart and 0.84 ms
    12 ms apart. A request pinned to the full sub-network leaves the loop idle for its whole 12 ms
    forward pass; polling through it took 0.28 ms off the p50 end to end minus that pass (2.50
    to 2.22 ms in 5 alternating rounds; docs/RESULTS.md). Timers every 1 ms instead of polling
    gained nothing.
    The price is a core's time for the length of the batch, so the caller polls only when that
    core is free (``service/app.py``'s ``busy_poll_s``): a lone batch at low load, fewer worker
    threads than cores, no other busy process. The same trade as the spinning of OpenMP's and
    ONNX Runtime's thread pools, or Linux's ``SO_BUSY_POLL``, bounded to one batch.
    Off by default (``DYNABERT_BUSY_POLL_MS=0``): on a faster host the gain at 1/1 was 0.06 ms,
    and at 0.25/0.5 polling cost 0.09-0.5 ms, a benchmark client on the same two cores waiting for
    a core to read its answer (docs/RESULTS.md, 2026-12-03)."""
    end = time.perf_counter() + for_s

    def poll() -> None:
        if not until.done() and time.perf_counter() < end:
            loop.call_soon(poll)

    loop.call_soon(poll)


def _hung(proc: subprocess.Popen, answered: asyncio.Future, timeout_s: float) -> None:
    """A batch's timer went off before its answer: kill the worker, fail the batch."""
    if not answered.done():
        failure = _no_answer(proc, 0.0, timeout_s, "a batch")  # past the deadline: kills it
        assert failure is not None
        answered.set_exception(failure)


class InferenceWorker:
    """A model's forward pass in a child process (see the module docstring).

    ``start()`` spawns the process and returns the latency profile it measured (JSON, or None
    when calibration is off); ``run()`` sends one padded batch and waits for its logits (and
    forward time).
    Thread-safe (one batch at a time)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        threads: int = 0,
        on_start: Callable[[int], None] | None = None,
        start_timeout_s: float = 600.0,
        batch_timeout_s: float = 300.0,
    ) -> None:
        self.path, self.device, self.threads, self.on_start = str(path), device, threads, on_start
        self.start_timeout_s, self.batch_timeout_s = start_timeout_s, batch_timeout_s
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.closing = False  # set at shutdown: a worker found dead is no longer replaced
        self._spawned: tuple[subprocess.Popen, Connection, float] | None = None  # spawn()ed, not yet started
        self._link: _Link | None = None  # the socket on the event loop (run_async)
        self._nonblocking: Connection | None = None  # a connection a link left non-blocking

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        proc = self._proc  # read once: a restart in another thread replaces it
        return proc is not None and proc.poll() is None

    def spawn(self) -> None:
        """Start the process now; :meth:`start` configures it later. It imports torch before it
        reads its configuration, so the server can load its own side of the model (tokenizer,
        config) meanwhile: on two cores that saved about 2.5 s of a server's start."""
        with self._lock:
            if self._spawned is None:
                self._spawned = self._popen()

    def _popen(self) -> tuple[subprocess.Popen, Connection, float]:
        """The worker is a fresh ``python -m service.worker`` (not multiprocessing's fork, which is
        unsafe in a process that runs OpenMP or CUDA threads, nor its spawn, which re-imports the
        parent's main script: a server started from a script without a ``__main__`` guard would
        start itself again). It talks over one end of a socket pair."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the repository, for `-m service.worker`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()  # the worker holds its end; when it dies, recv sees EOF
        return proc, Connection(ours.detach()), t0

    def start(self, calibration: Calibration | None = None) -> dict[str, Any] | None:
        """Start the worker (or configure the one :meth:`spawn` started), wait until it has
        loaded (and calibrated); return its profile."""
        spawned, self._spawned = self._spawned, None
        proc, conn, t0 = spawned if spawned is not None else self._popen()
        cal = dataclasses.asdict(calibration) if calibration is not None else None
        try:
            config = {"path": self.path, "device": self.device, "threads": self.threads, "calibration": cal}
            conn.send_bytes(encode_json(CONFIG, config))
            status, payload = _receive(proc, conn, self.start_timeout_s, "start")
        except BaseException:
            _shut(proc, conn, timeout_s=1.0)
            raise
        if status != "ready":
            _shut(proc, conn, timeout_s=1.0)
            raise WorkerDied(f"inference worker for {self.path} failed to start: {payload}")
        if self.closing:  # the server began shutting down while this one loaded
            _shut(proc, conn, timeout_s=1.0)
            raise WorkerDied(f"inference worker for {self.path}: the server is shutting down")
        # published only now: alive() (and so /readyz) stays false while a new worker loads
        self._proc, self._conn = proc, conn
        log.info(
            "inference worker pid %d for %s ready in %.1f s", proc.pid, self.path, time.perf_counter() - t0
        )
        if self.on_start is not None:
            self.on_start(proc.pid)
        return payload

    def run(
        self, key: SubnetKey, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None, threads: int = 0
    ) -> tuple[np.ndarray, float]:
        """Logits of one padded batch and the seconds of its forward pass, timed inside the
        worker; RuntimeError when the forward pass failed there.

        A worker found dead (killed between batches, e.g. by the OOM killer, or dying with this
        batch) is replaced and the batch is sent once more; if the new worker dies on it too,
        or a worker hangs past ``batch_timeout_s`` (it is killed), WorkerDied is raised and the
        next batch starts a new worker."""
        msg = encode_batch(key, threads, ids, mask, types)
        with self._lock:
            try:
                status, payload = self._exchange(msg)
            except _Gone as e:
                log.error("inference worker for %s died (%s); starting a new one", self.path, e)
                self._close_locked(timeout_s=1.0)  # reap it (its socket can close before it is reapable)
                status, payload = self._exchange(msg)  # _Gone is a WorkerDied: a second death raises
        if status != "ok":
            raise RuntimeError(f"inference failed in the worker: {payload}")
        return payload

    async def run_async(
        self,
        key: SubnetKey,
        ids: np.ndarray,
        mask: np.ndarray,
        types: np.ndarray | None,
        threads: int = 0,
        poll_s: float = 0.0,
    ) -> tuple[np.ndarray, float]:
        """:meth:`run` for the event loop, without a thread hop: the batch is written to the
        socket and the loop itself reads the answer (:class:`_Link`). Per batch this saves
        waking an executor thread twice, about 0.25 ms at low load on a small VM, where a
        sub-network's whole forward pass can take 3 ms. Restarts (seconds) run in a thread
        that holds the lock itself, so a batch cancelled meanwhile cannot start a second one.
        The socket stays with the running loop between batches: call :meth:`detach` (or
        :meth:`close`) before that loop ends (uvloop hangs closing a loop that still holds a
        transport when ResourceWarning is an error). ``poll_s`` > 0: the loop busy-polls for the
        answer for up to that long instead of sleeping (:func:`busy_poll`)."""
        msg = encode_batch(key, threads, ids, mask, types)
        for attempt in range(2):
            if not self.alive():
                await asyncio.to_thread(self.ensure_running)
            while not self._lock.acquire(blocking=False):  # a restart in the watchdog's thread
                await asyncio.sleep(0.01)
            proc = self._proc
            try:
                status, payload = await self._exchange_async(msg, poll_s)
                break
            except _Gone as e:
                if attempt:
                    raise
                log.error("inference worker for %s died (%s); starting a new one", self.path, e)
            finally:
                self._lock.release()
            # as run() does: its socket can close before it is reapable (alive() still true),
            # so the retry must not find it again
            await asyncio.to_thread(self._replace, proc)
        if status != "ok":
            raise RuntimeError(f"inference failed in the worker: {payload}")
        return payload

    async def _exchange_async(self, msg: bytes, poll_s: float = 0.0) -> tuple[str, Any]:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:  # (run_async has just asked alive(); one that dies since
            raise _Gone("inference worker not running")  # fails the send or the read: _Gone too)
        link = await self._link_for(proc, conn)
        loop = link.loop
        answered: asyncio.Future[bytes] = loop.create_future()
        link.waiter = answered
        link.send(msg)  # written now if the socket takes it (a batch usually fits), else by the loop
        # a worker that exits closes its end of the socket: _Link.connection_lost fails the batch
        # at once; a hang is what this timer is for
        timer = loop.call_later(self.batch_timeout_s, _hung, proc, answered, self.batch_timeout_s)
        if poll_s > 0:
            busy_poll(loop, answered, poll_s)
        try:
            reply = await answered
        except asyncio.CancelledError:  # its answer would be read as the next batch's: the next
            self._close_locked(timeout_s=0.0)  # batch starts a new one (only a shutdown cancels)
            raise
        finally:
            timer.cancel()
            link.waiter = None
        return decode_answer(reply)

    async def _link_for(self, proc: subprocess.Popen, conn: Connection) -> _Link:
        """This worker's socket as a transport of the running loop, made once per worker and loop
        (the server's warm-up runs on a loop of its own before uvicorn's). _Gone when the worker
        is known to have closed its end."""
        loop = asyncio.get_running_loop()
        link = self._link
        if link is None or link.conn is not conn or link.loop is not loop:
            self.detach()
            # a duplicate of the descriptor: the transport closes its own, the Connection (the
            # blocking path, and the exit message) keeps the original
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            _, link = await loop.connect_accepted_socket(lambda: _Link(loop, proc, conn), sock)
            self._link, self._nonblocking = link, conn
        if link.lost:
            raise _Gone(f"inference worker exited (code {proc.poll()}) before a batch")
        return link

    def detach(self) -> None:
        """Close the event loop's transport on the worker's socket, from any thread: before the
        loop that ran :meth:`run_async` ends (the server's warm-up runs on a loop of its own), and
        whenever the worker is closed or the blocking path takes the socket back. The next batch
        on a loop makes a new one there."""
        link, self._link = self._link, None
        if link is None or link.transport is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with contextlib.suppress(RuntimeError):  # a loop closed meanwhile (uvloop closes its transports)
            if running is link.loop or link.loop.is_closed():
                link.transport.close()
            else:
                link.loop.call_soon_threadsafe(link.transport.close)

    def ensure_running(self) -> bool:
        """Start a new worker if this one is gone (the server's watchdog calls this, so a
        dead worker is replaced before the next batch needs it); True when one was started."""
        with self._lock:
            return self._revive()

    def _replace(self, proc: subprocess.Popen | None) -> None:
        """Reap a worker found dead during a batch (unless another thread already replaced it)
        and start a new one."""
        with self._lock:
            if proc is not None and self._proc is proc:
                self._close_locked(timeout_s=1.0)
            self._revive()

    def _revive(self) -> bool:
        if self.alive() or self.closing:
            return False
        self.restarts += 1
        self._close_locked(timeout_s=1.0)
        self.start(None)  # the profile the server uses stays; no recalibration
        return True

    def _exchange(self, msg: bytes) -> tuple[str, Any]:
        self._revive()
        if self._proc is None or self._conn is None:
            raise WorkerDied(f"inference worker for {self.path} is closed (the server is shutting down)")
        self.detach()  # the event loop's path ran before: the socket is this path's again
        if self._nonblocking is self._conn:  # the transport made it non-blocking, a flag the
            os.set_blocking(self._conn.fileno(), True)  # duplicate shares with the original
            self._nonblocking = None
        _send(self._conn, msg)
        return _receive(self._proc, self._conn, self.batch_timeout_s, "a batch")

    def close(self, timeout_s: float = 10.0, final: bool = False) -> None:
        """Ask the worker to exit; kill it if it does not. ``final``: none is started after it
        (the server's shutdown; a later batch fails instead of starting one)."""
        with self._lock:  # a restart in progress finishes first, and is closed too
            self.closing = self.closing or final
            self._close_locked(timeout_s)

    def _close_locked(self, timeout_s: float) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self.detach()
        _shut(proc, conn, timeout_s)
        spawned, self._spawned = self._spawned, None
        if spawned is not None:  # spawned, never started
            _shut(spawned[0], spawned[1], timeout_s)


def _receive(proc: subprocess.Popen, conn: Connection, timeout_s: float, what: str) -> tuple[str, Any]:
    """The worker's next answer; _Gone when it exits, WorkerDied (and killed) past the timeout."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        failure = _no_answer(proc, deadline, timeout_s, what)
        if failure is not None:
            raise failure
    return _read(proc, conn, what)


def _no_answer(proc: subprocess.Popen, deadline: float, timeout_s: float, what: str) -> WorkerDied | None:
    """Why no answer is coming (checked while waiting for one): the worker exited (_Gone), or it
    is past its deadline (killed; WorkerDied); None while it may still answer."""
    if proc.poll() is not None:
        return _Gone(f"inference worker exited (code {proc.returncode}) during {what}")
    if time.monotonic() > deadline:
        proc.kill()
        return WorkerDied(f"inference worker gave no answer within {timeout_s:g} s ({what}); killed")
    return None


def _send(conn: Connection, msg: bytes) -> None:
    try:
        conn.send_bytes(msg)
    except OSError as e:  # BrokenPipe / ConnectionReset: it is gone
        raise _Gone(f"inference worker unreachable: {e}") from e


def _read(proc: subprocess.Popen, conn: Connection, what: str) -> tuple[str, Any]:
    try:
        return decode_answer(conn.recv_bytes())
    except (EOFError, OSError) as e:
        raise _Gone(f"inference worker exited (code {proc.poll()}) during {what}") from e


def _shut(proc: subprocess.Popen | None, conn: Connection | None, timeout_s: float) -> None:
    """Ask a worker to exit (an exit message on its socket); kill it if it does not."""
    if conn is not None:
        try:
            conn.send_bytes(EXIT)
        except (BrokenPipeError, OSError):
            pass
        conn.close()
    if proc is not None:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    main()
