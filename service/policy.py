"""Which sub-network answers a request: the routing policy (plain Python, no web framework).

``sla`` (default): the most accurate sub-network whose *predicted completion* fits the request's
latency budget. Accuracy is the dev metric from eval.json; without one, bigger (more parameters)
counts as more accurate. Predicted completion is

    time the request has already spent + work queued ahead of it
        + profiled latency of its batch (batch size, tokens) x contention + serving overhead,

the time already spent being the request's own, from its first byte to the choice (reading,
parsing, tokenising, and under load the event loop's lag), the serving overhead the batching
wait plus an EWMA of the measured time a request spends in the server after the choice outside
queue and forward pass (dispatch to the worker, the answer's JSON), and where contention =
(1 + other processes' CPU share) x (1 + other GPU use, on a GPU) x a feedback correction: a
high quantile (default the 90th percentile) of observed / predicted forward time over the last
``feedback_window`` batches. The correction is what makes the policy
adapt when the load readings understate a slowdown (a hog at higher priority, thermal limits,
memory bandwidth), and taking a quantile rather than a mean makes the prediction one that the
batch beats most of the time, which is what a budget asks for on a noisy machine; it relaxes back
to 1 with a time constant when no batch is observed. When nothing fits, the fastest sub-network
(the most accurate of those within ``QUICK_TIE`` of the fastest forward pass at every shape:
:func:`near_fastest`) answers and the budget is reported missed (``fallback``), with one exception when ``shed_late``
is on (the service's default; ``DYNABERT_SHED_LATE=false`` turns it off, and so does this class's own
default, which keeps the plain rule): if the *queue ahead* is why nothing fits (the fastest sub-network
would meet the budget on an idle server, but is predicted to finish after it with the work already
queued), the request is rejected (``shed``, a 503 with Retry-After) instead of being served late.
An answer after its deadline is wasted work that also delays every request behind it; shedding it
keeps the queue at what the budgets allow, so the requests that are admitted meet them under
overload (deadline-aware admission, as in Clockwork, Gujarati et al., OSDI 2020).

Fitting the budget is not enough under sustained load: a greedy choice fills every request's
budget with the biggest sub-network that fits, the queue settles just under the budget and every
request becomes a near miss. So ``sla`` also requires a sub-network to be *sustainable* at the
recent arrival rate: the rate must stay under ``max_utilisation`` of the inputs per second it can
serve with batches small enough to fit the budget (see :meth:`Policy.utilisation`), judged at the
typical slow-down (``capacity_quantile``, the median), not the deadline's quantile: a throughput
is a mean over many batches (:meth:`Policy.capacity_contention`). At 2x the full network's capacity
the full network is not sustainable, the queue stays short, and budgets hold.

The fit is scored, not only thresholded: a candidate's expected accuracy is its dev metric x
P(meet), with P(meet) the share of recent forward-time slow-downs under which it would still fit
(over the last ``meet_window`` batches, a longer history than the correction's, so that the host's
rare stalls count against larger sub-networks). The sustainability rule is a threshold; the cost
a choice imposes on the requests behind it is priced from observed slacks (below). With
``price_queue`` on, P(meet) is also multiplied by the share of requests an M/M/1 queue would keep
within the budget were the whole arrival rate routed to the candidate (:meth:`Policy.p_steady`).
That is off by default: it prices the same cost as the delay price, with a model that ignores
batching (a batch of k waiting requests costs far less than k single ones) and mixing (only some
requests upgrade), and it predicted 7.5% misses for the smallest sub-network at 40% utilisation
where the server showed none, which kept ``sla`` on its smallest sub-network 90% of the time at
half load with 50 ms budgets and a p99 of 32 ms. The budget is
checked less a margin: the configured time outside the server plus a high quantile of the
server's own recent prediction errors (:meth:`Policy.observe_outcome`), so the policy leaves
more room exactly when its predictions have been running short.

``fixed``: always one configured sub-network. ``max-accuracy``: always the most accurate.
Header pins (width and/or depth) restrict the candidates under every policy.

A larger sub-network also costs the requests *behind* it: its batch holds the worker longer than
the fastest one would, and every request arriving until the queue next drains waits that much
longer. The score charges this: for a candidate finishing ``delta`` later than the fastest, the
requests delayed are about rate x its completion time / (1 - rho) (rho: the fastest one's
utilisation; a delay lasts the rest of the busy period), and the share of them it pushes past their
budgets is the share of recent requests that finished with less than ``delta`` to spare (their
slack, budget - server time - the configured margin, over the last ``slack_window`` budget-routed
requests; :meth:`Policy.observe_finish`). No model of the queue's distribution is needed: the
recent slacks are the density at the deadline. With the metrics a few points apart and a miss
costing a whole request, this is what keeps ``sla`` from upgrading requests when the requests
around them run close to their budgets.

The model behind P(meet) can be optimistic for one sub-network (a host whose large forward passes
suffer more from sharing the cores than small ones): with the metrics 1-3% apart, an upgrade pays
only when it misses less than 1-3% more often, finer than such a model is right. So an upgrade's
P(meet) is also capped by its *track record*: the share of its own recent budget-routed requests
that met their budgets (:meth:`Policy.track_record`, counts fading over ``track_tau_s`` so that a
sub-network not chosen for a while is tried again). The fastest sub-network is exempt: its misses
are not avoided by choosing a slower one, and when a slow-down begins it is the one running, so
capping it by its fresher record would turn the policy towards sub-networks whose records predate
the slow-down.

Joining a group that already waits makes its batch bigger, and so later for the requests already
in it: an upgrade may join only if the bigger batch still leaves the earliest deadline in that
batch (:class:`Outlook`'s ``slack_s``; each request carries arrival + budget as its deadline), so
one request's upgrade never costs a batch of misses. The fastest sub-network, the fallback, is
exempt.

The idea of choosing a sub-network per request from a latency budget is DynaBERT's motivation
(Hou et al., NeurIPS 2020, "adaptive width and depth ... for devices with different capacities");
queue-aware admission with a profiled cost model follows Clipper (Crankshaw et al., NSDI 2017)
and INFaaS (Romero et al., ATC 2021).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from service.load import LoadReading

SubnetKey = tuple[float, float]
Reason = Literal["budget", "fallback", "shed", "pinned", "fixed", "max_accuracy"]
POLICIES = ("sla", "fixed", "max-accuracy")
# forward passes within this fraction of the fastest one's at every shape count as equally fast
# (near_fastest)
QUICK_TIE = 0.10
# arrival_rate: a new spell of arrivals begins after this many fast time constants without one
# (its count has decayed to e^-2 = 14%), and its elapsed time counts as at least SPELL_MIN_S
SPELL_GAP_TAUS = 2.0
SPELL_MIN_S = 1e-4


@dataclass(frozen=True)
class Subnet:
    """One servable sub-network and what the policy knows about it."""

    width: float
    depth: float
    params: int
    flops: int
    metric: float | None = None  # headline dev metric from eval.json
    # (width, depth), made once: the choice reads it some 40 times per request
    key: SubnetKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.width, self.depth))


@dataclass(frozen=True)
class Decision:
    width: float
    depth: float
    reason: Reason
    predicted_s: float  # predicted completion from arrival: elapsed_s + queue ahead + own batch
    fits: bool  # the prediction fits the budget
    contention: float
    metric: float | None = None
    elapsed_s: float = 0.0  # the request's time in the server before the choice (read, parse, tokenise)

    @property
    def key(self) -> SubnetKey:
        return (self.width, self.depth)


class Outlook(NamedTuple):
    """What a new request would find in one sub-network's group of the queue."""

    ahead_s: float  # predicted seconds until the batch it would run in starts
    inputs: int = 0  # inputs already in that batch (0: it would start a batch of its own)
    tokens: int = 0  # tokens per row their forward pass costs (merge_tokens: longest or mean)
    slack_s: float = math.inf  # seconds to the earliest deadline among them (inf: none)


IDLE = Outlook(0.0)  # an empty queue


def merge_tokens(rows_a: int, tokens_a: int, rows_b: int, tokens_b: int, packed: bool) -> int:
    """The tokens per row that one forward pass over two sets of rows costs, each set given as
    (rows, tokens per row). A padded batch costs every row its longest (the max); an unpadded
    one (model/modeling.py's ``Unpadded``, the CPU's forward) costs the rows' own tokens, which
    the profile's curve, fitted on rows of one length, reads as the mean length."""
    if not packed or rows_a + rows_b <= 0:
        return max(tokens_a, tokens_b)
    return -(-(rows_a * tokens_a + rows_b * tokens_b) // (rows_a + rows_b))


@dataclass(frozen=True)
class QueueOutlook:
    """The queue as a new request of a given size sees it, read once: ``look(key)`` is the
    :class:`Outlook` of sub-network ``key`` (``rest`` for one with no group waiting: it runs after
    all the work queued)."""

    groups: dict[SubnetKey, Outlook]  # the sub-networks with requests waiting
    rest: Outlook

    def __call__(self, key: SubnetKey) -> Outlook:
        return self.groups.get(key, self.rest)


class QueueView(Protocol):
    """What the policy needs to know about the scheduler's queue."""

    def outlook(self, inputs: int) -> QueueOutlook:
        """The queue as a new request of ``inputs`` inputs would find it, for every sub-network."""
        ...


class NoSuchSubnet(ValueError):
    """A pin that matches no served sub-network."""


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of a non-empty ascending sequence: the element at rank floor(q n)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _SortedWindow:
    """The last ``size`` values, and the same values ascending in ``ordered``, kept by removing
    the value that falls out and inserting the new one (re-sorting 1000 values on every batch
    cost ~60 us of the event loop's time). ``ordered`` is replaced, never mutated, so readers may
    take it without a lock."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=max(1, size))
        self.ordered: list[float] = []

    def push(self, x: float) -> None:
        ordered = self.ordered.copy()
        if len(self.values) == self.values.maxlen:
            del ordered[bisect.bisect_left(ordered, self.values[0])]
        self.values.append(x)
        bisect.insort(ordered, x)
        self.ordered = ordered

    def clear(self) -> None:
        self.values.clear()
        self.ordered = []


def _shapes(max_batch: int) -> list[tuple[int, int]]:
    """(batch, tokens) at which sub-networks are compared once, at start-up."""
    return [(b, t) for b in sorted({1, max(1, max_batch // 2), max(1, max_batch)}) for t in (16, 64, 256)]


def near_fastest(
    subnets: Sequence[Subnet],
    predict: Callable[[float, float, int, int], float],
    max_batch: int = 16,
    tie: float = QUICK_TIE,
) -> frozenset[SubnetKey]:
    """The sub-networks as fast as the fastest, within ``tie``, at every shape: any of them will do
    as the fallback, and ``sla`` takes the most accurate (:meth:`Policy.quick`). Where forward
    passes cost about the same (a GPU, launch-bound: every depth-0.5 sub-network of MiniLM-L6
    takes 0.86-0.91 ms at any batch size), the strict minimum flips between them with the
    request's shape and calibration noise, and each flip opens another batch group: one more
    forward pass for the same requests (measured on an H200: docs/RESULTS.md). Fixed at start-up,
    so it cannot flip; on a CPU, where cost grows with size, it is the fastest alone."""
    if not subnets:
        return frozenset()
    shapes = _shapes(max_batch)
    cost = {s.key: [predict(s.width, s.depth, b, t) for b, t in shapes] for s in subnets}
    best = [min(c[i] for c in cost.values()) for i in range(len(shapes))]
    return frozenset(
        k for k, c in cost.items() if all(x <= (1.0 + tie) * m for x, m in zip(c, best, strict=True))
    )


def pareto_front(
    subnets: Sequence[Subnet], predict: Callable[[float, float, int, int], float], max_batch: int = 16
) -> frozenset[SubnetKey]:
    """The sub-networks no other one dominates: another dominates ``s`` when its dev metric is at
    least ``s``'s and its predicted latency no higher at every shape (batch 1 to ``max_batch``,
    16 to 256 tokens), one of them strictly better. Without metrics nothing is dominated (bigger
    counts as more accurate). ``sla`` routes along this front, as DynaBERT's accuracy-latency
    curves are read (``choose`` also skips, per request, a candidate that a more accurate feasible
    one beats in predicted completion: which is faster can depend on the shape)."""
    if any(s.metric is None for s in subnets):
        return frozenset(s.key for s in subnets)
    shapes = _shapes(max_batch)
    cost = {s.key: [predict(s.width, s.depth, b, t) for b, t in shapes] for s in subnets}

    def dominates(a: Subnet, b: Subnet) -> bool:
        assert a.metric is not None and b.metric is not None
        no_worse = a.metric >= b.metric and all(x <= y for x, y in zip(cost[a.key], cost[b.key], strict=True))
        return no_worse and (
            a.metric > b.metric or any(x < y for x, y in zip(cost[a.key], cost[b.key], strict=True))
        )

    return frozenset(s.key for s in subnets if not any(dominates(o, s) for o in subnets if o is not s))


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
        packed: bool = False,
        overhead_s: float = 0.0,
        wait_s: float = 0.0,
        ewma_alpha: float = 0.2,
        feedback_window: int = 100,
        meet_window: int = 1000,
        feedback_quantile: float = 0.9,
        capacity_quantile: float = 0.5,
        idle_decay_s: float = 10.0,
        max_utilisation: float = 0.85,
        max_batch: int = 16,
        rate_tau_s: float = 1.0,
        correction_bounds: tuple[float, float] = (0.25, 8.0),
        margin_s: float = 0.0,
        error_window: int = 200,
        error_quantile: float = 0.98,
        shed_late: bool = False,
        slack_window: int = 1000,
        price_delay: bool = True,
        price_queue: bool = False,
        track_tau_s: float = 10.0,
        cores: float = 0,
        lanes: int = 1,
    ) -> None:
        if kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}")
        if not subnets:
            raise ValueError("a policy needs at least one sub-network")
        if not (0.0 <= feedback_quantile <= 1.0 and 0.0 <= capacity_quantile <= 1.0):
            raise ValueError(f"bad feedback quantiles: {feedback_quantile}, {capacity_quantile} (0 to 1)")
        if feedback_window < 1 or meet_window < 1:
            raise ValueError(f"bad feedback windows: {feedback_window}, {meet_window}")
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
        self.front = pareto_front(self.ranked, predict, max_batch)
        self.fast_set = near_fastest(self.ranked, predict, max_batch)
        self.kind = kind
        if kind == "fixed":
            fixed = (float(fixed[0]), float(fixed[1])) if fixed is not None else self.ranked[0].key
            if fixed not in self.by_key:
                raise ValueError(f"fixed sub-network {fixed} is not served (served: {sorted(self.by_key)})")
        self.fixed = fixed
        self._predict = predict
        self._load, self._clock, self.on_gpu = load, clock, on_gpu
        self.packed = packed  # whether a batch's rows cost their mean length, not the longest
        self.overhead_s = overhead_s  # learned by observe_overhead: all of a request's time outside
        self.after_s = overhead_s  # the part after the choice (completion_s; the rest is elapsed_s)
        self.wait_s = wait_s  # the scheduler's max batching wait
        self.alpha, self.idle_decay_s = ewma_alpha, idle_decay_s
        self._lo, self._hi = correction_bounds
        self.quantile = feedback_quantile
        # the sustainability rule's (utilisation's) quantile of the same ratios: a throughput is set
        # by the typical batch, a deadline by the slow ones (capacity_contention)
        self.capacity_quantile = capacity_quantile
        self._ratios = _SortedWindow(feedback_window)  # log(observed / predicted)
        # P(meet) counts slow-downs over a longer history than the correction: a stall of the
        # host every ten seconds or so is rarely among the last 100 batches, yet it is what makes
        # a larger sub-network miss where the smallest would not (its 1-2 points of accuracy are
        # not worth a 2% risk of a miss, which costs the whole request)
        self._long = _SortedWindow(meet_window)  # log(observed / predicted); p_meet bisects it
        self._log_corr = 0.0  # the quantile of _ratios
        self._log_cap = 0.0  # their capacity_quantile
        # the CPU time the server may use, in cores (its affinity capped by its CPU quota: 1.5
        # under a quota of 1.5), when the forward pass runs in a worker process on a CPU (0
        # otherwise): what each request's handling costs the forward pass depends on it
        # (per_input_s)
        self.cores = cores
        # batches that may run at once (the scheduler's lanes: one inference worker process each);
        # how many the cores let run side by side is usable_lanes'
        self.lanes = max(1, lanes)
        self._t_corr = clock()
        self.max_utilisation, self.max_batch, self.rate_tau_s = max_utilisation, max_batch, rate_tau_s
        self._arrivals, self._arrivals_fast, self._t_arrival = 0.0, 0.0, clock()
        self._token_mass = 0.0  # the arrivals' inputs x tokens, decayed as _arrivals (typical_tokens)
        self._fast_tau_s = rate_tau_s / 4
        self._spell_start = -math.inf  # first arrival after the last quiet stretch (arrival_rate)
        self.margin_s = margin_s  # time the client's end-to-end budget spends outside the server span
        self._errors = _SortedWindow(error_window)  # server total - predicted, seconds
        self.error_quantile = error_quantile
        self._learned_s = 0.0  # that quantile (>= 0): added to the margin
        self.shed_late = shed_late
        self.price_delay = price_delay
        self.price_queue = price_queue
        self._slack = _SortedWindow(slack_window)  # budget - server total - margin, seconds
        self._t_slack = clock()
        # per sub-network (met, requests, when), decayed: what its choices actually achieved
        self.track_tau_s = track_tau_s
        self._track: dict[SubnetKey, tuple[float, float, float]] = {}
        self._lock = threading.Lock()

    # ---- contention ------------------------------------------------------------------------

    def load_factor(self, reading: LoadReading | None = None) -> float:
        """Slow-down expected from other processes' use of the CPU (and GPU when on one)."""
        r = reading if reading is not None else self._load()
        f = 1.0 + min(max(r.cpu_other, 0.0), 1.0)
        if self.on_gpu:
            f *= 1.0 + min(max(r.gpu_other, 0.0), 1.0)
        return f

    def _fade(self) -> float:
        """How much of the learned slow-downs still holds: 1 right after a batch, falling to 0
        with time constant idle_decay_s while none is observed."""
        with self._lock:
            idle = max(0.0, self._clock() - self._t_corr)
        return math.exp(-idle / self.idle_decay_s)

    def correction(self) -> float:
        """Quantile of recent observed / predicted latency, relaxed towards 1 while nothing is observed."""
        return math.exp(self._log_corr * self._fade())

    def contention(self, reading: LoadReading | None = None) -> float:
        return self.load_factor(reading) * self.correction()

    def capacity_contention(self, reading: LoadReading | None = None) -> float:
        """The slow-down :meth:`utilisation` judges capacity at: the load factor x the
        ``capacity_quantile`` (default the median) of the recent observed / predicted ratios,
        relaxed towards 1 as :meth:`correction` is.

        A sub-network's sustainable rate is a throughput: inputs per second over many batches,
        which the typical batch sets, while the quantile in :meth:`contention` is the slow-down
        that a deadline must survive. Judged at the 90th percentile, capacity was understated by
        the spread of the forward times (on a 2-core host their p90 is 1.6x their median), and
        at 1.5x the full network's capacity ``sla`` served the smallest sub-network to 93-99% of
        requests where it could upgrade a third of them and keep every budget. At the median it
        gained 0.43, 0.54 and 0.30 points of effective accuracy at 1x, 1.5x and 2x, paired block
        by block against the 90th percentile, with the same share within budget (serve-112,
        docs/RESULTS.md). Whether each request's upgrade meets its budget is still P(meet)'s,
        over the slow-downs' whole spread."""
        return self.load_factor(reading) * math.exp(self._log_cap * self._fade())

    def per_input_s(self, rate: float, reading: LoadReading | None = None) -> float:
        """Each request's cost besides its forward pass that :meth:`utilisation` adds to the
        worker's time per input, as if the two ran one after the other: none on a GPU, where
        they overlap; on a CPU with the forward pass in this process, the learned serving time
        outside queue and forward pass (``overhead_s``: the event loop's Python and the forward
        pass's operators take turns on one interpreter). With the forward pass in a worker
        process (``cores`` set) on two or more cores, none either: the event loop and the worker
        run side by side, and what they take from each other shows in the worker's observed
        slow-down, which the capacity is computed with. On one core, the event loop's measured
        CPU per request, or ``overhead_s`` if that is less: under load the wall time outside the
        queue is mostly waiting for the event loop, and waiting takes no core. Between one and
        two (a fractional CPU quota, as a container's 1500m), the share of it that cannot run
        beside the worker: 2 - cores of it, all of it at one core and none at two."""
        if self.on_gpu:
            return 0.0
        per_input = max(self.overhead_s, 0.0)
        if not self.cores:
            return per_input
        if self.cores >= 2:
            return 0.0
        r = reading if reading is not None else self._load()
        if r.cpu_front > 0 and rate > 0:
            per_input = min(per_input, r.cpu_front * self.cores / rate)
        return per_input * min(1.0, 2.0 - self.cores)

    def usable_lanes(self, reading: LoadReading | None = None) -> float:
        """How many of the scheduler's lanes run side by side, for :meth:`utilisation`: the cores
        that other processes and the event loop (``cpu_front``) leave free, between 1 and
        ``lanes``. Each lane is a single-thread worker process that needs a core of its own: on
        two cores under load the event loop and a load generator on the same machine take part of
        them, and two lanes counted in full would credit capacity the cores do not have. One lane
        on a GPU (the lanes share the device) and in-process."""
        if self.lanes == 1 or not self.cores:
            return 1.0
        r = reading if reading is not None else self._load()
        free = self.cores * (1.0 - min(1.0, max(r.cpu_other, 0.0) + max(r.cpu_front, 0.0)))
        return min(float(self.lanes), max(1.0, free))

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
                self._long.clear()
            log_ratio = math.log(ratio)
            self._ratios.push(log_ratio)
            self._long.push(log_ratio)
            self._log_corr = _quantile(self._ratios.ordered, self.quantile)
            self._log_cap = _quantile(self._ratios.ordered, self.capacity_quantile)
            self._t_corr = now

    def observe_overhead(self, seconds: float, before_s: float = 0.0) -> None:
        """Feed back one request's server time outside its queue wait and forward pass, of which
        ``before_s`` passed before the choice (its ``Decision.elapsed_s``). The whole is the
        per-request cost :meth:`utilisation` charges; the part after the choice is what
        :meth:`completion_s` adds, the part before being each request's own ``elapsed_s``."""
        if seconds >= 0:
            after = min(max(seconds - before_s, 0.0), 1.0)
            with self._lock:
                self.overhead_s = (1 - self.alpha) * self.overhead_s + self.alpha * min(seconds, 1.0)
                self.after_s = (1 - self.alpha) * self.after_s + self.alpha * after

    def observe_request(self, d: Decision, budget_s: float, total_s: float) -> None:
        """Feed back one answered request: when the policy routed it (reason ``budget`` or
        ``fallback``; not a pin or a fixed policy), its prediction error joins the margin's window
        (:meth:`observe_outcome`) and its slack the delay price's and the track records'
        (:meth:`observe_finish`).

        Fallbacks count in the margin too. Were only ``budget`` choices to feed it, a margin grown
        by a few slow requests could leave no sub-network inside the budget; every request
        would then fall back, no prediction error would be seen again, and the margin would
        never shrink. At 1 request/s with a 20 ms budget, one cold first request (an 11 ms
        error) held the server on its smallest sub-network for good."""
        if d.reason in ("budget", "fallback"):
            self.observe_outcome(d.predicted_s, total_s)
            self.observe_finish(d.key, budget_s, total_s)

    def observe_outcome(self, predicted_s: float, actual_s: float) -> None:
        """Feed back one routed request (a ``budget`` choice or a fallback; see
        :meth:`observe_request`): its predicted completion and the server time it took. A high quantile of (actual - predicted) over recent requests is added to the margin,
        so when predictions run short in the tail (queueing the profile does not see, a busy
        event loop, a preempted worker) the policy leaves that much more of every budget free."""
        with self._lock:
            self._errors.push(actual_s - predicted_s)
            q = _quantile(self._errors.ordered, self.error_quantile)
            self._learned_s = min(max(q, 0.0), 1.0)

    def observe_finish(self, key: SubnetKey | None, budget_s: float, total_s: float) -> None:
        """Feed back one budget-routed request's server time: its slack (budget - server time -
        the configured margin for time outside the server) joins the window that prices the
        delay a larger sub-network imposes on the requests behind it, and whether it met its
        budget counts in ``key``'s track record (:meth:`track_record`)."""
        slack = budget_s - total_s - self.margin_s
        with self._lock:
            now = self._clock()
            if key is not None:
                met, n, t = self._track.get(key, (0.0, 0.0, now))
                fade = math.exp(-max(0.0, now - t) / self.track_tau_s)
                self._track = {**self._track, key: (met * fade + (slack >= 0), n * fade + 1.0, now)}
            if now - self._t_slack > self.idle_decay_s:  # a long pause: old slacks are stale
                self._slack.clear()
            self._slack.push(slack)
            self._t_slack = now

    def track_record(self, key: SubnetKey) -> float:
        """Share of ``key``'s recent budget-routed requests that met their budgets: counts fading
        with time constant track_tau_s, plus one prior success (1.0 with no record)."""
        met, n, t = self._track.get(key, (0.0, 0.0, 0.0))  # replaced, never mutated
        fade = math.exp(-max(0.0, self._clock() - t) / self.track_tau_s)
        return (met * fade + 1.0) / (n * fade + 1.0)

    def near_miss_share(self, delta_s: float) -> float:
        """Share of recent budget-routed requests that met their budget with less than
        ``delta_s`` to spare: those a delay of ``delta_s`` would have made miss."""
        ordered = self._slack.ordered
        if not ordered or delta_s <= 0:
            return 0.0
        return (bisect.bisect_left(ordered, delta_s) - bisect.bisect_left(ordered, 0.0)) / len(ordered)

    @property
    def effective_margin_s(self) -> float:
        """The configured margin (time outside the server) + the learned prediction error."""
        return self.margin_s + self._learned_s

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

    def _note_arrival(self, inputs: int, tokens: int) -> None:
        with self._lock:
            now = self._clock()
            dt = max(0.0, now - self._t_arrival)
            decay = math.exp(-dt / self.rate_tau_s)
            self._arrivals = self._arrivals * decay + inputs
            self._token_mass = self._token_mass * decay + inputs * tokens
            if dt > SPELL_GAP_TAUS * self._fast_tau_s:  # a quiet stretch ended: a new spell begins
                # its window opens at this arrival, so this arrival is not counted in it (counting
                # it made two requests a few ms apart read as hundreds per second)
                self._spell_start = now
                self._arrivals_fast = 0.0
            else:
                self._arrivals_fast = self._arrivals_fast * math.exp(-dt / self._fast_tau_s) + inputs
            self._t_arrival = now

    def typical_tokens(self, default: int) -> int:
        """The recent arrivals' tokens per input, weighted and decayed as the slow arrival count
        (``default`` before any): the traffic whose rate :meth:`utilisation` asks about."""
        with self._lock:
            if self._arrivals <= 0 or self._token_mass <= 0:
                return default
            return max(1, round(self._token_mass / self._arrivals))

    def arrival_rate(self) -> float:
        """Inputs per second arriving lately: the larger of two exponentially decayed counts, with
        time constants rate_tau_s and a quarter of it. The slow one is steady under constant load;
        the fast one sees a surge within a fraction of a second (the slow one alone still reads
        under 40% of a new rate after half a second), so the policy stops choosing sub-networks
        the new load cannot sustain before their queue has built up.

        A surge after a quiet stretch (no arrival for ``SPELL_GAP_TAUS`` fast time constants) is
        seen at once: the fast count restarts at the spell's first arrival and is divided by
        the part of its window that has elapsed since, tau (1 - exp(-t / tau)) instead of tau,
        so it reads the spell's own rate (the arrivals since the first over the time since it,
        from the third request on) rather than climbing from zero over a quarter of a second.
        This is the start-up bias correction of an exponential moving average (Adam's, Kingma
        and Ba, ICLR 2015).
        Without it, the first ~200 ms of a surge read as a light load, and sla upgraded those
        requests, each opening a batch group of its own: in 0.6 s bursts at 3x the full
        network's capacity after 2 s idle, 3.1 upgraded requests per burst against 1.75 with it
        (16 bursts each, side by side; docs/RESULTS.md)."""
        with self._lock:
            now = self._clock()
            idle = max(0.0, now - self._t_arrival)
            slow = self._arrivals * math.exp(-idle / self.rate_tau_s) / self.rate_tau_s
            window = self._fast_tau_s * -math.expm1(
                -max(now - self._spell_start, SPELL_MIN_S) / self._fast_tau_s
            )
            fast = self._arrivals_fast * math.exp(-idle / self._fast_tau_s) / window
            return max(slow, fast)

    def utilisation(
        self,
        s: Subnet,
        rate: float,
        tokens: int,
        contention: float,
        budget_s: float,
        per_input_s: float | None = None,
        lanes: float | None = None,
    ) -> float:
        """Arrival rate / the most inputs per second ``s`` can serve, on ``lanes`` batches at once
        (by default :meth:`usable_lanes`'; each lane serves its share of the traffic). With dynamic
        batching a busy worker runs batch after batch, and a request waits about one batch and
        runs in the next, so the usable batch sizes B are those whose forward time t(B) is at most
        half the budget;
        the capacity is the best B / (t(B) + B x overhead) among them (at least B = 1), the
        overhead being each request's cost besides its forward pass that competes with it
        (``per_input_s``; by default :meth:`per_input_s`'s, which says where it applies and what
        it is). ``choose`` asks it about the traffic: ``tokens`` its typical request's
        (:meth:`typical_tokens`), not the request being routed, since the rate is the traffic's.

        Until 2026-12-03 ``choose`` charged the learned wall time outside queue and forward pass
        with the forward pass in a worker process too, as if on one core, and judged each request
        at its own length. At twice the full network's capacity on two cores (446 requests/s,
        the cores 68% busy with the load generator's share), the wall time was 2.4 ms a request
        and the event loop's CPU 0.9 ms; this called even the smallest sub-network unsustainable
        and 83% of the choices were fallbacks, while short requests, judged as if every request
        were as short, were upgraded (docs/RESULTS.md).

        Not on a GPU: there the forward pass runs on the device while the event loop handles other
        requests, the two overlap, and the front end's limit is the same whatever sub-network is
        chosen, so it cannot tell candidates apart. Counted, it made every candidate unsustainable
        once the front end was the bottleneck (an H200 serving MiniLM-L6: 1650 req/s from one
        event loop, a forward pass of any sub-network 0.9-1.6 ms at any batch size), and ``sla``
        fell back to the fastest sub-network for most requests: a mix of groups, more forward
        passes, and fewer requests served than always the full network (docs/RESULTS.md)."""
        if rate <= 0:
            return 0.0
        if per_input_s is None:
            per_input_s = self.per_input_s(rate)
        rate /= self.usable_lanes() if lanes is None else lanes  # each lane's share of the traffic
        # The forward time per input, t(B) / B, does not grow with B (a fixed cost per pass plus a
        # per-input cost: the profile's curves are linear in B), so the biggest batch is the most
        # efficient: when even it cannot keep up, no batch can (the utilisation returned is then
        # a lower bound, above max_utilisation either way), and when it is usable it is the
        # answer. Under load most candidates end here, on one prediction: this runs for every
        # candidate of every request, and its CPU is the event loop's.
        t_max = self.predict_s(s.key, self.max_batch, tokens, contention)
        top = self.max_batch / max(t_max + self.max_batch * per_input_s, 1e-9)
        if rate / top > self.max_utilisation:
            return rate / top
        best = 1.0 / max(self.predict_s(s.key, 1, tokens, contention) + per_input_s, 1e-9)
        if rate / best <= self.max_utilisation:  # one at a time keeps up: batching only adds capacity
            return rate / best
        if t_max <= budget_s / 2:  # the biggest batch is usable
            return rate / top
        lo, hi = 2, self.max_batch - 1
        while lo <= hi:  # t(B) grows with B: binary search for the largest usable B
            mid = (lo + hi) // 2
            t = self.predict_s(s.key, mid, tokens, contention)
            if t <= budget_s / 2:
                best = max(best, mid / (t + mid * per_input_s))
                lo = mid + 1
            else:
                hi = mid - 1
        return rate / best

    def quick(self, cands: Sequence[Subnet], batch: int, tokens: int) -> Subnet:
        """The reference of a choice and its fallback: the most accurate candidate of the fast set
        (:func:`near_fastest`), else the one with the fastest predicted forward pass."""
        fast = self.fast_set
        for s in cands:  # most accurate first
            if s.key in fast:
                return s
        return min(cands, key=lambda s: self._predict(s.width, s.depth, batch, tokens))

    def completion_s(self, s: Subnet, batch: int, tokens: int, look: Outlook, contention: float) -> float:
        """Predicted seconds until a request of ``batch`` inputs served by ``s`` is answered, given
        what it finds in ``s``'s group (``look``): the work ahead, then its batch."""
        tokens = merge_tokens(look.inputs, look.tokens, batch, tokens, self.packed)
        own = self.predict_s(s.key, look.inputs + batch, tokens, contention)
        return look.ahead_s + own + self.wait_s + self.after_s

    def choose(
        self,
        budget_s: float,
        batch: int,
        tokens: int,
        queue: QueueView | None = None,
        *,
        width: float | None = None,
        depth: float | None = None,
        elapsed_s: float = 0.0,
    ) -> Decision:
        """The sub-network for a request of ``batch`` inputs whose forward pass costs ``tokens``
        tokens per row (the longest of them, or their mean when ``packed``), which has already
        spent ``elapsed_s`` of its budget in the server (from its first byte to this call).

        The elapsed time is the request's own, not an average: under load a request's bytes can
        wait for a busy event loop for milliseconds before it is parsed, and a prediction from an
        average of that wait (the overhead EWMA, as before) is short for exactly the requests that
        waited, and their misses then grew the learned margin for every request."""
        elapsed_s = max(0.0, elapsed_s)
        budget_all, budget_s = budget_s, budget_s - elapsed_s  # what is left of it from now
        rate = self.arrival_rate()  # of the requests before this one: a lone request is no load
        self._note_arrival(batch, tokens)
        reading = self._load()  # once: the contention and per_input_s read the same sample
        c = self.contention(reading)
        pinned = width is not None or depth is not None
        cands = self.candidates(width, depth)

        look = queue.outlook(batch) if queue is not None else QueueOutlook({}, IDLE)  # read once

        def decide(s: Subnet, reason: Reason, t: float | None = None) -> Decision:
            t = self.completion_s(s, batch, tokens, look(s.key), c) if t is None else t
            return Decision(s.width, s.depth, reason, elapsed_s + t, t <= budget_s, c, s.metric, elapsed_s)

        if pinned and len(cands) == 1:
            return decide(cands[0], "pinned")
        if self.kind == "fixed" and not pinned:
            return decide(self.by_key[self.fixed], "fixed")
        if self.kind == "max-accuracy":
            return decide(cands[0], "pinned" if pinned else "max_accuracy")
        with self._lock:
            ratios = self._long.ordered  # log(observed / predicted), ascending; replaced, never mutated
            log_q = self._log_corr
            margin = self.effective_margin_s
        # A backlog (requests already waiting for the worker) means batching carries the
        # throughput: a request that opens a group of its own makes everyone behind it wait for a
        # forward pass that serves one request, and under overload a mix of sub-networks then
        # serves less than always picking the fastest. So while requests wait, only their groups
        # (and the fastest sub-network, the fallback) are candidates.
        backlog = look.groups.keys()
        if not pinned:  # a dominated sub-network is never the right answer to a budget
            cands = [s for s in cands if s.key in self.front]
        quick = self.quick(cands, batch, tokens)
        if backlog:
            # Only the waiting groups and the fastest can be chosen. Every sub-network without a
            # waiting group has the same work ahead, so the fastest of those is the one with the
            # fastest forward pass: no need to price the queue for all of them (under overload
            # this runs for every request, and its CPU is the server's).
            cands = [s for s in cands if s.key in backlog or s is quick]
        best: tuple[float, Subnet, float] | None = None  # (expected metric, sub-network, predicted)
        # the delay a candidate imposes on the requests behind it is priced against the fastest
        # forward pass's completion: the others' differences from it are the delays
        t_quick = self.completion_s(quick, batch, tokens, look(quick.key), c)
        rho_quick: float | None = None  # computed only when a delay has a price
        # what utilisation() judges a candidate by: the traffic's tokens per input, each request's
        # cost besides its forward pass, the lanes, and the typical slow-down, not the deadline's
        typical: int | None = None
        per_input, lanes, c_cap = 0.0, 1.0, c
        # the earliest completion among the feasible candidates scored so far, all at least as
        # accurate as the next: a candidate finishing no earlier is dominated for this request
        # (the static front cannot see this: which is faster depends on the request's tokens,
        # on the batch it would join and on the queue ahead)
        t_feasible = math.inf
        for s in cands:  # most accurate first
            if backlog and s.key not in backlog:
                continue  # the fastest without a group of its own is the fallback below
            ahead = look(s.key)
            t = t_quick if s is quick else self.completion_s(s, batch, tokens, ahead, c)
            if best is not None and s.metric is not None and s.metric <= best[0]:
                break  # ranked by metric and P(meet) <= 1: nothing further down can score higher
            if t + margin > budget_s:
                continue
            # joining a waiting group makes its batch bigger and slower for the requests already
            # in it: an upgrade must leave them their deadlines too, or one request's gain costs
            # a whole batch's misses (the fastest is the fallback, and exempt)
            if s is not quick and t + margin > ahead.slack_s:
                continue
            if typical is None:  # once per request, and only when a candidate gets this far
                typical, per_input = self.typical_tokens(tokens), self.per_input_s(rate, reading)
                lanes, c_cap = self.usable_lanes(reading), self.capacity_contention(reading)
            rho = self.utilisation(s, rate, typical, c_cap, budget_all, per_input, lanes)
            if rho > self.max_utilisation:
                continue
            if s.metric is None:  # no accuracy to weigh: the first (biggest) that fits, as before
                return decide(s, "pinned" if pinned else "budget", t)
            if t >= t_feasible:  # only a poorer track record could let it win: it would miss more
                continue
            t_feasible = t
            # expected accuracy = metric x P(meet): P from the recent spread of observed/predicted
            # forward time around the quantile already in t (the benchmark's own scoring rule);
            # with price_queue, times the M/M/1 share within budget were all arrivals routed here
            p_meet = self.p_meet(t, budget_s, ratios, log_q, margin)
            if self.price_queue:
                p_meet *= self.p_steady(s, rho, rate, tokens, c, budget_s, margin)
            if s is not quick:  # an upgrade must also have met budgets lately (see the docstring)
                p_meet = min(p_meet, self.track_record(s.key))
            score = s.metric * p_meet
            delta = t - t_quick
            if self.price_delay and delta > 0 and rate > 0 and quick.metric is not None:
                near = self.near_miss_share(delta)
                if near > 0:
                    if rho_quick is None:
                        rho_quick = min(
                            self.utilisation(quick, rate, typical, c_cap, budget_all, per_input, lanes), 0.9
                        )
                    behind = rate * t / (1.0 - rho_quick)  # arrivals until the queue drains again
                    score -= quick.metric * min(1.0, behind * near)
            if best is None or score > best[0]:
                best = (score, s, t)
        if best is not None and best[0] > 0:
            return decide(best[1], "pinned" if pinned else "budget", best[2])
        # Nothing fits: the fastest sub-network, even where joining a bigger sub-network's group
        # waiting ahead would answer this request sooner. Such a fallback kept that group alive
        # under overload: every newcomer joined it, each of its rows cost the worker 2-4x a row
        # of the fastest, and the queue never drained. In serve-52 at 3x, whole seconds went to
        # 0.5/1 or 0.25/0.75 as "fallback", with 503s, while the blocks around them kept their
        # budgets on 0.25/0.5 (docs/RESULTS.md). When the budget is lost anyway, throughput is
        # what the requests behind need.
        t, s = t_quick, quick
        if self.shed_late and not pinned and t > budget_s:
            idle = self.completion_s(s, batch, tokens, IDLE, c)
            # late because of the queue, not because it is too slow for the budget: the time
            # outside the server counts, but not the learned error margin, which a backlog
            # itself inflates (in serve-63 a half-second at 3x predicted 105 ms at the median
            # and ran 98 ms, and none of it was shed: the grown margin said even an idle server
            # would miss). The time the request has already spent counts as spent: it may be a
            # slow client's upload rather than the load, and a request that is late whatever the
            # queue is served on the fastest and reported missed.
            if idle + self.margin_s <= budget_s:
                return decide(s, "shed", t)
        return decide(s, "pinned" if pinned else "fallback", t)

    def p_steady(
        self,
        s: Subnet,
        rho: float,
        rate: float,
        tokens: int,
        contention: float,
        budget_s: float,
        margin_s: float | None = None,
    ) -> float:
        """Share of requests within the budget if the recent arrival rate were all served by
        ``s``: the queueing delay W of an M/M/1 queue at utilisation rho has P(W > x) =
        rho exp(-(1 - rho) x / S) for a mean service time S per input (here 1 / capacity, so
        S = rho / rate), and a request meets the budget when W stays under what its own batch
        and the margin leave. Poisson arrivals with exponential service are the pessimistic
        textbook case (deterministic service waits half as long), which suits a budget."""
        if rate <= 0 or rho <= 0:
            return 1.0
        if rho >= 1:
            return 0.0
        service = rho / rate
        own = self.predict_s(s.key, 1, tokens, contention) + self.wait_s + self.after_s
        margin = self.effective_margin_s if margin_s is None else margin_s
        slack = max(0.0, budget_s - margin - own)  # 0: only an empty queue (P = 1 - rho) fits
        return max(0.0, 1.0 - rho * math.exp(-(1.0 - rho) * slack / service))

    def p_meet(
        self,
        t: float,
        budget_s: float,
        ratios: Sequence[float],
        log_q: float,
        margin_s: float | None = None,
    ) -> float:
        """Share of recent batches' slow-downs under which a predicted completion ``t`` (made with
        the quantile correction) would still land inside ``budget_s`` less the margin. ``ratios``
        are log(observed / predicted), ascending."""
        margin = self.effective_margin_s if margin_s is None else margin_s
        fixed = self.wait_s + self.after_s + margin
        var = t - self.wait_s - self.after_s  # the part that scales with the forward time
        if not ratios or var <= 0:
            return 1.0 if t + margin <= budget_s else 0.0
        if budget_s <= fixed:
            return 0.0
        # fixed + var * exp(lr - log_q) <= budget  <=>  lr <= log_q + log((budget - fixed) / var)
        return bisect.bisect_right(ratios, log_q + math.log((budget_s - fixed) / var)) / len(ratios)
