"""What one API request does, outside HTTP: check limits, tokenise, let the policy choose a
sub-network, queue the rows in the scheduler, post-process, and record the outcome in metrics.
Routes call these and only translate the result into headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service import metrics as M
from service.engine import Encoded, Engine
from service.errors import ProblemError
from service.later import Later
from service.policy import Decision, NoSuchSubnet, Policy
from service.profile import LatencyProfile
from service.scheduler import ClientClosed, DeadlineExceeded, JobTiming, QueueFull, Scheduler
from service.settings import Settings
from service.worker import InferenceWorker

OFF_LOOP_CHARS = 20_000


@dataclass
class Served:
    """One model being served: engine + its policy, scheduler and latency profile."""

    engine: Engine
    policy: Policy
    scheduler: Scheduler
    profile: LatencyProfile
    # the processes running its forward passes, one batch each at a time (none: a thread of this one)
    workers: list[InferenceWorker] = field(default_factory=list)
    # metrics and policy feedback that need not hold up an answer (service/later.py; Later(0): at once)
    later: Later = field(default_factory=lambda: Later(0))

    @property
    def name(self) -> str:
        return self.engine.name


@dataclass(frozen=True)
class RequestOptions:
    """Parsed request headers."""

    budget_s: float
    width: float | None = None
    depth: float | None = None
    arrived: float | None = None  # time.perf_counter() when the server had the request
    closed: Callable[[], Awaitable[Any]] | None = None  # returns when the client has hung up
    timeout_s: float | None = None  # after this long the client no longer wants the answer

    @property
    def choice_budget_s(self) -> float:
        """The budget the policy chooses for: an answer after the timeout is worth nothing."""
        return self.budget_s if self.timeout_s is None else min(self.budget_s, self.timeout_s)

    @property
    def deadline(self) -> float | None:
        """time.perf_counter() when the answer is due (arrival + the budget chosen for)."""
        return None if self.arrived is None else self.arrived + self.choice_budget_s

    @property
    def expires(self) -> float | None:
        """time.perf_counter() after which the client no longer wants the answer (arrival + timeout)."""
        return None if self.arrived is None or self.timeout_s is None else self.arrived + self.timeout_s


@dataclass
class Outcome:
    outputs: list[Any]
    decision: Decision
    timing: JobTiming
    truncated: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    tokenize_s: float = 0.0  # turning the texts into token rows (Server-Timing ``tokenize``)


def _overloaded(
    served: Served, status: int, detail: str, e: QueueFull, type_: str = "overloaded",
    decision: Decision | None = None, **extra: Any,
) -> ProblemError:  # fmt: skip
    """A request turned away before inference: the queue's state and when to retry."""
    return ProblemError(
        status,
        f"model {served.name!r}: {detail}",
        type_=type_,
        decision=decision,
        headers={"Retry-After": str(e.retry_after)},
        extra={
            "queue_depth": e.depth,
            "queue_capacity": e.capacity,
            **extra,
            "retry_after_s": round(e.retry_after_s, 3),
        },
    )


def _queue_full(served: Served, e: QueueFull, settings: Settings) -> ProblemError:
    M.REJECTED.labels(served.name, "shutting_down" if e.closing else "queue_full").inc()
    if e.closing:
        return _overloaded(served, 503, str(e), e, type_="shutting-down")
    return _overloaded(served, settings.queue_full_status, str(e), e)


def _late(served: Served, d: Decision, opts: RequestOptions, settings: Settings) -> ProblemError:
    """The policy shed the request: the queue ahead makes every sub-network miss its budget."""
    M.REJECTED.labels(served.name, "deadline").inc()
    budget_s = opts.choice_budget_s  # the budget the policy chose for (the timeout when shorter)
    retry_s = max(0.0, d.predicted_s - budget_s)  # until the queue has shrunk by the excess
    e = QueueFull(served.scheduler.depth, served.scheduler.max_queue, retry_s)
    return _overloaded(
        served,
        settings.queue_full_status,
        f"the {e.depth} request(s) queued ahead leave no sub-network able to answer within the "
        f"{1e3 * budget_s:g} ms budget (the fastest, {d.width:g}x{d.depth:g}, is predicted at "
        f"{1e3 * d.predicted_s:.1f} ms); retry after {retry_s:.3f} s",
        e,
        decision=d,  # for the access log: the sub-network it would have run and the prediction
        predicted_ms=round(1e3 * d.predicted_s, 3),
        budget_ms=round(1e3 * budget_s, 3),
    )


async def execute(
    served: Served, enc: Encoded, opts: RequestOptions, settings: Settings
) -> tuple[list[Any], Decision, JobTiming]:
    """Choose a sub-network for the encoded rows and run them through the scheduler."""
    sched = served.scheduler
    try:
        if opts.width is not None or opts.depth is not None:  # a client's mistake is a 400 under
            served.policy.candidates(opts.width, opts.depth)  # any load, never a 503 to retry
        if sched.depth >= sched.max_queue:  # reject before choosing: the choice would be wasted
            raise _queue_full(served, QueueFull(sched.depth, sched.max_queue, sched.work_ahead_s()), settings)
        tokens = enc.cost_tokens(sched.packed)
        # the budget already spent (read, parse, tokenise, and the event loop's lag under load)
        elapsed = 0.0 if opts.arrived is None else time.perf_counter() - opts.arrived
        d = served.policy.choose(
            opts.choice_budget_s, len(enc.rows), tokens, sched, width=opts.width, depth=opts.depth,
            elapsed_s=elapsed,
        )  # fmt: skip
    except NoSuchSubnet as e:
        raise ProblemError(400, f"model {served.name!r}: {e}", type_="subnetwork-not-served") from e
    name = served.name
    if d.reason == "shed":
        raise _late(served, d, opts, settings)
    served.later(_count_choice, name, d, opts.budget_s)  # while the batch runs, not before it
    try:
        outputs, timing = await sched.submit(
            d.key, enc.rows, tokens, opts.deadline, opts.closed, opts.expires
        )
    except QueueFull as e:
        raise _queue_full(served, e, settings) from e
    except (ClientClosed, DeadlineExceeded) as e:
        counter = M.CLIENT_CLOSED if isinstance(e, ClientClosed) else M.DEADLINE_EXCEEDED
        counter.labels(name, e.stage).inc()
        e.decision = d  # for the answer and the access log: what it had been routed to
        if isinstance(e, DeadlineExceeded) and e.stage != "admission" and opts.arrived is not None:
            # a miss the policy must learn from like any other (its track record, the slack
            # window, the margin); the time it would have taken is at least the time it has had
            served.policy.observe_request(d, opts.choice_budget_s, time.perf_counter() - opts.arrived)
        raise
    served.later(_observe_queue_wait, name, timing.queue_s)
    return outputs, d, timing


def _count_choice(name: str, d: Decision, budget_s: float) -> None:
    M.SELECTED.labels(name, M.fmt(d.width), M.fmt(d.depth), d.reason).inc()
    if d.metric is not None:
        M.SELECTED_METRIC.labels(name).observe(d.metric / 100 if d.metric > 1 else d.metric)
    M.BUDGET_SECONDS.labels(name).observe(budget_s)


def _observe_queue_wait(name: str, seconds: float) -> None:
    M.QUEUE_WAIT.labels(name).observe(seconds)


async def _off_loop(chars: int, fn: Any, *args: Any) -> Any:
    """Tokenise on the event loop when it is quick (a thread hop costs more than short texts take),
    in a worker thread when the input is big enough to stall other requests and /healthz."""
    if chars <= OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def check_count(n: int, settings: Settings, what: str) -> None:
    if n > settings.max_inputs:
        raise ProblemError(
            413, f"{n} {what} in one request; at most {settings.max_inputs} (DYNABERT_MAX_INPUTS)",
            type_="too-many-inputs",
        )  # fmt: skip


async def classify(
    served: Served,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    opts: RequestOptions,
    settings: Settings,
) -> Outcome:
    eng = served.engine
    if eng.task.type == "qa":
        raise ProblemError(400, f"model {served.name!r} is a QA model; use POST /v1/qa", type_="wrong-task")
    check_count(len(texts), settings, "texts")
    if pairs is None and len(eng.task.text_fields) == 2:
        raise ProblemError(
            422, f"model {served.name!r} classifies text pairs ({', '.join(eng.task.text_fields)}): "
            "give text_pair as well", type_="invalid-request",
            extra={"errors": [{"field": "text_pair", "message": "required by this model", "type": "missing"}]},
        )  # fmt: skip
    if pairs is not None and len(eng.task.text_fields) == 1:
        # a pair to a single-text model (a sentiment classifier) reads the second text as
        # segment B, which it never saw in training: an answer of unknown meaning, so refuse it
        raise ProblemError(
            422, f"model {served.name!r} classifies single texts ({eng.task.text_fields[0]}), not pairs: "
            "send text without text_pair (a checkpoint trained on pairs declares two text fields in "
            "dynabert.json, config.task.text_fields)", type_="invalid-request",
            extra={"errors": [{"field": "text_pair", "message": "not taken by this model", "type": "extra_forbidden"}]},
        )  # fmt: skip
    t0 = time.perf_counter()
    enc = await _off_loop(sum(map(len, texts)) + sum(map(len, pairs or ())), eng.encode_texts, texts, pairs)
    tokenize_s = time.perf_counter() - t0
    if enc.truncated and settings.overlong_text == "reject":
        raise ProblemError(
            413, f"{enc.truncated} input(s) exceed the model's {eng.max_length} tokens", type_="text-too-long"
        )
    logits, d, timing = await execute(served, enc, opts, settings)
    return Outcome(eng.postprocess_classify(logits), d, timing, enc.truncated, tokenize_s=tokenize_s)


async def qa(
    served: Served,
    questions: Sequence[str],
    contexts: Sequence[str],
    opts: RequestOptions,
    settings: Settings,
) -> Outcome:
    eng = served.engine
    if eng.task.type != "qa":
        raise ProblemError(
            400,
            f"model {served.name!r} is a {eng.task.type} model; use POST /v1/classify",
            type_="wrong-task",
        )
    check_count(len(questions), settings, "questions")
    chars = sum(map(len, questions)) + sum(map(len, contexts))
    t0 = time.perf_counter()
    enc, feats = await _off_loop(chars, eng.encode_qa, questions, contexts, settings.qa_doc_stride)
    tokenize_s = time.perf_counter() - t0
    limit = settings.max_inputs * 4
    if len(enc.rows) > limit:
        raise ProblemError(
            413, f"the contexts make {len(enc.rows)} windows of {eng.max_length} tokens; at most {limit}",
            type_="context-too-long",
        )  # fmt: skip
    logits, d, timing = await execute(served, enc, opts, settings)
    answers = eng.postprocess_qa(logits, feats, contexts, settings.qa_max_answer_tokens)
    return Outcome(answers, d, timing, 0, {"windows": len(enc.rows)}, tokenize_s)


def server_timing(
    queue_s: float,
    infer_s: float,
    total_s: float,
    forward_s: float | None = None,
    tokenize_s: float | None = None,
) -> str:
    """The ``Server-Timing`` header (ms). ``tokenize`` is what an in-process caller pays besides the
    forward pass too, so end to end minus tokenize + forward is what serving over HTTP adds (the
    split Hugging Face text-embeddings-inference reports as its x-tokenization-time header)."""
    tok = f"tokenize;dur={1e3 * tokenize_s:.3f}, " if tokenize_s is not None else ""
    fwd = f", forward;dur={1e3 * forward_s:.3f}" if forward_s is not None else ""
    return f"{tok}queue;dur={1e3 * queue_s:.3f}, infer;dur={1e3 * infer_s:.3f}{fwd}, total;dur={1e3 * total_s:.3f}"
