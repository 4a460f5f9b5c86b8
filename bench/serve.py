"""`dynabert bench serve`: an open-loop load benchmark of the HTTP service (issue 4, "Benchmark").

For each policy (``sla``, ``fixed`` at the full network, ``fixed`` at the smallest one) it starts
``dynabert serve`` in a subprocess on a free loopback port, waits for ``/readyz``, and drives it
with Poisson arrivals from asyncio + httpx (``ClientPool``, on the lean transport of
bench/transport.py): every request is fired at its scheduled time
whatever the earlier ones are doing (open loop), so a slow server faces a growing queue instead of
a politely waiting client. The offered load sweeps multiples of the full network's capacity,
measured first by a short closed-loop probe against the ``fixed``-full server.

Per load point it reports SLO attainment (the share of requests answered 200 within the budget,
timed client side from the scheduled send time, so client lag counts against the server too;
503/429s and timeouts are misses), latency percentiles of the answered requests, throughput,
each sub-network's share (from the response headers) and effective accuracy: the mean over all
requests of the chosen sub-network's dev metric (from ``/v1/models``), a missed deadline counting 0.

``--hog`` adds a second scenario: at a fixed offered load, a hog (bench/hog.py) starts halfway
through; attainment is reported before, after and overall. The hog is a CPU hog (one spinning
process per core) when the servers run on the CPU, and a GPU hog (back-to-back bf16 matrix
products on the same GPU) with ``--device cuda``; ``--hog-kind`` chooses either.

``--device`` runs the servers (and the in-process cross-check) on that torch device.

The HTTP overhead at low load is p50 end-to-end (one request at a time, from a blocking socket
client that adds next to nothing of its own) minus in-process inference, tokenising and the
forward pass, both as the server reports them in ``Server-Timing`` for the same requests (paired
per request); minus the forward pass alone beside it; cross-checked against tokenise + forward
timed in this process after the servers are gone, and reported also from the asyncio + httpx
client, whose own per-request work (about a millisecond here) is part of its end-to-end time.

Open-loop load testing and the coordinated-omission pitfall it avoids: Gil Tene, "How NOT to
measure latency" (2015); Schroeder et al., "Open versus closed: a cautionary tale" (NSDI 2006).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench.hog import hog_for, hog_kind
from bench.transport import BlockingClient, LeanTransport

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# the folder `dynabert serve` serves by default (service/settings.py: relative to the cwd)
DEFAULT_CHECKPOINT = Path(os.environ.get("DYNABERT_DEFAULT_MODEL_DIR", "models/sst2-minilm-l6"))
LOOPBACK = "127.0.0.1"
POLICIES = ("sla", "fixed-full", "fixed-smallest")
CLASSIFY_PATH = "/v1/classify"
FALLBACK_TEXTS = (  # used only when the SST-2 dev file is not where DYNABERT_DATA_DIR points
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
)


# ---- load schedule -----------------------------------------------------------------------------


def poisson_schedule(rate: float, duration_s: float, rng: random.Random, max_requests: int) -> list[float]:
    """Send times (seconds from the start, increasing) of a Poisson process of ``rate`` per second
    over ``duration_s``: exponential inter-arrival gaps, cut at the duration or ``max_requests``."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and len(times) < max_requests:
        times.append(t)
        t += rng.expovariate(rate)
    return times


# ---- one request's outcome and the analysis of many ----------------------------------------------


@dataclass(slots=True)
class Record:
    """One request as the client saw it."""

    sched_s: float  # scheduled send time, seconds from the start of the run
    latency_ms: float  # end to end from the scheduled send time; inf when nothing came back
    status: int  # HTTP status; 0 when nothing came back (timeout, connection error)
    width: float | None = None  # from X-DynaBERT-Width
    depth: float | None = None  # from X-DynaBERT-Depth
    server_ms: dict[str, float] = field(default_factory=dict)  # Server-Timing entries (queue, infer, total)
    lag_ms: float = 0.0  # how late the generator fired it (should stay ~0 in an open loop)


def subnet_key(width: float, depth: float) -> str:
    return f"{float(width):g}/{float(depth):g}"


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation), None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q!r}")
    a = np.asarray(values, dtype=float)
    return float(np.percentile(a, q)) if a.size else None


@dataclass
class PointStats:
    """The summary of one load point (or one slice of a run)."""

    requests: int
    answered: int  # 200s
    within_budget: int  # 200s within the budget, end to end
    attainment: float  # within_budget / requests
    errors: float  # share of non-200 answers and timeouts
    p50_ms: float | None  # percentiles of the 200s' end-to-end latency
    p95_ms: float | None
    p99_ms: float | None
    throughput_rps: float  # 200s per second of run time
    goodput_rps: float  # 200s within budget per second
    effective_accuracy: float  # mean over requests of the chosen sub-network's metric, misses = 0
    shares: dict[str, float]  # "width/depth" -> share of the 200s
    max_lag_ms: float  # worst generator lag (a sanity check of the open loop)
    # "width/depth" -> share of its 200s within the budget: whether misses fall on the requests
    # given larger sub-networks or on the small ones queued behind them
    within_by_subnet: dict[str, float] = field(default_factory=dict)
    # end to end minus the server's own total (Server-Timing): the kernel, the HTTP parsing before
    # the server's clock starts, the event loop's lag and the client's; percentiles over the 200s
    outside_p50_ms: float | None = None
    outside_p99_ms: float | None = None
    # share of requests answered late end to end although the server's own total was within the
    # budget: misses the server could not see (nor its policy react to)
    unseen_misses: float = 0.0


def analyze(records: list[Record], budget_ms: float, metric: dict[str, float], wall_s: float) -> PointStats:
    """Summarise records. ``metric`` maps ``subnet_key(w, d)`` to the sub-network's dev metric;
    a request counts towards effective accuracy only when answered 200 within ``budget_ms``."""
    if budget_ms <= 0:
        raise ValueError(f"budget_ms must be > 0, got {budget_ms!r}")
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s!r}")
    n = len(records)
    ok = [r for r in records if r.status == 200]
    within = [r for r in ok if r.latency_ms <= budget_ms]
    for r in within:
        if r.width is None or r.depth is None:
            raise ValueError(f"a 200 answer without X-DynaBERT-Width/Depth headers: {r!r}")
        key = subnet_key(r.width, r.depth)
        if key not in metric:
            raise ValueError(
                f"server chose sub-network {key}, which has no dev metric (known: {sorted(metric)})"
            )
    keyed = [(subnet_key(r.width, r.depth), r) for r in ok if r.width is not None and r.depth is not None]
    counts = Counter(k for k, _ in keyed)
    met = Counter(k for k, r in keyed if r.latency_ms <= budget_ms)
    # each sub-network's metric times its share of the requests: two runs that answered every
    # request within budget on one sub-network score its metric exactly, whatever their request
    # counts (a running sum of thousands of equal floats did not: 0.83944999999996 46 vs ...48)
    acc = math.fsum(metric[k] * (c / n) for k, c in met.items()) if n else 0.0
    lat = [r.latency_ms for r in ok]
    timed = [r for r in ok if "total" in r.server_ms]
    outside = [r.latency_ms - r.server_ms["total"] for r in timed]
    unseen = sum(1 for r in timed if r.latency_ms > budget_ms >= r.server_ms["total"])
    return PointStats(
        requests=n,
        answered=len(ok),
        within_budget=len(within),
        attainment=len(within) / n if n else 0.0,
        errors=(n - len(ok)) / n if n else 0.0,
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        p99_ms=percentile(lat, 99),
        throughput_rps=len(ok) / wall_s,
        goodput_rps=len(within) / wall_s,
        effective_accuracy=acc,
        shares={k: c / len(ok) for k, c in sorted(counts.items(), key=lambda kv: -kv[1])},
        max_lag_ms=max((r.lag_ms for r in records), default=0.0),
        within_by_subnet={k: met[k] / c for k, c in counts.items()},
        outside_p50_ms=percentile(outside, 50),
        outside_p99_ms=percentile(outside, 99),
        unseen_misses=unseen / n if n else 0.0,
    )


def attainment_timeline(
    records: list[Record], budget_ms: float, window_s: float
) -> list[tuple[float, float]]:
    """(window start, attainment) for consecutive windows of scheduled send time."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    buckets: dict[int, list[bool]] = {}
    for r in records:
        buckets.setdefault(int(r.sched_s // window_s), []).append(
            r.status == 200 and r.latency_ms <= budget_ms
        )
    return [(k * window_s, sum(v) / len(v)) for k, v in sorted(buckets.items())]


_TIMING = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:;.*?dur\s*=\s*\"?([0-9.eE+-]+)\"?)?")


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``queue;dur=1.2, infer;dur=3.4`` -> {"queue": 1.2, "infer": 3.4} (ms); entries without
    a duration or unparsable ones are skipped."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        m = _TIMING.match(part)
        if m and m.group(2) is not None:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


# ---- the load generator --------------------------------------------------------------------------


def check_loopback(base_url: str) -> str:
    """Load only ever targets 127.0.0.1: anything else is refused."""
    host = urlsplit(base_url).hostname
    if host != LOOPBACK:
        raise ValueError(f"load tests only target {LOOPBACK}, got {base_url!r}")
    return base_url.rstrip("/")


def _headers_of(response: httpx.Response) -> tuple[float | None, float | None, dict[str, float]]:
    def num(name: str) -> float | None:
        v = response.headers.get(name)
        try:
            return float(v) if v is not None else None
        except ValueError:
            return None

    timing = parse_server_timing(response.headers.get("server-timing"))
    return num("x-dynabert-width"), num("x-dynabert-depth"), timing


def classify_body(text: str) -> dict[str, Any]:
    return {"text": text}


async def _one(
    client: ClientPool,
    url: str,
    text: str,
    headers: dict[str, str],
    sched_abs: float,
    sched_s: float,
    timeout_s: float,
) -> Record:
    lag_ms = max(0.0, (_now() - sched_abs) * 1e3)
    try:
        r = await asyncio.wait_for(client.post(url, json=classify_body(text), headers=headers), timeout_s)
    except (TimeoutError, httpx.TransportError):
        return Record(sched_s, math.inf, 0, lag_ms=lag_ms)
    width, depth, timing = _headers_of(r)
    return Record(sched_s, (_now() - sched_abs) * 1e3, r.status_code, width, depth, timing, lag_ms)


class ClientPool:
    """The load generator's client: ``httpx.AsyncClient``s on :class:`LeanTransport`, used
    round-robin (one by default). The transport costs about a tenth of httpcore's client CPU per
    request, which on a machine shared with the server is CPU the server keeps; connections are
    opened as needed, so a request never waits for one, which would quietly turn the open loop
    into a closed one."""

    def __init__(self, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.clients = [
            httpx.AsyncClient(transport=LeanTransport(), timeout=httpx.Timeout(60.0), trust_env=False)
            for _ in range(shards)
        ]
        self._next = itertools.cycle(self.clients)

    async def post(self, url: str, **kw: Any) -> httpx.Response:
        return await next(self._next).post(url, **kw)

    async def get(self, url: str, **kw: Any) -> httpx.Response:
        return await next(self._next).get(url, **kw)

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


def _now() -> float:
    """The benchmark's clock. Not ``loop.time()``: uvloop's has millisecond resolution."""
    return time.perf_counter()


def _loop_factory() -> Any:
    """uvloop's event loop when installed (it comes with the server's dependencies): the load
    generator's own per-request CPU is CPU the server on the same cores does not get."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a trimmed install
        return None
    return uvloop.new_event_loop


def make_client(shards: int = 1) -> ClientPool:
    """The load generator's HTTP client for a whole run (see ClientPool)."""
    return ClientPool(shards)


async def open_loop(
    client: ClientPool,
    base_url: str,
    schedule: list[float],
    texts: list[str],
    *,
    budget_ms: float,
    timeout_s: float,
    extra_headers: dict[str, str] | None = None,
    at: list[tuple[float, Any]] | None = None,
) -> tuple[list[Record], float]:
    """Fire one request per scheduled time whatever the earlier ones are doing; wait for all of
    them (each bounded by ``timeout_s``). ``at`` holds (seconds, callable) events to run on the
    same clock, e.g. starting the CPU hog halfway. Returns the records and the run's wall time."""
    url = check_loopback(base_url) + CLASSIFY_PATH
    if not texts:
        raise ValueError("no texts to send")
    headers = {"X-Latency-Budget-Ms": f"{budget_ms:g}", **(extra_headers or {})}
    with _no_gc_pauses():
        return await _open_loop(client, url, schedule, texts, headers, timeout_s, at)


@contextlib.contextmanager
def _no_gc_pauses() -> Any:
    """No garbage collection in the load generator while it fires requests: a full collection
    takes tens of ms, during which every scheduled request would go out late (and count as a
    miss against the server). The garbage of one load point is collected after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


async def _open_loop(
    client: ClientPool,
    url: str,
    schedule: list[float],
    texts: list[str],
    headers: dict[str, str],
    timeout_s: float,
    at: list[tuple[float, Any]] | None,
) -> tuple[list[Record], float]:
    start = _now() + 0.02
    events = sorted(at or [], key=lambda e: e[0])
    tasks: list[asyncio.Task[Record]] = []
    for i, t in enumerate(schedule):
        while events and events[0][0] <= t:
            ev_t, fn = events.pop(0)
            await asyncio.sleep(max(0.0, start + ev_t - _now()))
            fn()
        delay = start + t - _now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(
            asyncio.create_task(_one(client, url, texts[i % len(texts)], headers, start + t, t, timeout_s))
        )
    for _, fn in events:
        fn()
    records = list(await asyncio.gather(*tasks))
    return records, _now() - start


async def closed_loop(
    client: ClientPool,
    base_url: str,
    texts: list[str],
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
    timeout_s: float = 30.0,
) -> tuple[list[Record], float]:
    """``concurrency`` workers, each sending its next request as soon as the last one is answered,
    for ``duration_s``; used to measure capacity and the low-load overhead (concurrency 1)."""
    url = check_loopback(base_url) + CLASSIFY_PATH
    start = _now()
    end = start + duration_s
    records: list[Record] = []

    async def worker(k: int) -> None:
        i = k
        while _now() < end:
            t = _now()
            records.append(await _one(client, url, texts[i % len(texts)], headers, t, t - start, timeout_s))
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return records, _now() - start


# ---- the server under test -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PolicySpec:
    """How to start the server for one compared policy."""

    name: str  # sla, fixed-full, fixed-smallest, or a variant of one (parse_variant)
    env: dict[str, str]  # DYNABERT_* settings
    subnet: tuple[float, float] | None  # the pinned sub-network of a fixed policy


# settings a variant may not change: they are what makes the base policy the one it is named
VARIANT_FIXED = ("policy", "fixed_width", "fixed_depth", "device")


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """``base@key=value@key=value``: a compared policy with server settings of its own, e.g.
    ``sla@shed_late=false`` (DYNABERT_SHED_LATE=false) next to plain ``sla`` in the same run, so
    that a setting's effect is measured block by block against its base (:func:`variant_effects`)
    instead of across two runs on a host whose speed drifts. The keys are the service's settings
    (service/settings.py), checked here so that a typo fails before any server starts."""
    from service.settings import Settings

    base, *parts = name.split("@")
    if base not in POLICIES:
        raise ValueError(f"unknown policy {base!r} in {name!r} (choose from {', '.join(POLICIES)})")
    env: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise ValueError(f"{name!r}: expected base@setting=value, got {part!r}")
        if key not in Settings.model_fields or key in VARIANT_FIXED:
            raise ValueError(
                f"{name!r}: {key!r} is not a setting a variant can change (see service/settings.py; "
                f"not {', '.join(VARIANT_FIXED)})"
            )
        env[f"DYNABERT_{key.upper()}"] = value.strip()
    return base, env


def policy_spec(name: str, widths: list[float], depths: list[float]) -> PolicySpec:
    base, overrides = parse_variant(name)
    if base == "sla":
        return PolicySpec(name, {"DYNABERT_POLICY": "sla", **overrides}, None)
    w, d = (max(widths), max(depths)) if base == "fixed-full" else (min(widths), min(depths))
    env = {"DYNABERT_POLICY": "fixed", "DYNABERT_FIXED_WIDTH": f"{w:g}", "DYNABERT_FIXED_DEPTH": f"{d:g}"}
    return PolicySpec(name, {**env, **overrides}, (w, d))


class Server:
    """``dynabert serve`` in a subprocess on a free loopback port; a context manager that waits
    for ``/readyz`` and stops the server (SIGTERM, then SIGKILL) on exit. Output goes to a log file.
    ``workers`` > 1: ``--workers N``, N uvicorn processes behind one port, each with its own
    event loop and inference worker process."""

    def __init__(
        self,
        checkpoint: Path,
        env: dict[str, str],
        log_path: Path,
        ready_timeout_s: float = 300.0,
        workers: int = 1,
        cgroup: Path | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.checkpoint, self.env, self.log_path = checkpoint, env, log_path
        self.ready_timeout_s, self.workers, self.cgroup = ready_timeout_s, workers, cgroup
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "model.cli", "serve", "--checkpoint", str(self.checkpoint)]
        cmd += ["--host", LOOPBACK, "--port", str(self.port), "--no-train"]
        cmd += ["--workers", str(self.workers)] if self.workers > 1 else []
        if self.cgroup is not None:  # the server joins the cgroup before it starts, its children after it
            procs = shlex.quote(str(self.cgroup / "cgroup.procs"))
            cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
        return cmd

    def __enter__(self) -> Server:
        cmd = self.command()
        env = {**os.environ, **self.env}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        log.info("server pid %d on %s (%s), log %s", self.proc.pid, self.base_url, self.env, self.log_path)
        t0 = time.monotonic()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("server ready after %.1f s", time.monotonic() - t0)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if c.get(self.base_url + "/readyz").status_code == 200:
                        return
                time.sleep(0.2)
        raise RuntimeError(f"server not ready after {self.ready_timeout_s:g} s:\n{self.log_tail()}")

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) the server has used so far: the front (event loop, HTTP,
        the policy: the process started, and with ``--workers`` the uvicorn processes under it)
        and the inference worker processes (``service.worker``); (0, 0) when it is gone."""
        import psutil

        if self.proc is None:
            return 0.0, 0.0
        try:
            proc = psutil.Process(self.proc.pid)
            t = proc.cpu_times()
            front, kids = t.user + t.system, 0.0
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    if "service.worker" in child.cmdline():
                        kids += t.user + t.system
                    else:
                        front += t.user + t.system
            return front, kids
        except psutil.Error:
            return 0.0, 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d ignored SIGTERM; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def subnet_metrics(models_json: Any, fallback: list[dict[str, Any]] | None) -> dict[str, float]:
    """``subnet_key -> dev metric`` from ``GET /v1/models`` (the first model's sub-network table),
    falling back to the checkpoint's eval.json entries."""
    tables: list[list[dict[str, Any]]] = []
    models = (
        models_json.get("models", models_json.get("data")) if isinstance(models_json, dict) else models_json
    )
    for m in models or []:
        if isinstance(m, dict):
            for k in ("subnetworks", "sub_networks", "subnets"):
                if isinstance(m.get(k), list):
                    tables.append(m[k])
                    break
    out: dict[str, float] = {}
    for row in (tables[0] if tables else None) or fallback or []:
        value = row.get("metric_value", row.get("value"))
        if isinstance(row.get("metric"), (int, float)):
            value = row["metric"]
        if isinstance(value, (int, float)):
            out[subnet_key(row["width"], row["depth"])] = float(value)
    return out


GAUGES = ("dynabert_contention_factor", "dynabert_cpu_utilization_ratio")


def parse_gauges(text: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """Prometheus text -> {name without the dynabert_ prefix: value}, the largest across label
    sets; gauges that are missing are left out."""
    out: dict[str, float] = {}
    for name in names:
        vals = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", text, re.M)
        with contextlib.suppress(ValueError):
            if vals:
                out[name.removeprefix("dynabert_")] = max(float(v) for v in vals)
    return out


async def scrape_gauges(client: ClientPool, base_url: str) -> dict[str, float]:
    """The server's own view of the load (the policy's contention factor, CPU) from /metrics."""
    try:
        return parse_gauges((await client.get(base_url + "/metrics")).text)
    except httpx.TransportError:
        return {}


def parse_threads(text: str) -> Counter:
    """Prometheus text -> {intra-op thread count: forward passes run on it}, summed over models
    (``dynabert_inference_threads_total``)."""
    out: Counter = Counter()
    for labels, value in re.findall(r"^dynabert_inference_threads_total\{([^}]*)\}\s+(\S+)", text, re.M):
        m = re.search(r'threads="(\d+)"', labels)
        if m:
            with contextlib.suppress(ValueError):
                out[int(m.group(1))] += int(float(value))
    return out


async def scrape_threads(client: ClientPool, base_url: str) -> Counter:
    return parse_threads((await client.get(base_url + "/metrics")).text)


async def wait_idle(client: ClientPool, base_url: str, timeout_s: float = 15.0) -> None:
    """Wait until the server's queue is empty (``dynabert_queue_depth`` 0 on /metrics), so one
    point's backlog never spills into the next; a short pause when the gauge is not exported."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = (await client.get(base_url + "/metrics")).text
        except httpx.TransportError:
            break
        depths = [float(m) for m in re.findall(r"^dynabert_queue_depth(?:\{[^}]*\})?\s+(\S+)", text, re.M)]
        if not depths:
            break
        if max(depths) <= 0:
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)


# ---- the benchmark -------------------------------------------------------------------------------


def timeout_header(timeout_ms: float) -> dict[str, str]:
    """The header in which a client announces how long it will wait (``dynabert bench serve
    --send-timeout``, ``dynabert bench burst --drop-by timeout-header``)."""
    return {"X-Request-Timeout-Ms": f"{timeout_ms:g}"}


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: Path
    budget_ms: float = 50.0
    duration_s: float = 10.0
    blocks: int = 5  # each point's duration in this many blocks, the policies taking turns
    warmup_s: float = 0.5  # each block starts with this long at its rate, not counted (_run_block)
    loads: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    policies: tuple[str, ...] = POLICIES
    hog: bool = False
    hog_load: float = 1.0
    hog_duration_s: float = 20.0  # the whole hog run; the hog starts halfway
    probe_s: float = 4.0
    probe_concurrency: int = 32
    capacity_rounds: int = 3  # closed-loop capacity measurements; the loads multiply their median
    overhead_requests: int = 200
    timeout_s: float = 5.0
    max_requests: int = 50_000
    seed: int = 0
    capacity_rps: float | None = None  # scale the loads by this instead of the measured capacity
    device: str = "cpu"  # where the servers run their forward passes (DYNABERT_DEVICE)
    hog_kind: str = "cpu"  # "cpu" (spinning processes) or "gpu" (matrix products on the device)
    send_timeout: bool = False  # clients announce timeout_s in X-Request-Timeout-Ms
    logs_dir: Path | None = None  # keep the servers' logs here (None: a temporary folder, deleted)
    server_workers: int = 1  # uvicorn processes per server (`dynabert serve --workers`)
    server_cgroup: Path | None = None  # a cgroup the servers run in (a CPU quota, as in a container)

    def client_headers(self) -> dict[str, str] | None:
        """Headers every load request carries besides the budget."""
        return timeout_header(1e3 * self.timeout_s) if self.send_timeout else None


def load_texts(rng: random.Random, limit: int = 872) -> list[str]:
    """SST-2 dev sentences (DYNABERT_DATA_DIR, default ../shared/data), shuffled."""
    data = Path(os.environ.get("DYNABERT_DATA_DIR", REPO.parent / "shared" / "data"))
    f = data / "SST-2" / "dev.tsv"
    if not f.is_file():
        log.warning("%s not found: sending %d built-in sentences instead", f, len(FALLBACK_TEXTS))
        return list(FALLBACK_TEXTS)
    with open(f, newline="") as fh:
        texts = [row["sentence"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rng.shuffle(texts)
    return texts[:limit]


def _read_grid(checkpoint: Path) -> tuple[list[float], list[float], dict[str, Any]]:
    from model.checkpoint import read_meta

    meta = read_meta(checkpoint)
    cfg = meta["config"]
    task = cfg.get("task", {})
    if task.get("type", "classification") == "qa":
        raise ValueError(f"{checkpoint}: a QA checkpoint; `bench serve` drives /v1/classify")
    if len(task.get("text_fields", ["text"])) != 1:
        raise ValueError(
            f"{checkpoint}: sentence-pair task {task.get('name')!r}; `bench serve` sends single texts"
        )
    return list(cfg.get("widths", [1.0])), list(cfg.get("depths", [1.0])), meta


async def _measure_capacity(
    client: ClientPool,
    server: Server,
    texts: list[str],
    cfg: BenchConfig,
    pin: tuple[float, float] | None,
) -> dict:
    """Requests/s the full network sustains (closed loop, many clients, so the server batches):
    the median of ``cfg.capacity_rounds`` measurements, the host probed after each with the server
    idle. On a host whose speed swings ~2x for seconds at a time, one measurement caught in a fast
    or a slow stretch mislabels every load point (serve-120: every point's slowest block 1.7-1.9x off); the
    median round is a typical stretch, and the median probe the speed the points are compared with."""
    headers = {"X-Latency-Budget-Ms": "60000"}
    if pin is not None:  # a server whose policy is not fixed-full: pin the full network by header
        headers |= {"X-DynaBERT-Width": f"{pin[0]:g}", "X-DynaBERT-Depth": f"{pin[1]:g}"}
    await closed_loop(
        client, server.base_url, texts, concurrency=4, duration_s=min(1.0, cfg.probe_s), headers=headers
    )
    rounds = []
    for k in range(cfg.capacity_rounds):
        records, wall = await closed_loop(
            client,
            server.base_url,
            texts,
            concurrency=cfg.probe_concurrency,
            duration_s=cfg.probe_s,
            headers=headers,
        )
        ok = [r for r in records if r.status == 200]
        if not ok:
            statuses = Counter(r.status for r in records)
            raise RuntimeError(
                f"capacity probe got no 200 answers (statuses {dict(statuses)}):\n{server.log_tail()}"
            )
        await wait_idle(client, server.base_url)
        rounds.append(
            {
                "rps": len(ok) / wall,
                "wall_s": wall,
                "p50_ms": percentile([r.latency_ms for r in ok], 50),
                "host_ms": host_probe_ms(),
            }
        )
        log.info(
            "full-network capacity, round %d of %d: %.1f req/s (closed loop, %d clients, %.1f s; host probe %.2f ms)",
            k + 1, cfg.capacity_rounds, rounds[-1]["rps"], cfg.probe_concurrency, wall, rounds[-1]["host_ms"],
        )  # fmt: skip
    return capacity_of(rounds, cfg.probe_concurrency)


def capacity_of(rounds: list[dict], concurrency: int) -> dict:
    """The capacity of measured ``rounds``: the median round's (the lower of the middle two when
    even: a round that ran), the others kept beside it. The host's speed it is compared with is
    the median of the rounds' probes, taken on its own: a probe is noisier than a 4 s round
    (serve-121: rounds of 184, 196 and 193 req/s, probes of 4.41, 4.17 and 7.18 ms)."""
    mid = sorted(rounds, key=lambda r: r["rps"])[(len(rounds) - 1) // 2]
    return {
        "rps": mid["rps"],
        "method": f"closed loop, {concurrency} concurrent clients, fixed full network, the median of "
        f"{len(rounds)} round(s) of {mid['wall_s']:.1f} s ("
        + ", ".join(f"{r['rps']:.1f}" for r in rounds)
        + " req/s)",
        "p50_ms": mid["p50_ms"],
        "host_ms": statistics.median_low(r["host_ms"] for r in rounds),
        "rounds": rounds,
    }


def load_scale(measured: dict, given_rps: float | None) -> dict:
    """The capacity the load points multiply: the measured one, or ``--capacity`` when given (so
    that runs on a host whose speed drifts between minutes offer the same rates), with the
    measurement kept beside it."""
    if given_rps is None:
        return measured
    return {
        **measured,
        "rps": given_rps,
        "measured_rps": measured["rps"],
        "method": f"given (--capacity {given_rps:g}); measured {measured['rps']:.1f} req/s, {measured['method']}",
    }


# requests of a low-load measurement that only warm the connection and the code paths: sent, not counted
LOW_LOAD_WARMUP = 10
# the pause between low-load requests (the server is idle when each arrives), and between the
# in-process cross-check's forward passes, so that the two sides of the comparison pause alike
LOW_LOAD_GAP_S = 0.005


def _pinned(subnet: tuple[float, float]) -> dict[str, str]:
    """Headers of a low-load request: pinned to ``subnet``, with a budget it cannot miss."""
    return {
        "X-Latency-Budget-Ms": "60000",
        "X-DynaBERT-Width": f"{subnet[0]:g}",
        "X-DynaBERT-Depth": f"{subnet[1]:g}",
    }


def _low_load_summary(records: list[Record]) -> dict:
    """p50 end to end and of the server's own total, tokenize, infer and forward times over the
    answered requests. The overhead is end to end minus in-process inference, as issue 4 words
    it: what the same input costs a caller that runs the model in its own process, tokenising and
    the forward pass, both from the server's ``Server-Timing`` of the same request (``tokenize``
    on the event loop, ``forward`` timed inside the inference worker), so a drift of the host
    falls on both sides alike. From a server that reports no ``tokenize``, the forward pass
    alone; from one that reports no ``forward``, ``infer`` (the batch as the server sees it,
    including the round trip to the worker). The stricter numbers, minus the forward pass alone
    and minus infer, are kept beside it. None when the server sent no Server-Timing."""
    ok = [r for r in records if r.status == 200]
    if not ok:
        raise RuntimeError(f"low-load requests failed: {Counter(r.status for r in records)}")
    e2e = percentile([r.latency_ms for r in ok], 50)
    infer = percentile([r.server_ms["infer"] for r in ok if "infer" in r.server_ms], 50)
    fwd = percentile([r.server_ms["forward"] for r in ok if "forward" in r.server_ms], 50)
    tok = percentile([r.server_ms["tokenize"] for r in ok if "tokenize" in r.server_ms], 50)
    # paired per request: the p50 of each request's tokenise + forward, not a sum of two p50s
    both = [
        r.server_ms["tokenize"] + r.server_ms["forward"]
        for r in ok
        if {"tokenize", "forward"} <= r.server_ms.keys()
    ]
    tok_fwd = percentile(both, 50) if both else None
    if tok_fwd is not None:
        basis, base = "tokenize+forward", tok_fwd
    elif fwd is not None:
        basis, base = "forward", fwd
    else:
        basis, base = "infer", infer

    def minus(x: float | None) -> float | None:
        return e2e - x if e2e is not None and x is not None else None

    return {
        "requests": len(ok),
        "e2e_p50_ms": e2e,
        "server_total_p50_ms": percentile([r.server_ms["total"] for r in ok if "total" in r.server_ms], 50),
        "server_infer_p50_ms": infer,
        "server_forward_p50_ms": fwd,
        "server_tokenize_p50_ms": tok,
        "basis": basis,
        "basis_p50_ms": base,
        "overhead_ms": minus(base),
        "overhead_forward_ms": minus(fwd),
        "overhead_infer_ms": minus(infer),
    }


async def _low_load_http(
    client: ClientPool, server: Server, text: str, subnet: tuple[float, float], n: int
) -> dict:
    url = check_loopback(server.base_url) + CLASSIFY_PATH
    records: list[Record] = []
    for i in range(n + LOW_LOAD_WARMUP):
        t = _now()
        r = await _one(client, url, text, _pinned(subnet), t, 0.0, 30.0)
        if i >= LOW_LOAD_WARMUP:
            records.append(r)
        await asyncio.sleep(LOW_LOAD_GAP_S)  # low load: the server is idle when each request arrives
    return _low_load_summary(records)


def _low_load_raw(server: Server, text: str, subnet: tuple[float, float], n: int) -> dict:
    """Like :func:`_low_load_http`, with :class:`bench.transport.BlockingClient` (blocking, run in
    a thread): what the server and the loopback add, without an asyncio HTTP client's own cost.
    Each request is timed from its first byte sent to its answer's last byte received (the
    request's bytes built once, the answer parsed after the clock stops), as wrk times one."""
    base = urlsplit(check_loopback(server.base_url))
    headers = {"Content-Type": "application/json", **_pinned(subnet)}
    body = json.dumps(classify_body(text)).encode()
    raw = BlockingClient.prepare("POST", CLASSIFY_PATH, body, headers)
    records: list[Record] = []
    with BlockingClient(base.hostname or LOOPBACK, base.port or 80) as c:
        for i in range(n + LOW_LOAD_WARMUP):
            t0 = time.perf_counter()
            c.send(raw)
            status, fields, _ = c.answer()
            t1 = c.received_at
            if status != 200:
                raise RuntimeError(f"low-load request failed with {status}")
            if i >= LOW_LOAD_WARMUP:
                timing = parse_server_timing(fields.get("server-timing"))
                records.append(Record(0.0, (t1 - t0) * 1e3, status, server_ms=timing))
            time.sleep(LOW_LOAD_GAP_S)  # low load: the server is idle when each request arrives
    return _low_load_summary(records)


def inprocess_latency(
    checkpoint: Path,
    text: str,
    subnet: tuple[float, float],
    n: int,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, float]:
    """p50 of tokenise + forward (and of the forward alone) of one input in this process, on
    ``device`` (reading the probabilities back waits for the device), on ``threads`` intra-op
    threads (default: torch's), pausing ``LOW_LOAD_GAP_S`` between inputs as the low-load HTTP
    requests do. The bench passes the thread count the server's forward passes ran on, so that
    the forward pass is the same computation on both sides (it ran on torch's default, two
    threads, against the server's one). What remains between the two is the host's drift from
    the HTTP run to this one, minutes later: 1/1's forward took 10.6 ms in the server's worker
    and 8.5 ms here in serve-104, and 9.4-10.2 ms here in four runs a minute apart
    (docs/RESULTS.md), which is why the headline subtracts the server's own forward time."""
    import torch

    from model.checkpoint import load_checkpoint

    if threads is not None and device == "cpu":
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return inprocess_latency(checkpoint, text, subnet, n, device)
        finally:
            torch.set_num_threads(before)

    ck = load_checkpoint(checkpoint)
    if ck.tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer files")
    w, d = subnet
    dev = torch.device(device)
    ck.model.to(dev)

    def encode() -> dict[str, torch.Tensor]:
        enc = ck.tokenizer(text, truncation=True, max_length=ck.max_seq_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v.to(dev, non_blocking=True) for k, v in enc.items() if k in keep}

    full, fwd = [], []
    with torch.inference_mode():
        for i in range(n + LOW_LOAD_WARMUP):
            t0 = time.perf_counter()
            enc = encode()
            t1 = time.perf_counter()
            ck.model(**enc, width=w, depth=d).logits.softmax(-1).tolist()
            t2 = time.perf_counter()
            if i >= LOW_LOAD_WARMUP:
                full.append((t2 - t0) * 1e3)
                fwd.append((t2 - t1) * 1e3)
            time.sleep(LOW_LOAD_GAP_S)
    return {
        "tokenize_forward_p50_ms": float(np.median(full)),
        "forward_p50_ms": float(np.median(fwd)),
        "torch_threads": torch.get_num_threads(),
    }


# The host's speed, probed between blocks. On a shared VM a neighbour's load makes the same
# instructions take longer (cycles the hypervisor gives to another guest are invisible inside
# this one: they read as a slower CPU), and within one run the full network's measured capacity
# went from 240 to 144 requests/s and the smallest sub-network's forward pass from 1.6 to 2.9 ms
# (2026-12-03): points measured on such a host compare the policies on a different machine than
# the one the loads were scaled to. The probe says when that happened.
HOST_PROBE_LOOP = 100_000  # iterations of the probe's loop: a few ms of pure Python
# effective accuracies closer than this are a tie (rounding, not a difference in what was served)
ACCURACY_TIE = 1e-9
HOST_DRIFT = 1.25  # a probe this much slower or faster than at the capacity measurement: another host


def host_probe_ms(reps: int = 9) -> float:
    """Milliseconds of a fixed loop of pure Python on this process's thread, the median of
    ``reps`` tries: the host's speed now, as one number that a slower host (a neighbour's load,
    a lower clock) makes larger. The median, not the fastest: a core shared in time slices of a
    few ms lets some tries through untouched, and a server on that core runs at the shared
    speed. Run with the servers idle, so that it measures the host and not the benchmark."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x = 0
        for i in range(HOST_PROBE_LOOP):
            x += i & 7
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def host_slowdown(result: dict[str, Any], host_ms: float | None) -> float | None:
    """How much slower the host was at a probe of ``host_ms`` than when the capacity was measured
    (below 1: faster; None without probes: a result from before they existed)."""
    start = result.get("host", {}).get("start_ms")
    return host_ms / start if start and host_ms else None


def host_span(result: dict[str, Any], run: dict[str, Any]) -> tuple[float, float] | None:
    """A run's fastest and slowest probe over the capacity measurement's (one probe, as after the
    hog run: both the same; None without probes)."""
    hi = host_slowdown(result, run.get("host_ms"))
    lo = host_slowdown(result, run.get("host_min_ms", run.get("host_ms")))
    return None if hi is None or lo is None else (lo, hi)


def host_drift(result: dict[str, Any], run: dict[str, Any]) -> float:
    """The run's farthest probe from the capacity measurement's, as a factor >= 1 with the sign of
    the change: 1.3 for a host 1.3x slower, -1.4 for one 1.4x faster (1.0 without probes). A
    faster host makes a point's load a smaller multiple of what the host could serve, a slower
    one a larger: either way not the load it is labelled."""
    span = host_span(result, run)
    if span is None:
        return 1.0
    lo, hi = span
    return hi if hi >= 1 / lo else -1 / lo


async def _run_block(
    client: ClientPool,
    server: Server,
    rate: float,
    duration_s: float,
    texts: list[str],
    cfg: BenchConfig,
    rng: random.Random,
) -> dict[str, Any]:
    """One stretch of Poisson arrivals at ``rate`` against ``server``, then wait for it to idle.

    The stretch begins with ``cfg.warmup_s`` seconds of the same arrivals whose requests are not
    counted. The policies take turns, so each server has been idle for the other policies'
    blocks (seconds) when its block starts, and its first forward passes run several times
    slower than warm ones (threads and caches gone cold on these VMs). Those first half-seconds
    measured the cold start of an idle server: at 3x capacity, sla kept 56-100% within budget in a
    block's first half-second (mean 86%) and fixed smallest 66-100% (94%), against 94-100% (98%)
    and 90-100% (97%) in the rest of the blocks (docs/RESULTS.md). A load point asks about a
    steady offered load, which has no such gaps; a surge on an idle server is what
    ``dynabert bench burst`` measures."""
    warm = cfg.warmup_s
    schedule = poisson_schedule(rate, warm + duration_s, rng, cfg.max_requests)
    cpu0, (front0, worker0) = time.process_time(), server.cpu_s()
    records, wall = await open_loop(
        client, server.base_url, schedule, texts, budget_ms=cfg.budget_ms, timeout_s=cfg.timeout_s,
        extra_headers=cfg.client_headers(),
    )  # fmt: skip
    cpu = time.process_time() - cpu0
    front1, worker1 = server.cpu_s()
    # the server's CPU per request sent (warm-up included: its requests cost the same)
    server_cpu = {"requests": len(records), "front_s": front1 - front0, "worker_s": worker1 - worker0}
    if warm > 0:
        records = [replace(r, sched_s=r.sched_s - warm) for r in records if r.sched_s >= warm]
        cpu *= duration_s / (warm + duration_s)
        wall = max(wall - warm, 1e-9)
    gauges = await scrape_gauges(client, server.base_url)  # right at the end, still loaded
    await wait_idle(client, server.base_url)
    return {
        "records": records, "wall": wall, "cpu": cpu, "gauges": gauges, "server_cpu": server_cpu,
        "host_ms": host_probe_ms(),  # idle again: the host's speed at the block's end
    }  # fmt: skip


def point_stats(
    name: str,
    load: float,
    rate: float,
    blocks: list[dict[str, Any]],
    metric: dict[str, float],
    cfg: BenchConfig,
) -> dict[str, Any]:
    """One policy's load point from its blocks: their requests pooled, their wall times summed.
    Each block's own attainment and effective accuracy are kept too (``block_attainment``,
    ``block_effective_accuracy``): the policies took turns block by block, so block j of one
    policy ran next to block j of another, and their differences pair up (:func:`paired`)."""
    records = [r for b in blocks for r in b["records"]]
    wall = sum(b["wall"] for b in blocks)
    client_cores = sum(b["cpu"] for b in blocks) / wall  # the generator shares the machine's cores
    # the server's own CPU per request: the front (event loop, HTTP, policy) and the worker
    sent = sum(b["server_cpu"]["requests"] for b in blocks if "server_cpu" in b)
    server_cpu_ms = (
        {
            part: 1e3 * sum(b["server_cpu"][f"{part}_s"] for b in blocks if "server_cpu" in b) / sent
            for part in ("front", "worker")
        }
        if sent
        else None
    )
    host = [b["host_ms"] for b in blocks if "host_ms" in b]
    stats = analyze(records, cfg.budget_ms, metric, wall)
    per_block = [analyze(b["records"], cfg.budget_ms, metric, max(b["wall"], 1e-9)) for b in blocks]
    if stats.max_lag_ms > 10:
        log.warning(
            "the load generator fired up to %.0f ms late (CPU-starved client); "
            "those requests' latency includes the lag",
            stats.max_lag_ms,
        )
    log.info(
        "%-14s %.2fx (%.0f req/s): %5.1f%% within %g ms, p99 %s ms, eff. acc %.4f, client %.2f cores, "
        "server CPU per request %s; outside the server p50/p99 %s/%s ms, misses it did not see %.1f%%",
        name,
        load,
        rate,
        100 * stats.attainment,
        cfg.budget_ms,
        _fmt(stats.p99_ms),
        stats.effective_accuracy,
        client_cores,
        f"{server_cpu_ms['front']:.2f} + {server_cpu_ms['worker']:.2f} ms (front + worker)"
        if server_cpu_ms
        else "n/a",
        _fmt(stats.outside_p50_ms, ".2f"),
        _fmt(stats.outside_p99_ms, ".2f"),
        100 * stats.unseen_misses,
    )
    return {
        "policy": name,
        "load": load,
        "offered_rps": rate,
        "wall_s": wall,
        "blocks": len(blocks),
        "client_cpu_cores": client_cores,
        "server_cpu_ms_per_request": server_cpu_ms,
        **asdict(stats),
        "block_attainment": [b.attainment for b in per_block],
        "block_effective_accuracy": [b.effective_accuracy for b in per_block],
        "server": blocks[-1]["gauges"],
        # the host's speed after each block (host_probe_ms), the slowest and the fastest
        "block_host_ms": host,
        "host_ms": max(host, default=None),
        "host_min_ms": min(host, default=None),
    }


# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (then the normal's 1.96 is
# within 0.3 of it for a handful more; the benchmark runs 5 blocks by default)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Mean of the paired differences a[j] - b[j] and the half-width of its 95% confidence
    interval (Student's t over the pairs); None with fewer than two pairs. Two policies' blocks
    at one load ran side by side in time, so a stretch of background load on the shared machine
    shifts both members of a pair: the spread of the differences is the noise the comparison has
    to beat, which the pooled numbers alone do not show."""
    n = min(len(a), len(b))
    if n < 2:
        return None
    d = np.asarray(a[:n], dtype=float) - np.asarray(b[:n], dtype=float)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return float(d.mean()), float(t * d.std(ddof=1) / math.sqrt(n))


def variant_effects(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each variant (``base@setting=value``, :func:`parse_variant`) against its base at every load
    both ran: the pooled differences of attainment and effective accuracy, and the mean and 95%
    confidence half-width of their paired block differences (:func:`paired`; the two ran block by
    block side by side). A difference whose interval excludes 0 is a setting's effect on this
    host beyond the noise of the run."""
    out = []
    for p in result["points"]:
        base, overrides = parse_variant(p["policy"])
        b = _point(result, base, p["load"]) if overrides else None
        if b is None:
            continue
        row: dict[str, Any] = {"variant": p["policy"], "base": base, "load": p["load"]}
        for what, blocks in (
            ("attainment", "block_attainment"),
            ("effective_accuracy", "block_effective_accuracy"),
        ):
            row[what] = p[what] - b[what]
            row[f"{what}_paired"] = paired(p.get(blocks, []), b.get(blocks, []))
        out.append(row)
    return out


async def _run_load(
    client: ClientPool,
    servers: dict[str, Server],
    order: list[str],
    load: float,
    capacity: float,
    texts: list[str],
    metric: dict[str, float],
    cfg: BenchConfig,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Every policy at one load, in ``cfg.blocks`` blocks each: the point's duration is cut into
    blocks and the policies take turns block by block, in an order rotated each round, so a
    stretch of background load on a shared machine (another tenant, a noisy host) falls on all
    policies alike instead of on whichever ran during it (a blocked, interleaved design)."""
    rate = load * capacity
    n = max(1, cfg.blocks)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for j in range(n):
        k = j % len(order)
        for name in order[k:] + order[:k]:
            runs[name].append(
                await _run_block(client, servers[name], rate, cfg.duration_s / n, texts, cfg, rng)
            )
    return [point_stats(name, load, rate, runs[name], metric, cfg) for name in order]


async def _run_async(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    """All servers are started first and stay up (an idle server costs next to nothing); each load
    point then runs the policies in turns, block by block (:func:`_run_load`), so on a shared
    machine the policies compared at one load see the same background load."""
    from model.checkpoint import read_eval
    from service.profile import gpu_name

    rng = random.Random(cfg.seed)
    widths, depths, _meta = _read_grid(cfg.checkpoint)
    specs = {p: policy_spec(p, widths, depths) for p in cfg.policies}
    texts = load_texts(rng)
    overhead_text = texts[0]
    full = (max(widths), max(depths))
    result: dict[str, Any] = {
        "config": {
            **asdict(cfg),
            "checkpoint": str(cfg.checkpoint),
            "server_cgroup": cfg.server_cgroup and str(cfg.server_cgroup),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_start": os.getloadavg(),
            "device": cfg.device,
            "gpu": gpu_name(cfg.device),
        },
        "points": [],
        "hog": [],
    }
    async with make_client() as client:
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            for name in cfg.policies:
                servers[name] = stack.enter_context(
                    Server(
                        cfg.checkpoint,
                        {**specs[name].env, "DYNABERT_DEVICE": cfg.device},
                        workdir / f"server-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.log",
                        workers=cfg.server_workers,
                        cgroup=cfg.server_cgroup,
                    )
                )
            result["host"] = {"drift_above": HOST_DRIFT}
            probe_name = "fixed-full" if "fixed-full" in servers else cfg.policies[0]
            probe = servers[probe_name]
            models = (await client.get(probe.base_url + "/v1/models")).json()
            metric = subnet_metrics(models, read_eval(cfg.checkpoint))
            if not metric:
                raise ValueError(f"{cfg.checkpoint}: no dev metrics in /v1/models or eval.json")
            result["metrics"] = metric
            pin = None if probe_name == "fixed-full" else full
            result["capacity"] = load_scale(
                await _measure_capacity(client, probe, texts, cfg, pin), cfg.capacity_rps
            )
            # the points' host speed is compared with the capacity's own (its rounds' median probe)
            result["host"]["start_ms"] = result["capacity"]["host_ms"]
            capacity = result["capacity"]["rps"]
            n_low = cfg.overhead_requests
            threads_before = await scrape_threads(client, probe.base_url)
            low_http = await asyncio.to_thread(_low_load_raw, probe, overhead_text, full, n_low)
            low_http["policy"] = probe_name
            # the intra-op threads the server's forward passes ran on, for the in-process
            # cross-check to run on as many: the forward pass is then the same computation
            ran = (await scrape_threads(client, probe.base_url)) - threads_before
            server_threads = ran.most_common(1)[0][0] if ran else None
            # the same with the load generator's asyncio + httpx client, whose own per-request
            # cost is in its end-to-end time
            low_httpx = await _low_load_http(client, probe, overhead_text, full, n_low)
            # the same at the smallest sub-network: how much of the overhead comes with a long
            # multi-threaded forward pass sharing the cores with the event loop and the client
            smallest = (min(widths), min(depths))
            low_small = await asyncio.to_thread(_low_load_raw, probe, overhead_text, smallest, n_low)
            await wait_idle(client, probe.base_url)
            for i, load in enumerate(cfg.loads):
                k = i % len(cfg.policies)
                order = list(cfg.policies[k:] + cfg.policies[:k])
                points = await _run_load(client, servers, order, load, capacity, texts, metric, cfg, rng)
                result["points"] += points
                drifted = _drifted(result, *points)
                if drifted:
                    log.warning(
                        "at %gx%s: this point's load is not the multiple it is labelled", load, drifted
                    )
            if cfg.hog:
                for name in hog_policies(cfg.policies):
                    hog = await _hog_run(client, servers[name], name, texts, metric, capacity, cfg, rng)
                    result["hog"].append(hog)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["host"]["end_ms"] = host_probe_ms()
    inproc = inprocess_latency(
        cfg.checkpoint, overhead_text, full, cfg.overhead_requests, cfg.device, threads=server_threads
    )
    low_http.update(inproc)
    low_http["server_threads"] = server_threads
    low_http["subnetwork"] = subnet_key(*full)
    low_http["text_chars"] = len(overhead_text)
    low_http["overhead_inprocess_ms"] = low_http["e2e_p50_ms"] - inproc["tokenize_forward_p50_ms"]
    # headline: minus the server's own infer time of the same requests (paired in time, so a
    # busy shared machine shifts both terms alike); the in-process number is the cross-check
    if low_http["overhead_ms"] is not None:
        low_http["overhead_basis"] = f"Server-Timing {low_http['basis']}"
    else:
        low_http["overhead_ms"] = low_http["overhead_inprocess_ms"]
        low_http["overhead_basis"] = "in-process tokenise+forward"
    low_http["client"] = "one blocking keep-alive socket (bench/transport.py BlockingClient)"
    low_http["httpx"] = low_httpx
    low_http["smallest"] = {**low_small, "subnetwork": subnet_key(*smallest)}
    result["overhead"] = low_http
    rank = {p: i for i, p in enumerate(cfg.policies)}  # report in the order asked for, not the run order
    result["points"].sort(key=lambda p: (rank[p["policy"]], p["load"]))
    result["hog"].sort(key=lambda h: rank[h["policy"]])
    result["checks"] = checks(result)
    result["variants"] = variant_effects(result)
    return result


def hog_policies(policies: Sequence[str]) -> list[str]:
    """The policies the hog scenario runs, one after the other: sla, each variant of sla in the
    order asked for (a setting's effect under a hog is what a variant is often run to see), then
    fixed full. Not paired block by block as the load points are: each runs its own 20 s."""
    sla = [p for p in policies if p == "sla"]
    variants = [p for p in policies if p != "sla" and parse_variant(p)[0] == "sla"]
    return sla + variants + [p for p in policies if p == "fixed-full"]


async def _hog_run(
    client: ClientPool,
    server: Server,
    name: str,
    texts: list[str],
    metric: dict[str, float],
    capacity: float,
    cfg: BenchConfig,
    rng: random.Random,
) -> dict[str, Any]:
    rate = cfg.hog_load * capacity
    half = cfg.hog_duration_s / 2
    schedule = poisson_schedule(rate, cfg.hog_duration_s, rng, cfg.max_requests)
    hog = hog_for(cfg.hog_kind, cfg.device, max_seconds=cfg.hog_duration_s + cfg.timeout_s + 30)
    try:
        records, wall = await open_loop(
            client,
            server.base_url,
            schedule,
            texts,
            budget_ms=cfg.budget_ms,
            timeout_s=cfg.timeout_s,
            extra_headers=cfg.client_headers(),
            at=[(half, hog.start)],
        )
    finally:
        hog.stop()
    before = [r for r in records if r.sched_s < half]
    after = [r for r in records if r.sched_s >= half]
    out = {
        "policy": name,
        "load": cfg.hog_load,
        "offered_rps": rate,
        "hog_kind": cfg.hog_kind,
        "hog_processes": hog.processes,
        "hog_starts_s": half,
        "before": asdict(analyze(before, cfg.budget_ms, metric, half)),
        "after": asdict(analyze(after, cfg.budget_ms, metric, max(wall - half, 1e-9))),
        "overall": asdict(analyze(records, cfg.budget_ms, metric, wall)),
        "timeline": attainment_timeline(records, cfg.budget_ms, max(cfg.hog_duration_s / 20, 0.1)),
    }
    log.info(
        "hog %-10s before %.1f%%, after %.1f%%, overall %.1f%% within budget",
        name,
        100 * out["before"]["attainment"],
        100 * out["after"]["attainment"],
        100 * out["overall"]["attainment"],
    )
    await wait_idle(client, server.base_url)
    out["host_ms"] = host_probe_ms()  # the hog stopped: the host's own speed after the run
    return out


# ---- verdicts, tables and the plot ---------------------------------------------------------------


def _point(result: dict, policy: str, load: float) -> dict | None:
    return next((p for p in result["points"] if p["policy"] == policy and p["load"] == load), None)


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets, each with what was measured and whether it holds (None: not measured)."""
    out: list[dict[str, Any]] = []
    sla2, full2 = _point(result, "sla", 2.0), _point(result, "fixed-full", 2.0)
    out.append(
        {
            "target": "at 2x capacity: sla >= 99% within budget, fixed full < 50%",
            "measured": (
                f"sla {100 * sla2['attainment']:.1f}%{_block_range(sla2)}, "
                f"fixed full {100 * full2['attainment']:.1f}%{_block_range(full2)}"
                if sla2 and full2
                else "not measured (needs load 2 and both policies)"
            ),
            "ok": (sla2["attainment"] >= 0.99 and full2["attainment"] < 0.5) if sla2 and full2 else None,
        }
    )
    if sla2 and full2:
        out[-1]["measured"] += _drifted(result, sla2, full2)
    worse, beyond = [], []
    compared, with_blocks = 0, False
    for p in result["points"]:
        if p["policy"] != "sla":
            continue
        for base in ("fixed-full", "fixed-smallest"):
            b = _point(result, base, p["load"])
            if b is not None:
                compared += 1
                if p["effective_accuracy"] < b["effective_accuracy"] - ACCURACY_TIE:
                    diff = paired(
                        p.get("block_effective_accuracy", []), b.get("block_effective_accuracy", [])
                    )
                    where = f"{p['load']:g}x vs {base}"
                    if diff is not None:
                        with_blocks = True
                        where += f" ({100 * diff[0]:+.2f} ± {100 * diff[1]:.2f})"
                        if diff[0] + diff[1] < 0:
                            beyond.append(f"{p['load']:g}x vs {base}")
                    worse.append(where)
    noise = (
        "; paired block differences in points, mean ± 95% CI; below by more than that CI at: "
        + (", ".join(beyond) or "none")
        if with_blocks
        else ""
    )
    drifted = sorted({p["load"] for p in result["points"] if abs(host_drift(result, p)) > HOST_DRIFT})
    out.append(
        {
            "target": "sla effective accuracy >= both fixed baselines at every load",
            "measured": f"{compared} comparisons, sla below at: {', '.join(worse) or 'none'}{noise}"
            + (
                f"; the host's speed was over {HOST_DRIFT:g}x off the capacity measurement's at: "
                + ", ".join(f"{x:g}x" for x in drifted)
                if drifted
                else ""
            ),
            "ok": (not worse) if compared else None,
        }
    )
    hog = next((h for h in result["hog"] if h["policy"] == "sla"), None)
    out.append(
        {
            "target": f"with the {hog['hog_kind'].upper() if hog else 'CPU'} hog, sla >= 95% within budget",
            "measured": (
                f"overall {100 * hog['overall']['attainment']:.1f}% (after the hog starts "
                f"{100 * hog['after']['attainment']:.1f}%)"
                if hog
                else "not measured (run with --hog)"
            ),
            "ok": hog["overall"]["attainment"] >= 0.95 if hog else None,
        }
    )
    if hog:
        out[-1]["measured"] += _drifted(result, hog)
    oh = result.get("overhead")
    out.append(
        {
            "target": "HTTP overhead at low load <= 2 ms",
            "measured": (
                f"{oh['overhead_ms']:.2f} ms (vs {oh['overhead_basis']}; blocking socket client)"
                + (
                    f"; {oh['overhead_forward_ms']:.2f} ms vs the forward pass alone"
                    if oh.get("basis") == "tokenize+forward" and oh.get("overhead_forward_ms") is not None
                    else ""
                )
                + (f"; {oh['httpx']['overhead_ms']:.2f} ms from asyncio + httpx" if oh.get("httpx") else "")
                + (
                    f"; {oh['overhead_inprocess_ms']:.2f} ms vs tokenise+forward timed in the benchmark's "
                    "process (the same thread count and pauses, minutes later: it also carries the "
                    "host's drift between the two)"
                    if oh.get("overhead_inprocess_ms") is not None
                    and oh.get("overhead_basis") != "in-process tokenise+forward"
                    else ""
                )
                if oh
                else "not measured"
            ),
            "ok": oh["overhead_ms"] <= 2.0 if oh else None,
        }
    )
    return out


def _drifted(result: dict[str, Any], *runs: dict[str, Any]) -> str:
    """'; the host ran 1.6x slower ...' (or faster) when a probe after ``runs`` was more than
    HOST_DRIFT off the one at the capacity measurement ('' otherwise, or without probes)."""
    worst = max((host_drift(result, r) for r in runs), key=abs, default=1.0)
    if abs(worst) <= HOST_DRIFT:
        return ""
    way = "slower" if worst > 0 else "faster"
    return f"; the host ran {abs(worst):.1f}x {way} than at the capacity measurement (host_probe_ms)"


def _host_range(result: dict[str, Any], p: dict[str, Any]) -> str:
    """'0.97-1.31': a point's fastest and slowest probe over the capacity measurement's."""
    span = host_span(result, p)
    if span is None:
        return "—"
    lo, hi = span
    return f"{hi:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _block_range(p: dict[str, Any]) -> str:
    """' (blocks 93.1-99.0%)': the spread of a point's attainment over its blocks ('' for one)."""
    blocks = p.get("block_attainment") or []
    if len(blocks) < 2:
        return ""
    return f" (blocks {100 * min(blocks):.1f}-{100 * max(blocks):.1f}%)"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _hog_words(h: dict[str, Any]) -> str:
    if h.get("hog_kind", "cpu") == "gpu":
        return (
            f"GPU hog ({h['hog_processes']} process of back-to-back bf16 matrix products on the served GPU)"
        )
    return f"CPU hog ({h['hog_processes']} spinning processes)"


def _machine(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    la = [m[k][0] for k in ("loadavg_start", "loadavg_end") if m.get(k)]
    gpu = f", served on {m['gpu']} ({m['device']})" if m.get("gpu") else ""
    workers = result.get("config", {}).get("server_workers", 1)
    gpu += f", every server with {workers} uvicorn workers" if workers > 1 else ""
    return f"{m.get('cpus', '?')} CPUs{gpu}" + (
        f", 1-min load average {', then '.join(f'{x:.1f}' for x in la)}" if la else ""
    )


def _shares(shares: dict[str, float], top: int = 3) -> str:
    items = list(shares.items())
    s = ", ".join(f"{k} {100 * v:.0f}%" for k, v in items[:top])
    return s + (f", +{len(items) - top} more" if len(items) > top else "")


def _server_cpu(p: dict[str, Any]) -> str:
    cpu = p.get("server_cpu_ms_per_request")
    return f"{cpu['front']:.2f} + {cpu['worker']:.2f}" if cpu else "n/a"


def markdown(result: dict[str, Any]) -> str:
    """The tables for docs/RESULTS.md."""
    cfg, cap = result["config"], result.get("capacity", {})
    lines = [
        f"Budget {cfg['budget_ms']:g} ms, {cfg['duration_s']:g} s per point, Poisson arrivals (open loop), "
        f"each point in {cfg.get('blocks', 1)} block(s) with the policies taking turns block by block"
        + (
            f", each block after {cfg['warmup_s']:g} s of warm-up at its rate (not counted)"
            if cfg.get("warmup_s")
            else ""
        )
        + "; "
        f"{_machine(result)}; "
        + (f"the servers in cgroup {cfg['server_cgroup']}; " if cfg.get("server_cgroup") else "")
        + f"full-network capacity {_fmt(cap.get('rps'))} req/s ({cap.get('method', '?')}). "
        f"Clients give up after {1e3 * cfg.get('timeout_s', 0):g} ms"
        + (" and announce it in X-Request-Timeout-Ms. " if cfg.get("send_timeout") else ". ")
        + "Within budget: 200 answered within the budget end to end (503s/timeouts are misses), with "
        "the lowest and highest of the point's blocks; "
        "percentiles over the 200s; effective accuracy: mean dev metric of the chosen sub-network "
        "(width/depth), a miss counting 0; server contention: the policy's latency multiplier "
        "(dynabert_contention_factor) at the end of the point; server CPU: the server's CPU time per "
        "request sent, its own process (event loop, HTTP, policy) + its inference worker; host: "
        "the fastest and slowest of the point's probes of the host's speed after its blocks (a fixed "
        "loop of pure Python, host_probe_ms) over the median of the capacity rounds' probes"
        + (f" ({result['host']['start_ms']:.2f} ms)" if result.get("host", {}).get("start_ms") else "")
        + f"; beyond {1 / HOST_DRIFT:g}-{HOST_DRIFT:g} a point's load is not the multiple of the host's "
        "capacity it is labelled.",
        "",
        "| policy | load | offered req/s | throughput req/s | within budget | errors | p50 ms | p95 ms | p99 ms "
        "| eff. accuracy | sub-networks (width/depth) | server contention x | server CPU ms/request "
        "| host x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['policy']} | {p['load']:g}x | {p['offered_rps']:.0f} | {p['throughput_rps']:.0f} "
            f"| {100 * p['attainment']:.1f}%{_block_range(p)} | {100 * p['errors']:.1f}% | {_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} "
            f"| {_fmt(p['p99_ms'])} | {p['effective_accuracy']:.4f} | {_shares(p['shares'])} "
            f"| {_fmt(p.get('server', {}).get('contention_factor'), '.2f')} | {_server_cpu(p)} "
            f"| {_host_range(result, p)} |"
        )
    if result["hog"]:
        lines += [
            "",
            f"{_hog_words(result['hog'][0])} from halfway through "
            f"a {cfg['hog_duration_s']:g} s run at {cfg['hog_load']:g}x capacity:",
            "",
            "| policy | within budget before | after | overall | p99 after ms | eff. accuracy overall "
            "| sub-networks after |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in result["hog"]:
            lines.append(
                f"| {h['policy']} | {100 * h['before']['attainment']:.1f}% | {100 * h['after']['attainment']:.1f}% "
                f"| {100 * h['overall']['attainment']:.1f}% | {_fmt(h['after']['p99_ms'])} "
                f"| {h['overall']['effective_accuracy']:.4f} | {_shares(h['after']['shares'])} |"
            )
    oh = result.get("overhead")
    if oh:
        lines += [
            "",
            f"HTTP overhead at low load (sub-network {oh['subnetwork']}, one {oh['text_chars']}-character "
            f"SST-2 sentence, {oh['requests']} sequential requests, policy {oh['policy']}): "
            f"**{oh['overhead_ms']:.2f} ms** = p50 end to end {oh['e2e_p50_ms']:.2f} ms - p50 {oh['overhead_basis']} "
            f"{_fmt(oh.get('basis_p50_ms', oh.get('server_infer_p50_ms')), '.2f')} ms (server total p50 "
            f"{_fmt(oh.get('server_total_p50_ms'), '.2f')} ms"
            + (
                f", tokenize p50 {oh['server_tokenize_p50_ms']:.2f} ms, forward p50 "
                f"{oh['server_forward_p50_ms']:.2f} ms: minus the forward pass alone, {oh['overhead_forward_ms']:.2f} ms"
                if oh.get("basis") == "tokenize+forward"
                else ""
            )
            + (
                f", infer p50 {oh['server_infer_p50_ms']:.2f} ms: minus that, {oh['overhead_infer_ms']:.2f} ms"
                if oh.get("basis") in ("forward", "tokenize+forward")
                and oh.get("overhead_infer_ms") is not None
                else ""
            )
            + "). Cross-check in this process after the servers "
            f"stopped, pausing {1e3 * LOW_LOAD_GAP_S:g} ms between inputs as the requests did: "
            f"tokenise+forward p50 {oh['tokenize_forward_p50_ms']:.2f} ms (forward alone "
            f"{oh['forward_p50_ms']:.2f} ms, {oh['torch_threads']} torch thread(s)"
            + (", as the server's forward passes" if oh.get("server_threads") == oh["torch_threads"] else "")
            + "), end to end minus that "
            f"{oh['overhead_inprocess_ms']:.2f} ms. Client: {oh.get('client', 'httpx')}.",
        ]

        def same_requests(what: str, o: dict | None, note: str, bold: bool) -> None:
            if o and o.get("overhead_ms") is not None:
                value = f"**{o['overhead_ms']:.2f} ms**" if bold else f"{o['overhead_ms']:.2f} ms"
                lines[-1] += (
                    f" The same requests {what}: p50 end to end {o['e2e_p50_ms']:.2f} ms - p50 Server-Timing "
                    f"{o.get('basis', 'infer')} {_fmt(o.get('basis_p50_ms', o.get('server_infer_p50_ms')), '.2f')} ms "
                    f"= {value}{note}."
                )

        same_requests(
            "from the load generator's asyncio + httpx client",
            oh.get("httpx"),
            " (the difference is the client's own per-request work)",
            False,
        )
        sm = oh.get("smallest")
        same_requests(f"pinned to the smallest sub-network {sm and sm['subnetwork']}", sm, "", True)
    if result.get("variants"):
        lines += [
            "",
            "Variants against their base policy at the same load, block by block (paired block "
            "differences, mean ± 95% CI, in points; the pooled difference first):",
            "",
            "| variant | load | within budget | eff. accuracy |",
            "|---|---|---|---|",
        ]

        def diff(v: dict[str, Any], what: str) -> str:
            pair = v[f"{what}_paired"]
            ci = f" ({100 * pair[0]:+.2f} ± {100 * pair[1]:.2f})" if pair else ""
            return f"{100 * v[what]:+.2f}{ci}"

        for v in result["variants"]:
            lines.append(
                f"| {v['variant']} vs {v['base']} | {v['load']:g}x | {diff(v, 'attainment')} "
                f"| {diff(v, 'effective_accuracy')} |"
            )
    lines += ["", "| target (issue 4) | measured | holds |", "|---|---|---|"]
    for c in result["checks"]:
        verdict = "n/a" if c["ok"] is None else ("yes" if c["ok"] else "**no**")
        lines.append(f"| {c['target']} | {c['measured']} | {verdict} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 4 if result["hog"] else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    policies = list(dict.fromkeys(p["policy"] for p in result["points"]))
    for name in policies:
        pts = [p for p in result["points"] if p["policy"] == name]
        loads = [p["load"] for p in pts]
        axes[0].plot(loads, [100 * p["attainment"] for p in pts], marker="o", label=name)
        axes[1].plot(loads, [p["effective_accuracy"] for p in pts], marker="o", label=name)
    axes[0].set(
        xlabel="offered load (x full-network capacity)",
        ylabel="% within budget",
        title=f"SLO attainment ({result['config']['budget_ms']:g} ms)",
    )
    axes[1].set(
        xlabel="offered load (x full-network capacity)",
        ylabel="effective accuracy",
        title="Effective accuracy",
    )
    axes[0].set_ylim(-2, 102)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    sla = [p for p in result["points"] if p["policy"] == "sla"]
    keys = sorted({k for p in sla for k in p["shares"]}, key=lambda k: [-float(x) for x in k.split("/")])
    x = np.arange(len(sla))
    bottom = np.zeros(len(sla))
    cmap = plt.get_cmap("viridis", max(len(keys), 1))
    for i, k in enumerate(keys):
        h = np.array([100 * p["shares"].get(k, 0.0) for p in sla])
        axes[2].bar(x, h, bottom=bottom, label=k, color=cmap(i))
        bottom += h
    axes[2].set_xticks(x, [f"{p['load']:g}x" for p in sla])
    axes[2].set(
        xlabel="offered load", ylabel="% of answered requests", title="sla: sub-network (width/depth)"
    )
    if keys:
        axes[2].legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    if result["hog"]:
        for h in result["hog"]:
            t, a = zip(*h["timeline"], strict=True) if h["timeline"] else ((), ())
            axes[3].plot(t, [100 * v for v in a], marker=".", label=h["policy"])
        axes[3].axvline(result["hog"][0]["hog_starts_s"], color="red", ls="--", label="hog starts")
        axes[3].set(
            xlabel="seconds",
            ylabel="% within budget",
            title=f"{result['config'].get('hog_kind', 'cpu').upper()} hog at {result['config']['hog_load']:g}x",
        )
        axes[3].set_ylim(-2, 102)
        axes[3].grid(alpha=0.3)
        axes[3].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---- CLI -----------------------------------------------------------------------------------------


def _floats(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return vals


def _policies(s: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in s.split(",") if x.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"policies must be among {', '.join(POLICIES)}, got {s!r}")
    for v in vals:
        try:
            parse_variant(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    if len(set(vals)) < len(vals):
        raise argparse.ArgumentTypeError(f"a policy is named twice in {s!r}")
    return vals


def register_serve(bench_subparsers: Any) -> None:
    """Add `dynabert bench serve` to the `bench` subcommand's subparsers."""
    p = bench_subparsers.add_parser(
        "serve",
        help="open-loop load benchmark of the HTTP service: sla vs fixed policies",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="checkpoint folder to serve (default: the folder `dynabert serve` serves, models/sst2-minilm-l6)",
    )
    p.add_argument(
        "--budget-ms", type=float, default=50.0, help="latency budget of every request (default 50)"
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per load point (default 10; --quick 1.5)"
    )
    p.add_argument(
        "--loads", type=_floats, default=None, help="offered loads, multiples of capacity (0.5,1,1.5,2,3)"
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="cut each load point into this many blocks, the policies taking turns (default 5; --quick 1)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load at the block's rate before each block, not counted: the server was idle "
        "while the other policies ran (default 0.5; --quick 0)",
    )
    p.add_argument(
        "--policies",
        type=_policies,
        default=POLICIES,
        help="comma-separated, from sla,fixed-full,fixed-smallest; a variant with server settings of "
        "its own is base@setting=value[@setting=value...] (e.g. sla@shed_late=false), compared with "
        "its base block by block",
    )
    p.add_argument("--hog", action="store_true", help="add the hog scenario (sla, its variants, fixed-full)")
    p.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep each server's log (server-POLICY.log, with one JSON access line per request) in DIR "
        "(default: a temporary folder, deleted at the end)",
    )
    p.add_argument(
        "--hog-kind",
        choices=("cpu", "gpu"),
        default=None,
        help="what the hog keeps busy: every CPU core, or the served GPU (default: gpu with a CUDA "
        "--device, else cpu)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device the servers run on: cpu (default), cuda, cuda:N"
    )
    p.add_argument(
        "--hog-load", type=float, default=1.0, help="offered load of the hog scenario (x capacity)"
    )
    p.add_argument(
        "--hog-duration", type=float, default=None, help="seconds of the hog run (default 2x --duration)"
    )
    p.add_argument(
        "--client-timeout-ms",
        type=float,
        default=None,
        help="each client gives up (and closes its connection) after this long (default: 20x the "
        "budget, at least 2 s)",
    )
    p.add_argument(
        "--send-timeout",
        action="store_true",
        help="the clients announce that timeout in X-Request-Timeout-Ms, so the servers refuse or drop "
        "what would answer too late (504)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    p.add_argument("--quick", action="store_true", help="a short run (tests, smoke checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="req/s that the loads multiply, instead of the full network's capacity measured at the "
        "start (still measured and reported): the same offered rates run after run on a host whose "
        "speed drifts",
    )
    p.add_argument(
        "--capacity-rounds",
        type=int,
        default=None,
        help="closed-loop capacity measurements at the start, the host probed after each; the loads "
        "multiply their median (default 3; 2 with --quick)",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="start every server with `dynabert serve --workers N`: N processes behind its port, each "
        "with its own inference worker (default 1)",
    )
    p.add_argument(
        "--server-cgroup",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the servers (not the load generator) in this existing cgroup, e.g. one with a CPU "
        "quota (cgroup v1 cpu.cfs_quota_us, v2 cpu.max) to measure serving under a container's CPU "
        "limit; needs write access to DIR/cgroup.procs",
    )
    p.set_defaults(func=run_serve_bench)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    ckpt = Path(args.checkpoint)
    if not (ckpt / "dynabert.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {ckpt}: pass --checkpoint DIR, or build the default model first "
            "with `dynabert train --task sst2 --recipe quick`"
        )
    q = args.quick
    duration = args.duration if args.duration is not None else (1.5 if q else 10.0)
    if duration <= 0:
        raise ValueError(f"--duration must be > 0, got {duration!r}")
    if args.budget_ms <= 0:
        raise ValueError(f"--budget-ms must be > 0, got {args.budget_ms!r}")
    loads = args.loads or ((0.5, 2.0) if q else (0.5, 1.0, 1.5, 2.0, 3.0))
    blocks = args.blocks if args.blocks is not None else (1 if q else 5)
    if blocks < 1:
        raise ValueError(f"--blocks must be >= 1, got {blocks!r}")
    warmup = args.warmup if args.warmup is not None else (0.0 if q else 0.5)
    if not warmup >= 0:
        raise ValueError(f"--warmup must be >= 0 s, got {warmup!r}")
    if args.client_timeout_ms is not None and not args.client_timeout_ms > 0:
        raise ValueError(f"--client-timeout-ms must be > 0, got {args.client_timeout_ms!r}")
    if args.capacity is not None and not args.capacity > 0:
        raise ValueError(f"--capacity must be > 0 req/s, got {args.capacity!r}")
    if args.server_workers < 1:
        raise ValueError(f"--server-workers must be >= 1, got {args.server_workers!r}")
    if args.capacity_rounds is not None and args.capacity_rounds < 1:
        raise ValueError(f"--capacity-rounds must be >= 1, got {args.capacity_rounds!r}")
    if args.server_cgroup is not None and not os.access(args.server_cgroup / "cgroup.procs", os.W_OK):
        raise ValueError(f"--server-cgroup {args.server_cgroup}: cannot write its cgroup.procs")
    return BenchConfig(
        checkpoint=ckpt.resolve(),
        budget_ms=args.budget_ms,
        duration_s=duration,
        blocks=blocks,
        warmup_s=warmup,
        loads=loads,
        policies=tuple(args.policies),
        hog=args.hog,
        hog_load=args.hog_load,
        hog_duration_s=args.hog_duration if args.hog_duration is not None else 2 * duration,
        probe_s=1.0 if q else 4.0,
        probe_concurrency=16 if q else 32,
        capacity_rounds=args.capacity_rounds if args.capacity_rounds is not None else (2 if q else 3),
        overhead_requests=20 if q else 200,
        timeout_s=(
            args.client_timeout_ms / 1e3
            if args.client_timeout_ms is not None
            else max(2.0, 20 * args.budget_ms / 1e3)
        ),
        seed=args.seed,
        capacity_rps=args.capacity,
        device=args.device,
        hog_kind=hog_kind(args.hog_kind, args.device),
        send_timeout=args.send_timeout,
        logs_dir=args.keep_logs,
        server_workers=args.server_workers,
        server_cgroup=args.server_cgroup,
    )


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark (servers started and stopped here) and return its results. The
    servers' logs (start-up, one JSON access line per request: the sub-network chosen, the
    prediction, queue and batch times) go to ``cfg.logs_dir``, kept for analysing a bad block
    afterwards, or to a temporary folder deleted at the end."""
    with contextlib.ExitStack() as stack:
        if cfg.logs_dir is not None:
            cfg.logs_dir.mkdir(parents=True, exist_ok=True)
            workdir = cfg.logs_dir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dynabert-bench-serve-")))
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_run_async(cfg, workdir))


def run_serve_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would skew the load
    result = run_benchmark(cfg)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    print(markdown(result))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
