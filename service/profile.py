"""Latency profile of every sub-network on this hardware, measured at start-up.

For each (width, depth) the forward pass is timed at a small grid of batch sizes B and token
counts T (padded length), and a cost model is fitted to the measurements:

    latency(B, T) = c0 + c1 * B*T + c2 * B*T^2

c0 is fixed overhead (Python, kernel launches), c1 the per-token work of the dense layers and
c2 attention's quadratic term. The fit minimises relative error and keeps every coefficient
non-negative, so predictions grow with B and T and extrapolate sensibly past the grid.

On a CPU the grid is measured once per intra-op thread count the server may use (1 and its
maximum): with the server's passive OpenMP threads (service/cli.py), every parallel region of a
multi-threaded pass wakes the sleeping threads, and for a small batch of a small sub-network
those wake-ups cost more than the second core gives (0.25/0.5 at batch 1: 2.4 ms on one thread,
5.4 ms on two; the full network at batch 16: 75 ms against 56 ms; docs/RESULTS.md). The server
runs each batch on the thread count its profile predicts fastest (:meth:`LatencyProfile.best`),
and the policy predicts with that same count, so what it plans is what the worker runs.

The profile is cached as ``latency_profile.json`` in the checkpoint folder, keyed by the hardware,
thread count, torch version, device and the weights file; a cached profile is re-checked with one
quick measurement before it is trusted. The file keeps the profiles of the last few keys
calibrated (``PROFILE_KEEP``), newest first: one folder served in turn with one and with two
inference workers (one thread each, or one of two threads: two keys), or from machines of two
kinds sharing a volume, reuses each configuration's profile instead of measuring again at every
switch. Processes that load one checkpoint folder at once (the inference workers of ``dynabert serve --workers N``, started together) take turns: a profile
measured while another process measured its own on the same cores would time that contention,
and the first would cache it for every later start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PROFILE_FILE = "latency_profile.json"
PROFILE_KEEP = 4  # profiles (of different keys) the cache file holds
MEMO_MAX = 1 << 16  # LatencyProfile.best's memo: entries kept before it starts over
SubnetKey = tuple[float, float]


@dataclass(frozen=True)
class Curve:
    """Fitted latency (seconds) of one sub-network as a function of batch size and tokens."""

    c0: float
    c1: float
    c2: float

    def __call__(self, batch: int, tokens: int) -> float:
        bt = max(1, batch) * max(1, tokens)
        return self.c0 + self.c1 * bt + self.c2 * bt * max(1, tokens)


def fit_curve(points: Iterable[tuple[int, int, float]]) -> Curve:
    """Non-negative least-squares fit (relative error) of (batch, tokens, seconds) points."""
    pts = [(b, t, s) for b, t, s in points if s > 0]
    if not pts:
        raise ValueError(f"no positive latency measurement to fit: {list(points)!r}")
    X = np.array([[1.0, b * t, b * t * t] for b, t, _ in pts], dtype=np.float64)
    y = np.array([s for _, _, s in pts], dtype=np.float64)
    w = 1.0 / y  # relative error
    active = [0, 1, 2]
    while True:  # drop negative coefficients until all are >= 0 (tiny active-set NNLS)
        coef = np.zeros(3)
        if active:
            A = X[:, active] * w[:, None]
            sol, *_ = np.linalg.lstsq(A, y * w, rcond=None)
            coef[active] = sol
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            break
        active.remove(min(neg, key=lambda i: coef[i]))
    if not coef.any():  # degenerate: a constant at the mean
        coef[0] = float(np.mean(y))
    return Curve(float(coef[0]), float(coef[1]), float(coef[2]))


@dataclass
class LatencyProfile:
    """Per sub-network latency curves, one per intra-op thread count measured, plus the raw
    measurements they were fitted to. Thread count 0 stands for "whatever the process runs"
    (a profile from FLOPs, or one measured on a GPU)."""

    curves: dict[SubnetKey, dict[int, Curve]]
    points: dict[SubnetKey, dict[int, list[tuple[int, int, float]]]]
    key: dict[str, Any]
    source: str = "calibrated"  # or "cache", "flops" (no measurement)
    # best()'s answers: the policy asks 10-20 times per request, for the same few shapes
    _memo: dict[tuple[float, float, int, int, int | None], tuple[int, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.curves = {  # float keys (a lookup by int width finds them too), counts ascending
            (float(w), float(d)): dict(sorted(per.items())) for (w, d), per in self.curves.items()
        }

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """Every intra-op thread count some sub-network was measured at, ascending."""
        return tuple(sorted({n for per in self.curves.values() for n in per}))

    def best(
        self, width: float, depth: float, batch: int, tokens: int, max_threads: int | None = None
    ) -> tuple[int, float]:
        """(thread count, predicted seconds) of the fastest measured way to run one forward pass
        of (width, depth) on a (batch, tokens) input with at most ``max_threads`` threads (None:
        any). When every measured count exceeds ``max_threads``, the smallest one's curve.

        Memoised: the curves never change, and a request's choice asks this 10-20 times (each
        candidate's completion and sustainable rate), on the event loop. Evaluating the curves took
        about 6 us a call, two thirds of ``sla``'s choice on an idle queue."""
        question = (width, depth, batch, tokens, max_threads)
        memo = self._memo.get(question)
        if memo is not None:
            return memo
        per = self.curves.get((width, depth))
        if not per:
            raise KeyError(f"no latency profile for sub-network ({width}, {depth})")
        best_n, best_s = -1, math.inf
        for n, curve in per.items():  # counts ascending: a tie goes to fewer threads
            if max_threads is None or n <= max_threads:
                s = curve(batch, tokens)
                if s < best_s:
                    best_n, best_s = n, s
        if best_n < 0:
            best_n = min(per)
            best_s = per[best_n](batch, tokens)
        if len(self._memo) >= MEMO_MAX:  # shapes are bounded (batch x tokens), but stay safe
            self._memo.clear()
        self._memo[question] = (best_n, best_s)
        return best_n, best_s

    def predict(
        self, width: float, depth: float, batch: int, tokens: int, max_threads: int | None = None
    ) -> float:
        """Predicted seconds of one forward pass of (width, depth) on a (batch, tokens) input,
        on the thread count :meth:`best` picks. The minimum of non-decreasing curves, so still
        non-decreasing in batch and tokens."""
        return self.best(width, depth, batch, tokens, max_threads)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "subnetworks": [
                {
                    "width": w,
                    "depth": d,
                    "threads": n,
                    "curve": [c.c0, c.c1, c.c2],
                    "points": self.points.get((w, d), {}).get(n, []),
                }
                for (w, d), per in self.curves.items()
                for n, c in sorted(per.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "cache") -> LatencyProfile:
        curves: dict[SubnetKey, dict[int, Curve]] = {}
        points: dict[SubnetKey, dict[int, list[tuple[int, int, float]]]] = {}
        default_threads = int(data.get("key", {}).get("threads") or 0)
        for row in data["subnetworks"]:
            k, n = (float(row["width"]), float(row["depth"])), int(row.get("threads", default_threads))
            curves.setdefault(k, {})[n] = Curve(*[float(x) for x in row["curve"]])
            points.setdefault(k, {})[n] = [(int(b), int(t), float(s)) for b, t, s in row.get("points", [])]
        return cls(curves, points, dict(data.get("key", {})), source)


def thread_counts_to_calibrate(device: str, max_threads: int, adaptive: bool = True) -> tuple[int, ...]:
    """The intra-op thread counts to measure: one and the most the server uses, on a CPU that
    has more than one (``adaptive``: the server picks per batch); else just the count in use."""
    if device.startswith("cuda") or not adaptive or max_threads <= 1:
        return (max(max_threads, 1),)
    return (1, max_threads)


def gpu_name(device: str | torch.device) -> str | None:
    """The GPU's name for a CUDA device ("cuda", "cuda:1"), None for any other."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def hardware_key(checkpoint_dir: Path | None, device: str, grid: dict[str, Any]) -> dict[str, Any]:
    """What a cached profile must match to be reused."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    weights: dict[str, Any] = {}
    if checkpoint_dir is not None and (checkpoint_dir / "model.safetensors").is_file():
        st = (checkpoint_dir / "model.safetensors").stat()
        weights = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "gpu": gpu_name(device),
        "weights": weights,
        "grid": grid,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    model: torch.nn.Module, width: float, depth: float, batch: int, tokens: int, reps: int = 3
) -> float:
    """Median seconds of ``reps`` forward passes (after one warm-up) on random token ids."""
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(ids, mask, width=width, depth=depth)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(
    model: torch.nn.Module,
    subnets: list[SubnetKey],
    batches: tuple[int, ...],
    tokens: tuple[int, ...],
    key: dict[str, Any],
    timer: Callable[..., float] = time_forward,
    threads: tuple[int, ...] = (),
) -> LatencyProfile:
    """Measure the grid for every sub-network at every thread count in ``threads`` (empty: the
    process's current count only) and fit a curve to each; torch's thread count is restored."""
    max_t = model.cfg.max_positions - model.cfg.position_offset
    toks = sorted({min(t, max_t) for t in tokens})
    before = torch.get_num_threads()
    counts = sorted(set(threads)) or [before]
    curves: dict[SubnetKey, dict[int, Curve]] = {}
    points: dict[SubnetKey, dict[int, list[tuple[int, int, float]]]] = {}
    try:
        for w, d in subnets:
            for n in counts:
                torch.set_num_threads(n)
                pts = [(b, t, timer(model, w, d, b, t)) for b in batches for t in toks]
                points.setdefault((w, d), {})[n] = pts
                curves.setdefault((w, d), {})[n] = fit_curve(pts)
    finally:
        torch.set_num_threads(before)
    return LatencyProfile(curves, points, key, "calibrated")


@contextlib.contextmanager
def one_at_a_time(folder: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` until the block ends; other processes entering it
    for the same folder wait. A directory is locked through a read-only descriptor, so a read-only
    model volume works too and no lock file is left behind. Without a folder, or where it cannot
    be locked (no ``fcntl`` on Windows; a file system without locks), the block runs unlocked."""
    fd = None
    if folder is not None:
        try:
            import fcntl

            fd = os.open(folder, os.O_RDONLY)
            t0 = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = time.perf_counter() - t0
            if waited > 0.5:
                log.info("waited %.1f s for another process's latency profile of %s", waited, folder)
        except (ImportError, OSError) as e:
            log.info("cannot lock %s to calibrate alone (%s); calibrating anyway", folder, e)
            if fd is not None:
                os.close(fd)
                fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (which releases the lock)


def read_cache(path: Path) -> list[dict[str, Any]]:
    """The profiles in a cache file, newest first: ``{"profiles": [...]}``, or one profile (the
    file as it was before it kept several)."""
    data = json.loads(path.read_text())
    entries = data["profiles"] if "profiles" in data else [data]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("profiles must be a list of objects")
    return entries


def load_or_calibrate(
    model: torch.nn.Module,
    subnets: list[SubnetKey],
    checkpoint_dir: Path | None,
    *,
    device: str,
    batches: tuple[int, ...],
    tokens: tuple[int, ...],
    threads: tuple[int, ...] = (),
    use_cache: bool = True,
    tolerance: float = 2.0,
    timer: Callable[..., float] = time_forward,
) -> LatencyProfile:
    """The cached profile when its key matches and one spot check (the full network at the
    smallest batch and largest token count of the grid, on the thread count the profile would
    run it on) agrees within ``tolerance``x; otherwise calibrate now (and cache). ``threads``:
    see :func:`calibrate`. One process at a time per checkpoint folder (:func:`one_at_a_time`):
    the second of two workers started together waits, then finds the first one's profile."""
    with one_at_a_time(checkpoint_dir):
        grid: dict[str, Any] = {"batches": list(batches), "tokens": list(tokens)}
        if threads:
            grid["threads"] = sorted(set(threads))
        key = hardware_key(checkpoint_dir, device, grid)
        cache = checkpoint_dir / PROFILE_FILE if checkpoint_dir is not None else None
        cached: list[dict[str, Any]] = []  # the file's entries, newest first
        if use_cache and cache is not None and cache.is_file():
            try:
                cached = read_cache(cache)
                match = next((e for e in cached if e.get("key") == key), None)
                prof = LatencyProfile.from_json(match) if match is not None else None
                if prof is not None and set(prof.curves) >= set(subnets):
                    w, d = subnets[0]
                    b, t = min(batches), max(tokens)
                    t = min(t, model.cfg.max_positions - model.cfg.position_offset)
                    before = torch.get_num_threads()
                    n, predicted = prof.best(w, d, b, t, max_threads=before)
                    torch.set_num_threads(n or before)  # measured on the count the server would use
                    try:
                        measured = timer(model, w, d, b, t)
                    finally:
                        torch.set_num_threads(before)
                    if 1 / tolerance <= measured / predicted <= tolerance:
                        log.info(
                            "%s: cached latency profile (spot check %.2f ms vs %.2f ms)",
                            cache,
                            1e3 * measured,
                            1e3 * predicted,
                        )
                        return prof
                    log.info(
                        "%s: spot check %.2f ms vs cached %.2f ms; recalibrating",
                        cache,
                        1e3 * measured,
                        1e3 * predicted,
                    )
                elif prof is not None:
                    log.info("%s: its profile lacks some of the sub-networks; recalibrating", cache)
                else:
                    log.info(
                        "%s: none of its %d profile(s) made on this hardware with these settings; calibrating",
                        cache,
                        len(cached),
                    )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("%s: unreadable cached profile (%s); recalibrating", cache, e)
                cached = []
        t0 = time.perf_counter()
        prof = calibrate(model, subnets, batches, tokens, key, timer, threads)
        log.info(
            "calibrated %d sub-networks at %s thread(s) in %.1f s",
            len(subnets),
            "/".join(map(str, prof.thread_counts)),
            time.perf_counter() - t0,
        )
        if use_cache and cache is not None:
            try:
                entries = [prof.to_json(), *(e for e in cached if e.get("key") != key)][:PROFILE_KEEP]
                tmp = cache.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"profiles": entries}, indent=1) + "\n")
                tmp.replace(cache)
            except OSError as e:  # a read-only model volume: fine, calibrate again next time
                log.info("cannot cache the latency profile in %s (%s)", cache, e)
        return prof


def flops_profile(cfg: Any, subnets: list[SubnetKey], seconds_per_flop: float = 1e-10) -> LatencyProfile:
    """A profile from FLOPs alone, for ``calibrate=False`` (tests, dry runs): proportional, not measured."""
    curves = {}
    for w, d in subnets:
        per_token = cfg.flops(w, d, seq_len=1) * seconds_per_flop
        attn = (cfg.flops(w, d, seq_len=2) - 2 * cfg.flops(w, d, seq_len=1)) / 2 * seconds_per_flop
        curves[(w, d)] = {0: Curve(1e-4, max(per_token - attn, 0.0), max(attn, 0.0))}
    return LatencyProfile(curves, {}, {}, "flops")
