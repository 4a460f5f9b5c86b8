"""Which sub-network answers a request: the routing policy (plain Python, no web framework).

``sla`` (default): the most accurate sub-network whose *predicted completion* fits the request's
latency budget. Accuracy is the dev metric from eval.json; without one, bigger (more parameters)
counts as more accurate. Predicted completion is

    work queued ahead of the request + profiled latency of its batch (batch size, tokens)
                                     x contention + serving overhead,

the serving overhead being the batching wait plus an EWMA of the measured time a request spends
in the server outside queue and forward pass (tokenising, JSON, dispatch to the worker thread),
and where contention = (1 + other processes' CPU share) x (1 + other GPU use, on a GPU)
x a feedback correction: a high quantile (default the 90th percentile) of observed / predicted
forward time over the last ``feedback_window`` batches. The correction is what makes the policy
adapt when the load readings understate a slowdown (a hog at higher priority, thermal limits,
memory bandwidth), and taking a quantile rather than a mean makes the prediction one that the
batch beats most of the time, which is what a budget asks for on a noisy machine; it relaxes back
to 1 with a time constant when no batch is observed. When nothing fits, the fastest sub-network
answers and the budget is reported missed (``fallback``).

Fitting the budget is not enough under sustained load: a greedy choice fills every request's
budget with the biggest sub-network that fits, the queue settles just under the budget and every
request becomes a near miss. So ``sla`` also requires a sub-network to be *sustainable* at the
recent arrival rate: the rate must stay under ``max_utilisation`` of the inputs per second it can
serve with batches small enough to fit the budget (see :meth:`Policy.utilisation`). At 2x the full network's capacity the full network is
not sustainable, the queue stays short, and budgets hold.

``fixed``: always one configured sub-network. ``max-accuracy``: always the most accurate.
Header pins (width and/or depth) restrict the candidates under every policy.

The idea of choosing a sub-network per request from a latency budget is DynaBERT's motivation
(Hou et al., NeurIPS 2020, "adaptive width and depth ... for devices with different capacities");
queue-aware admission with a profiled cost model follows Clipper (Crankshaw et al., NSDI 2017)
and INFaaS (Romero et al., ATC 2021).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from service.load import LoadReading

SubnetKey = tuple[float, float]
Reason = Literal["budget", "fallback", "pinned", "fixed", "max_accuracy"]
POLICIES = ("sla", "fixed", "max-accuracy")


@dataclass(frozen=True)
class Subnet:
    """One servable sub-network and what the policy knows about it."""

    width: float
    depth: float
    params: int
    flops: int
    metric: float | None = None  # headline dev metric from eval.json

    @property
    def key(self) -> SubnetKey:
        return (self.width, self.depth)


@dataclass(frozen=True)
class Decision:
    width: float
    depth: float
    reason: Reason
    predicted_s: float  # predicted completion (queue ahead + own batch), seconds
    fits: bool  # the prediction fits the budget
    contention: float
    metric: float | None = None

    @property
    def key(self) -> SubnetKey:
        return (self.width, self.depth)


class QueueView(Protocol):
    """What the policy needs to know about the scheduler's queue."""

    def work_ahead_s(self, key: SubnetKey) -> float:
        """Predicted seconds until a new request for ``key`` would start running."""
        ...

    def pending(self, key: SubnetKey) -> tuple[int, int]:
        """(inputs, max tokens) already waiting in the batch a new request for ``key`` would join."""
        ...


class NoSuchSubnet(ValueError):
    """A pin that matches no served sub-network."""


class Policy:
    """Thread-safe: ``choose`` runs on the event loop, ``observe`` from the inference thread."""

    def __init__(
        self,
        subnets: Sequence[Subnet],
        predict: Callable[[float, float, int, int], float],
        *,
        kind: str = "sla",
        fixed: SubnetKey | None = None,
        load: Callable[[], LoadReading] = LoadReading,
        clock: Callable[[], float] = time.monotonic,
        on_gpu: bool = False,
        overhead_s: float = 0.0,
        wait_s: float = 0.0,
        ewma_alpha: float = 0.2,
        feedback_window: int = 100,
        feedback_quantile: float = 0.9,
        idle_decay_s: float = 10.0,
        max_utilisation: float = 0.85,
        max_batch: int = 16,
        rate_tau_s: float = 1.0,
        correction_bounds: tuple[float, float] = (0.25, 8.0),
        margin_s: float = 0.0,
    ) -> None:
        if kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}")
        if not subnets:
            raise ValueError("a policy needs at least one sub-network")
        if not 0.0 <= feedback_quantile <= 1.0 or feedback_window < 1:
            raise ValueError(f"bad feedback settings: quantile {feedback_quantile}, window {feedback_window}")
        # most accurate first; without a metric, more parameters first
        self.ranked: list[Subnet] = sorted(
            subnets,
            key=lambda s: (
                s.metric is not None,
                s.metric if s.metric is not None else 0.0,
                s.params,
                s.flops,
            ),
            reverse=True,
        )
        self.by_key = {s.key: s for s in self.ranked}
        self.kind = kind
        if kind == "fixed":
            fixed = (float(fixed[0]), float(fixed[1])) if fixed is not None else self.ranked[0].key
            if fixed not in self.by_key:
                raise ValueError(f"fixed sub-network {fixed} is not served (served: {sorted(self.by_key)})")
        self.fixed = fixed
        self._predict = predict
        self._load, self._clock, self.on_gpu = load, clock, on_gpu
        self.overhead_s = overhead_s  # learned by observe_overhead
        self.wait_s = wait_s  # the scheduler's max batching wait
        self.alpha, self.idle_decay_s = ewma_alpha, idle_decay_s
        self._lo, self._hi = correction_bounds
        self.quantile = feedback_quantile
        self._ratios: deque[float] = deque(maxlen=feedback_window)  # log(observed / predicted)
        self._log_corr = 0.0  # the quantile of _ratios
        self._t_corr = clock()
        self.max_utilisation, self.max_batch, self.rate_tau_s = max_utilisation, max_batch, rate_tau_s
        self._arrivals, self._t_arrival = 0.0, clock()
        self.margin_s = margin_s  # time the client's end-to-end budget spends outside the server span
        self._lock = threading.Lock()

    # ---- contention ------------------------------------------------------------------------

    def load_factor(self, reading: LoadReading | None = None) -> float:
        """Slow-down expected from other processes' use of the CPU (and GPU when on one)."""
        r = reading if reading is not None else self._load()
        f = 1.0 + min(max(r.cpu_other, 0.0), 1.0)
        if self.on_gpu:
            f *= 1.0 + min(max(r.gpu_other, 0.0), 1.0)
        return f

    def correction(self) -> float:
        """Quantile of recent observed / predicted latency, relaxed towards 1 while nothing is observed."""
        with self._lock:
            idle = max(0.0, self._clock() - self._t_corr)
            return math.exp(self._log_corr * math.exp(-idle / self.idle_decay_s))

    def contention(self) -> float:
        return self.load_factor() * self.correction()

    def observe(self, key: SubnetKey, batch: int, tokens: int, observed_s: float) -> None:
        """Feed back one batch's measured forward time."""
        base = self._predict(key[0], key[1], batch, tokens) * self.load_factor()
        if base <= 0 or observed_s <= 0:
            return
        ratio = min(max(observed_s / base, self._lo), self._hi)
        with self._lock:
            now = self._clock()
            if now - self._t_corr > self.idle_decay_s:  # a long pause: old observations are stale
                self._ratios.clear()
            self._ratios.append(math.log(ratio))
            ordered = sorted(self._ratios)
            self._log_corr = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            self._t_corr = now

    def observe_overhead(self, seconds: float) -> None:
        """Feed back one request's server time outside its queue wait and forward pass."""
        if seconds >= 0:
            with self._lock:
                self.overhead_s = (1 - self.alpha) * self.overhead_s + self.alpha * min(seconds, 1.0)

    def predict_s(self, key: SubnetKey, batch: int, tokens: int, contention: float | None = None) -> float:
        """Predicted seconds of one batch under the current contention."""
        c = self.contention() if contention is None else contention
        return self._predict(key[0], key[1], batch, tokens) * c

    # ---- the choice ------------------------------------------------------------------------

    def candidates(self, width: float | None = None, depth: float | None = None) -> list[Subnet]:
        out = [
            s
            for s in self.ranked
            if (width is None or s.width == width) and (depth is None or s.depth == depth)
        ]
        if not out:
            raise NoSuchSubnet(
                f"no served sub-network has width={width} depth={depth}; served: "
                + ", ".join(f"{w:g}x{d:g}" for w, d in sorted(self.by_key, reverse=True))
            )
        return out

    # ---- offered load ----------------------------------------------------------------------

    def _note_arrival(self, inputs: int) -> None:
        with self._lock:
            now = self._clock()
            self._arrivals = (
                self._arrivals * math.exp(-max(0.0, now - self._t_arrival) / self.rate_tau_s) + inputs
            )
            self._t_arrival = now

    def arrival_rate(self) -> float:
        """Inputs per second arriving lately (an exponentially decayed count, time constant rate_tau_s)."""
        with self._lock:
            idle = max(0.0, self._clock() - self._t_arrival)
            return self._arrivals * math.exp(-idle / self.rate_tau_s) / self.rate_tau_s

    def utilisation(self, s: Subnet, rate: float, tokens: int, contention: float, budget_s: float) -> float:
        """Arrival rate / the most inputs per second ``s`` can serve. With dynamic batching a busy
        worker runs batch after batch, and a request waits about one batch and runs in the next,
        so the usable batch sizes B are those whose forward time t(B) is at most half the budget;
        the capacity is the best B / t(B) among them (at least B = 1)."""
        if rate <= 0:
            return 0.0
        best = 1.0 / max(self.predict_s(s.key, 1, tokens, contention), 1e-9)
        if rate / best <= self.max_utilisation:  # one at a time keeps up: batching only adds capacity
            return rate / best
        lo, hi = 2, self.max_batch
        while lo <= hi:  # t(B) grows with B: binary search for the largest usable B
            mid = (lo + hi) // 2
            t = self.predict_s(s.key, mid, tokens, contention)
            if t <= budget_s / 2:
                best = max(best, mid / t)
                lo = mid + 1
            else:
                hi = mid - 1
        return rate / best

    def completion_s(
        self, s: Subnet, batch: int, tokens: int, queue: QueueView | None, contention: float
    ) -> float:
        ahead, (n, t) = (queue.work_ahead_s(s.key), queue.pending(s.key)) if queue else (0.0, (0, 0))
        own = self.predict_s(s.key, n + batch, max(t, tokens), contention)
        return ahead + own + self.wait_s + self.overhead_s

    def choose(
        self,
        budget_s: float,
        batch: int,
        tokens: int,
        queue: QueueView | None = None,
        *,
        width: float | None = None,
        depth: float | None = None,
    ) -> Decision:
        """The sub-network for a request of ``batch`` inputs of up to ``tokens`` tokens."""
        self._note_arrival(batch)
        c = self.contention()
        pinned = width is not None or depth is not None
        cands = self.candidates(width, depth)

        def decide(s: Subnet, reason: Reason, t: float | None = None) -> Decision:
            t = self.completion_s(s, batch, tokens, queue, c) if t is None else t
            return Decision(s.width, s.depth, reason, t, t <= budget_s, c, s.metric)

        if pinned and len(cands) == 1:
            return decide(cands[0], "pinned")
        if self.kind == "fixed" and not pinned:
            return decide(self.by_key[self.fixed], "fixed")
        if self.kind == "max-accuracy":
            return decide(cands[0], "pinned" if pinned else "max_accuracy")
        rate = self.arrival_rate()
        with self._lock:
            ratios = list(self._ratios)  # log(observed / predicted) of recent batches
            log_q = self._log_corr
        # A backlog (requests already waiting for the worker) means batching carries the
        # throughput: a request that opens a group of its own makes everyone behind it wait for a
        # forward pass that serves one request, and under overload a mix of sub-networks then
        # serves less than always picking the fastest. So while requests wait, only their groups
        # (and the fastest sub-network, the fallback) are candidates.
        waiting = getattr(queue, "waiting_keys", None)
        backlog = waiting() if waiting is not None else set()
        fastest: tuple[float, Subnet] | None = None
        best: tuple[float, Subnet, float] | None = None  # (expected metric, sub-network, predicted)
        for s in cands:  # most accurate first
            t = self.completion_s(s, batch, tokens, queue, c)
            if fastest is None or t < fastest[0]:
                fastest = (t, s)
            if backlog and s.key not in backlog:
                continue
            if (
                t + self.margin_s > budget_s
                or self.utilisation(s, rate, tokens, c, budget_s) > self.max_utilisation
            ):
                continue
            if s.metric is None:  # no accuracy to weigh: the first (biggest) that fits, as before
                return decide(s, "pinned" if pinned else "budget", t)
            # expected accuracy = metric x P(meet): P from the recent spread of observed/predicted
            # forward time around the quantile already in t (the benchmark's own scoring rule)
            p_meet = self.p_meet(t, budget_s, ratios, log_q)
            score = s.metric * p_meet
            if best is None or score > best[0]:
                best = (score, s, t)
        if best is not None and best[0] > 0:
            return decide(best[1], "pinned" if pinned else "budget", best[2])
        assert fastest is not None
        return decide(fastest[1], "pinned" if pinned else "fallback", fastest[0])

    def p_meet(self, t: float, budget_s: float, ratios: Sequence[float], log_q: float) -> float:
        """Share of recent batches' slow-downs under which a predicted completion ``t`` (made with
        the quantile correction) would still land inside ``budget_s`` less the margin."""
        fixed = self.wait_s + self.overhead_s + self.margin_s
        var = t - self.wait_s - self.overhead_s  # the part that scales with the forward time
        if not ratios or var <= 0:
            return 1.0 if t + self.margin_s <= budget_s else 0.0
        ok = sum(1 for lr in ratios if fixed + var * math.exp(lr - log_q) <= budget_s)
        return ok / len(ratios)
